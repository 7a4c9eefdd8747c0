"""Inference speed: `launcher sample`'s generation with and without the KV cache, and the halting
head's early exit (supervision steps used against loss).

    python bench/inference.py [--train-steps 40] [--new-tokens 48] [--rounds 3] [--json FILE]

The model: tiny with `halting=true`, trained here for --train-steps steps on the shipped
Shakespeare corpus (the real loader; the launcher's AdamW groups, except that the halting head
gets its own learning rate, --halt-lr, so that its bias can leave its -5 initialisation within
so few steps). It is a briefly trained model: its losses are far from a converged tiny's, and its
halting head has learned little beyond the average accuracy. Speed does not depend on how well a
model is trained; the steps-vs-loss trade-off does, so those figures show the mechanism working,
not what a trained model would get.

Generation is what `launcher sample` runs after loading the weights: model.generate(prompt,
max_new_tokens, temperature=0.8, top_k=50), batch 1, prompt "ROMEO:". Variants, interleaved:
  cache     the same weights without the halting head, KV cache on (every block application of the
            recursion keeps its keys/values: a new token costs one position);
  no cache  the same, use_cache=False: the whole window is recomputed for every token;
  halting   the halting model (its cache is off by design: each token may use a different number
            of steps), stopping when the window's mean halting probability passes the threshold.
Early exit on held-out batches: for each threshold, the supervision steps used (mean over batches)
and the cross-entropy of the logits the model stopped with.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    interleaved,
    median,
    setup,
    supervision_backward,
    write_json,
)

PROMPT = "ROMEO:"


def train_halting_model(steps: int, halt_lr: float, overrides: dict):
    """tiny + halting, trained `steps` steps with the per-step backward path."""
    import torch

    from data_pipeline import build_loader, load_tokenizer
    from launcher.engine.config import resolve
    from launcher.engine.parallelize import build_optimizer
    from model import RecursiveGPT

    run = resolve("tiny", {"halting": True, **overrides})
    t, c = run.train, run.model
    tok = load_tokenizer(t.tokenizer)
    torch.manual_seed(t.seed)
    model = RecursiveGPT(c)
    opt = build_optimizer(model, run)
    for g in opt.param_groups:  # the halting head into a group of its own
        g["params"] = [p for p in g["params"] if p is not model.halt_head.weight
                       and p is not model.halt_head.bias]
    opt.add_param_group({"params": list(model.halt_head.parameters()), "lr": halt_lr,
                         "weight_decay": 0.0, "name": "halting"})
    loader = build_loader(t.data, tok, split="train", batch_size=t.device_batch_size,
                          seq_len=c.sequence_len, seed=t.seed, num_samples=steps
                          * t.device_batch_size)
    t0 = time.perf_counter()
    losses = []
    for idx, tgt in loader:
        last = supervision_backward(model, idx, tgt, c.N_sup)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(last.item())
    seconds = time.perf_counter() - t0
    model.eval()
    return run, tok, model, {"steps": len(losses), "seconds": seconds,
                             "first_loss": losses[0], "last_loss": losses[-1]}


def halting_table(model, run, tok, n_batches: int) -> dict:
    """Held-out batches: every step's loss and mean halting probability, then for a range of
    thresholds the steps an early exit uses and the loss it ends with."""
    import torch
    import torch.nn.functional as F

    from data_pipeline import build_loader

    c, t = run.model, run.train
    loader = build_loader(t.data, tok, split="val", batch_size=t.device_batch_size,
                          seq_len=c.sequence_len, seed=t.seed)
    per_batch = []  # [(loss_s, p_halt_s) for s in steps]
    with torch.no_grad():
        for i, (idx, tgt) in enumerate(loader):
            if i == n_batches:
                break
            y = z = None
            rows = []
            for s in range(c.N_sup_inference):
                st = model.supervision_step(idx, y, z, step=s)
                y, z = st.y, st.z
                loss = F.cross_entropy(st.logits.flatten(0, 1), tgt.flatten(), ignore_index=-1)
                rows.append((loss.item(), torch.sigmoid(st.halt_logits).mean().item()))
            per_batch.append(rows)
    n = c.N_sup_inference
    step_loss = [sum(b[s][0] for b in per_batch) / len(per_batch) for s in range(n)]
    step_p = [sum(b[s][1] for b in per_batch) / len(per_batch) for s in range(n)]
    probs = sorted(p for b in per_batch for _, p in b)
    # thresholds spread over the probabilities the head actually gives, plus the config's own
    quant = [probs[int(q / 10 * (len(probs) - 1))] for q in range(1, 10)]
    thresholds = sorted({round(x, 4) for x in quant} | {c.halt_threshold})
    rows, seen = [], set()
    for th in thresholds:
        used, losses = [], []
        for b in per_batch:  # the rule of model.forward / should_halt: stop once p > th
            k = next((s for s, (_, p) in enumerate(b) if p > th), n - 1)
            used.append(k + 1)
            losses.append(b[k][0])
        key = (tuple(used), th == c.halt_threshold)
        if key in seen:  # a threshold that exits exactly where a lower one did says nothing new
            continue
        seen.add(key)
        rows.append({"threshold": th, "mean_steps": sum(used) / len(used),
                     "loss": sum(losses) / len(losses)})
    return {"batches": len(per_batch), "step_loss": step_loss, "step_halt_prob": step_p,
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--halt-lr", type=float, default=0.05)
    ap.add_argument("--new-tokens", type=int, default=200,
                    help="as `launcher sample` (its --max-new-tokens default)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, few tokens")
    ap.add_argument("--json")
    args = ap.parse_args()
    setup(args.threads)
    import torch

    from model import RecursiveGPT

    overrides = {}
    if args.quick:
        overrides = {"sequence_len": 32, "device_batch_size": 2}
        args.train_steps, args.new_tokens, args.rounds, args.eval_batches = 3, 6, 1, 2
    run, tok, model, trained = train_halting_model(args.train_steps, args.halt_lr, overrides)
    c = run.model
    print(f"inference: tiny + halting, trained {trained['steps']} steps in "
          f"{trained['seconds']:.0f} s (train loss {trained['first_loss']:.3f} -> "
          f"{trained['last_loss']:.3f}), N_sup_inference {c.N_sup_inference}, effective depth "
          f"{c.effective_depth // c.N_sup * c.N_sup_inference} block applications per token",
          flush=True)

    plain = RecursiveGPT(c.replace(halting=False))  # the same weights, no halting head
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("halt_head.")}
    plain.load_state_dict(sd)
    plain.eval()
    prompt = torch.tensor([tok.encode(PROMPT)], dtype=torch.long)
    default_th = c.halt_threshold
    table = halting_table(model, run, tok, args.eval_batches)
    # a threshold that exits early: the one whose steps used are nearest half of N_sup_inference
    early = [r for r in table["rows"] if r["threshold"] != default_th]
    mid = min(early, key=lambda r: abs(r["mean_steps"] - c.N_sup_inference / 2),
              default=None)
    steps_used: dict[str, list[float]] = {}

    def gen(m, use_cache: bool, th: float | None = None, name: str = "", n: int = 0):
        def call():
            if th is not None:
                m.config.halt_threshold = th
            g = torch.Generator().manual_seed(0)
            m.generate(prompt, n or args.new_tokens, temperature=0.8, top_k=50,
                       use_cache=use_cache, generator=g)
            if m.halt_head is not None and not n:
                used = m.last_halt_steps
                steps_used.setdefault(name, []).append(sum(used) / len(used))
        return call

    variants = {"cache": gen(plain, True), "no cache": gen(plain, False)}
    for th in [default_th] + ([mid["threshold"]] if mid else []):
        name = f"halting, threshold {th:g}"
        variants[name] = gen(model, True, th, name)
    gen(plain, True, n=8)()  # warm-up: a few tokens through each path
    gen(plain, False, n=8)()
    gen(model, True, default_th, n=8)()
    times = interleaved(variants, args.rounds, warmup=0)
    model.config.halt_threshold = default_th
    gen_rows = []
    print(f"\ngeneration: prompt {PROMPT!r} ({prompt.size(1)} tokens), {args.new_tokens} new "
          f"tokens, batch 1, temperature 0.8, top_k 50, {args.rounds} rounds interleaved")
    print(f"{'variant':<28} {'tokens/s':>9} {'x no cache':>10} {'steps/token':>12}")
    base = median(times["no cache"])
    for name, ts in times.items():
        med = median(ts)
        steps = median(steps_used[name]) if name in steps_used else float(c.N_sup_inference)
        gen_rows.append({"variant": name, "tokens_per_s": args.new_tokens / med,
                         "speedup_vs_no_cache": base / med, "steps_per_token": steps,
                         "all_s": ts})
        print(f"{name:<28} {args.new_tokens / med:>9.1f} {base / med:>10.2f} {steps:>12.2f}")

    print(f"\nearly exit on {table['batches']} held-out batches "
          f"({run.train.device_batch_size} x {c.sequence_len}): per step, loss "
          + " ".join(f"{x:.3f}" for x in table["step_loss"]) + "; mean halting probability "
          + " ".join(f"{x:.3f}" for x in table["step_halt_prob"]))
    print(f"{'threshold':>10} {'steps used':>11} {'loss':>8}")
    for r in table["rows"]:
        print(f"{r['threshold']:>10.4f} {r['mean_steps']:>11.2f} {r['loss']:>8.4f}")
    write_json(args.json, {"trained": trained, "overrides": overrides, "prompt": PROMPT,
                           "prompt_tokens": prompt.size(1),
                           "new_tokens": args.new_tokens, "rounds": args.rounds,
                           "N_sup_inference": c.N_sup_inference, "generation": gen_rows,
                           "apps_per_token": c.applications_per_recursion * c.T_recursion
                           * c.N_sup_inference,
                           # one block application on one position: its weight matmuls
                           "block_matmul_flops": 2 * (c.block_params() - 2 * c.n_embd),
                           "halting": table, "halt_lr": args.halt_lr})


if __name__ == "__main__":
    main()
