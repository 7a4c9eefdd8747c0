"""Does the recursion earn its compute? `make study` (bench/recursion_study.py).

On the shipped Shakespeare corpus, with one seed and one data order, it trains
  (a) plain:      the plain GPT (recursion off: one pass of the stack, one supervision step),
  (b) recursive:  tiny's recursion at the same parameters and the same number of tokens,
  (c) deep plain: a plain GPT with as many layers as it takes to match (b)'s training FLOPs/token,
  (d) plain+time: the plain GPT given (b)'s wall-clock (so it sees more tokens),
and reports held-out bits per byte, val loss per supervision step, refinement (L_1 - L_N)/L_1,
tokens, training FLOPs and seconds as a Markdown table (bench/STUDY.md) and one PNG
(bench/study.png: bpb against training FLOPs, one curve per config).

It trains the model directly (plain AdamW with the trainer's parameter groups and schedule, one
process), not through DeepSpeed: the question is the model's, and the engine's parity with plain
data parallel is tested elsewhere. `--only NAME --set key=value` runs one config for ablations.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipeline import build_loader, load_tokenizer  # noqa: E402
from launcher.engine.config import resolve  # noqa: E402
from launcher.engine.evaluate import eval_batch, summarize, token_bytes  # noqa: E402
from launcher.engine.parallelize import (  # noqa: E402
    SupervisionStepModule,
    build_optimizer,
    build_scheduler,
)
from model import RecursiveGPT  # noqa: E402


@dataclass
class Result:
    name: str
    config: dict[str, Any]
    steps: int = 0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)  # eval points
    final: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def evaluate(model: RecursiveGPT, val_batches: list, tbytes: torch.Tensor) -> dict[str, Any]:
    """The trainer's evaluation (launcher.engine.evaluate) on this model: val loss per supervision
    step,
    refinement, and bits per byte of the last step (zero-byte targets such as EOS left out)."""
    model.eval()
    step_fn = SupervisionStepModule(model)
    n = model.config.N_sup_inference
    totals = sum(eval_batch(step_fn, idx, tgt, n, tbytes) for idx, tgt in val_batches)
    model.train()
    return summarize(totals)


@torch.no_grad()
def diagnose(model: RecursiveGPT, idx: torch.Tensor, tgt: torch.Tensor) -> dict[str, Any]:
    """What the recursion does on one batch: RMS of x, y, z after each supervision step, how
    much step s depends on the state it is handed (relative change of y_s when step s starts
    from the initial state instead), and the mean attention entropy (nats) of each layer."""
    from model.layers import Attention, apply_rope

    model.eval()
    ent: dict[int, list[float]] = {}
    hooks = []
    for li, block in enumerate(model.stack.blocks):
        def hook(mod: Attention, args, li=li) -> None:
            h, cos, sin = args[0], args[1], args[2]
            B, T, _ = h.shape
            q = mod.q(h).view(B, T, mod.n_head, mod.head_dim).transpose(1, 2)
            k = mod.k(h).view(B, T, mod.n_kv_head, mod.head_dim).transpose(1, 2)
            if mod.qk_norm:
                q = F.rms_norm(q, (mod.head_dim,), eps=mod.eps)
                k = F.rms_norm(k, (mod.head_dim,), eps=mod.eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            k = k.repeat_interleave(mod.n_head // mod.n_kv_head, dim=1)
            att = (q @ k.transpose(-1, -2)) / mod.head_dim ** 0.5
            att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            p = att.softmax(-1)
            ent.setdefault(li, []).append(float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean()))
        hooks.append(block.attn.register_forward_pre_hook(hook))
    x = model.tok_emb(idx)
    if model.config.input_norm:
        x = F.rms_norm(x, (x.size(-1),), eps=model.config.norm_eps)
    rms = lambda t: float(t.pow(2).mean().sqrt())
    out: dict[str, Any] = {"x_rms": rms(x), "y_rms": [], "z_rms": [], "state_use": []}
    y = z = None
    try:
        for s in range(model.config.N_sup_inference):
            st = model.supervision_step(idx, y, z, step=s)
            if y is not None:  # the same step from the initial state: does the state matter?
                fresh = model.supervision_step(idx, None, None, step=s)
                out["state_use"].append(rms(st.y - fresh.y) / rms(st.y))
            y, z = st.y, st.z
            out["y_rms"].append(rms(y))
            out["z_rms"].append(rms(z))
    finally:
        for h in hooks:
            h.remove()
    out["attn_entropy"] = [sum(v) / len(v) for _, v in sorted(ent.items())]
    model.train()
    return out


def group_norms(model: RecursiveGPT, before: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Gradient norm and update/weight ratio of each parameter group (after opt.step)."""
    out = {}
    for kind, named in model.parameter_groups().items():
        if not named:
            continue
        w = torch.cat([p.detach().flatten() for _, p in named])
        b = torch.cat([before[n].flatten() for n, _ in named])
        out[kind] = {"update_ratio": float((w - b).norm() / b.norm().clamp_min(1e-12))}
    return out


def run_config(name: str, preset: str, overrides: dict[str, Any], steps: int | None,
               seconds: float | None, eval_every: int, val_batches: list, tbytes: torch.Tensor,
               threads: int, log=print, diag: bool = False, across: bool = False) -> Result:
    """Train one config for `steps` batches (or until `seconds` of training) and evaluate.
    across: keep the states in the graph between supervision steps and backpropagate the summed
    objective once (outside SPEC's contract: a study of what the detach costs)."""
    torch.set_num_threads(threads)
    if steps is not None and "max_steps" not in overrides:  # schedule and data for the steps run
        overrides = {**overrides, "max_steps": steps}
    run = resolve(preset, overrides)
    t, mc = run.train, run.model
    if steps is None:  # a time budget: the schedule is laid out for a guess, then cut
        steps = t.max_steps
    torch.manual_seed(t.seed)
    model = RecursiveGPT(mc)
    opt = build_optimizer(model, run)
    sched = build_scheduler(opt, run)
    tok = load_tokenizer(t.tokenizer)
    loader = build_loader(t.data, tok, split="train", batch_size=t.device_batch_size,
                          seq_len=mc.sequence_len, seed=t.seed,
                          num_samples=t.max_steps * t.device_batch_size)
    res = Result(name=name, config={"preset": preset, **overrides})
    fpt = mc.flops_per_token(training=True)
    tokens_per_step = t.device_batch_size * mc.sequence_len
    n_sup = mc.N_sup
    train_s = 0.0
    it = iter(loader)
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        idx, tgt = next(it)
        prev = backward_steps(model, opt, sched, t, idx, tgt, n_sup, across)
        if diag and step % eval_every == 0:
            gnorm = {k: float(torch.cat([p.grad.flatten() for _, p in v if p.grad is not None]
                                        or [torch.zeros(1)]).norm())
                     for k, v in model.parameter_groups().items() if v}
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        if diag and step % eval_every == 0:
            d = diagnose(model, idx, tgt)
            log(f"  diag step {step}: grad norm {fmt(gnorm)} update/weight "
                f"{fmt({k: v['update_ratio'] for k, v in group_norms(model, before).items()})}"
                f"\n  x rms {d['x_rms']:.2f} y rms {fmt(d['y_rms'])} z rms {fmt(d['z_rms'])} "
                f"state use {fmt(d['state_use'])} attn entropy {fmt(d['attn_entropy'])}")
        opt.zero_grad(set_to_none=True)
        sched.step()
        train_s += time.perf_counter() - t0
        res.steps, res.tokens = step, step * tokens_per_step
        res.flops = res.tokens * fpt
        done = step == steps or (seconds is not None and train_s >= seconds)
        if step % eval_every == 0 or done:
            ev = evaluate(model, val_batches, tbytes)
            point = {"step": step, "tokens": res.tokens, "flops": res.flops,
                     "seconds": round(train_s, 1), **ev}
            res.curve.append(point)
            log(f"{name:12s} step {step:4d} {train_s:6.0f}s loss {prev.item():.3f} "
                f"val bpb {ev['val_bpb']:.3f} steps "
                + " ".join(f"{x:.3f}" for x in ev["val_step_losses"])
                + f" refine {ev['val_refinement']:+.4f}")
        if done:
            break
    res.seconds = train_s
    res.final = res.curve[-1]
    return res


def backward_steps(model: RecursiveGPT, opt, sched, t, idx: torch.Tensor, tgt: torch.Tensor,
                   n_sup: int, across: bool = False) -> torch.Tensor:
    """Forward and backward of n_sup supervision steps on one batch (the optimizer step after
    the last one is the caller's). Returns the last step's loss (detached)."""
    y = z = prev = None
    total = 0.0
    for s in range(n_sup):
        st = model.supervision_step(idx, y, z, tgt, step=s, prev_loss=prev,
                                    keep_logits=False, detach=not across)
        if across:
            total = total + st.objective
        else:
            st.objective.backward()
        y, z, prev = st.y, st.z, st.carry
        if t.update_mode == "per_step" and s < n_sup - 1:  # TRM: an update per step
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
    if across:
        total.backward()
    return prev.loss


def fmt(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} {x:.3g}" for k, x in v.items()) + "}"
    return "[" + " ".join(f"{x:.3g}" for x in v) + "]"


def val_set(preset: str, n_batches: int) -> tuple[list, torch.Tensor]:
    run = resolve(preset, {})
    tok = load_tokenizer(run.train.tokenizer)
    loader = build_loader(run.train.data, tok, split="val", batch_size=8,
                          seq_len=run.model.sequence_len, seed=0)
    batches = []
    for i, b in enumerate(loader):
        if i == n_batches:
            break
        batches.append(b)
    return batches, token_bytes(tok)


def parse_sets(sets: list[str]) -> dict[str, str]:
    out = {}
    for s in sets:
        k, _, v = s.partition("=")
        out[k] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="run one config: NAME (any label)")
    ap.add_argument("--set", action="append", default=[], help="override key=value")
    ap.add_argument("--diagnose", action="store_true",
                    help="print RMS of x/y/z per step, state use, attention entropy, gradient "
                         "norms and update/weight ratios per group at each eval")
    ap.add_argument("--json", default=None, help="append the result as one JSON line here")
    ap.add_argument("--backprop-across-steps", action="store_true",
                    help="with --only: keep y, z in the graph between supervision steps and "
                         "backpropagate once (breaks SPEC's detach; measures what it costs). "
                         "Needs T_recursion 1: a no-grad recursion cuts the graph anyway")
    ap.add_argument("--task", default=None,
                    help="a depth task of data_pipeline/tasks.py (pointer, addition) instead of "
                         "Shakespeare: accuracy by difficulty and supervision step")
    ap.add_argument("--difficulty", default="1-4", help="task difficulties, e.g. 1-4")
    ap.add_argument("--task-param", action="append", default=[],
                    help="task parameter key=value (pointer: n_chains)")
    ap.add_argument("--batch", type=int, default=64, help="task batch size")
    ap.add_argument("--infer-sup", type=int, default=None,
                    help="task: supervision steps at evaluation beyond training (default 2x)")
    ap.add_argument("--infer-recursions", default=None,
                    help="task, with --only: also evaluate with these recursions per step "
                         "(comma list, e.g. 1,2,3,6): test-time depth inside a step")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    base = parse_sets(a.set)
    if a.task:
        from bench.depth_study import parse_difficulties, single, task_study

        diffs = parse_difficulties(a.difficulty)
        tp = {k: int(v) for k, v in parse_sets(a.task_param).items()}
        steps = a.steps or 400
        infer = a.infer_sup or 2 * resolve(a.preset, base).model.N_sup
        if a.only:
            rec = [int(r) for r in a.infer_recursions.split(",")] if a.infer_recursions else None
            single(a.preset, a.task, diffs, base, steps, a.batch, a.eval_every, a.threads,
                   infer, a.only, a.json, a.seed, infer_recursions=rec, **tp)
        else:
            task_study(a.preset, a.task, diffs, base, steps, a.batch, a.eval_every, a.threads,
                       infer, a.json, **tp)
        return
    val, tbytes = val_set(a.preset, a.val_batches)
    if a.only:
        run = resolve(a.preset, base)
        if a.backprop_across_steps and run.model.T_recursion != 1:
            ap.error("--backprop-across-steps needs --set T_recursion=1 (a no-grad recursion "
                     "at the start of each step cuts the graph between steps anyway)")
        if a.backprop_across_steps and run.train.update_mode != "accumulate":
            ap.error("--backprop-across-steps backpropagates once per batch: update_mode must "
                     "be accumulate")
        res = run_config(a.only, a.preset, base, a.steps, a.seconds, a.eval_every,
                         val, tbytes, a.threads, diag=a.diagnose, across=a.backprop_across_steps)
        print(json.dumps({"name": res.name, "config": res.config, "steps": res.steps,
                          "seconds": round(res.seconds, 1), **res.final}))
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(res.__dict__) + "\n")
        return
    study(a, base, val, tbytes)


def deep_plain_layers(preset: str, base: dict[str, Any]) -> int:
    """Layers a plain GPT needs for the recursive model's training FLOPs per token."""
    rec = resolve(preset, base).model
    target = rec.flops_per_token(training=True)
    n = 1
    while resolve(preset, {**base, "recursion": "false", "n_layer": n + 1}).model.flops_per_token(
            training=True) <= target:
        n += 1
    return n


def study(a, base: dict[str, Any], val: list, tbytes: torch.Tensor) -> None:
    """The four configs, the Markdown table and the PNG."""
    steps = a.steps or resolve(a.preset, base).train.max_steps
    plain = {**base, "recursion": "false"}
    results: list[Result] = []
    rec = run_config("(b) recursive", a.preset, base, steps, None, a.eval_every, val, tbytes,
                     a.threads)
    results.append(run_config("(a) plain", a.preset, plain, steps, None, a.eval_every, val,
                              tbytes, a.threads))
    results.append(rec)
    k = deep_plain_layers(a.preset, base)
    results.append(run_config(f"(c) plain {k}L", a.preset, {**plain, "n_layer": k}, steps,
                              None, a.eval_every, val, tbytes, a.threads))
    # (d): the schedule is laid out for as many steps as fit (a's measured speed), then cut at
    # (b)'s training seconds
    per_step = results[0].seconds / results[0].steps
    d_steps = max(steps, int(rec.seconds / per_step * 1.1))
    results.append(run_config("(d) plain, same time", a.preset,
                              {**plain, "max_steps": d_steps}, d_steps, rec.seconds,
                              max(a.eval_every, d_steps // 8), val, tbytes, a.threads))
    report(results, a, base, k)


def report(results: list[Result], a, base: dict[str, Any], k: int) -> None:
    out = REPO / "bench"
    lines = ["## Shakespeare", "",
             f"`{' '.join(sys.argv)}` on {torch.get_num_threads()} thread(s), "
             f"{time.strftime('%Y-%m-%d %H:%M')}. Held-out plays of the shipped corpus; bits "
             "per byte over targets that stand for text (EOS left out). Same seed, same data "
             "order; (c) has as many layers as it takes to match (b)'s training FLOPs/token.",
             "", "| config | params | val bpb | val loss per supervision step | refinement | "
             "tokens | train FLOPs | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        f = r.final
        mc = resolve(a.preset, {k2: v for k2, v in r.config.items() if k2 != "preset"}).model
        lines.append(
            f"| {r.name} | {mc.num_params() / 1e6:.2f}M | {f['val_bpb']:.3f} | "
            + " ".join(f"{x:.3f}" for x in f["val_step_losses"])
            + f" | {100 * f['val_refinement']:+.1f}% | {r.tokens:,} | {r.flops:.2e} | "
            f"{r.seconds:.0f} |")
    a_, b_, c_, d_ = (r.final["val_bpb"] for r in results)
    ref = results[1].final["val_refinement"]
    lines += ["", verdict(a_, b_, c_, d_, k),
              "", f"The recursion's supervision steps refine by {100 * ref:+.1f}% ((L_1 - L_N)/L_1 "
              "on validation). The ablations behind the defaults, and what was tried for "
              "refinement, are in bench/ABLATIONS.md."]
    from bench.depth_study import write_section

    write_section(out / "STUDY.md", "shakespeare", "\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([p["flops"] for p in r.curve], [p["val_bpb"] for p in r.curve], marker="o",
                label=r.name)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("held-out bits per byte")
    ax.set_title("Recursion study (tiny, shipped corpus)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "study.png", dpi=120)
    print("\n".join(lines))
    print(f"wrote {out / 'STUDY.md'} and {out / 'study.png'}")


def verdict(a: float, b: float, c: float, d: float, k: int) -> str:
    """The result in words, whichever way it falls."""
    def cmp(x: float, y: float) -> str:
        return "below" if x < y else "above"
    return (f"At equal parameters and tokens the recursion ends {abs(b - a):.3f} bpb "
            f"{cmp(b, a)} the plain GPT. At equal training FLOPs per token it ends "
            f"{abs(b - c):.3f} bpb {cmp(b, c)} a plain GPT of {k} layers (more parameters). "
            f"Given the recursion's wall-clock, the plain GPT ends {abs(d - b):.3f} bpb "
            f"{cmp(d, b)} it.")

if __name__ == "__main__":
    main()
