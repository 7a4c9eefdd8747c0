"""The recursion on depth tasks: `make study TASK=pointer` (bench/recursion_study.py --task).

On a generated task of data_pipeline/tasks.py (characters as tokens, loss on answer tokens
only, difficulties mixed uniformly in every batch) it trains, with one seed and one data order,
  (a) plain:       the plain GPT of the same parameters (recursion off),
  (b) recursive:   the recursion,
  (c) deep plain:  a plain GPT with as many layers as match (b)'s training FLOPs per token,
  (d) plain+time:  the plain GPT given (b)'s training seconds (so it sees more examples),
and reports exact-match accuracy on the fixed held-out set by difficulty, (b)'s accuracy by
supervision step, and (b) evaluated with more supervision steps than it was trained with.
Before a result is written the causal-leak check runs on (b)'s trained model and config.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipeline.tasks import (  # noqa: E402
    VOCAB,
    answer_correct,
    heldout_set,
    heldout_texts,
    make_task,
    task_batch,
    train_examples,
)
from launcher.engine.config import resolve  # noqa: E402
from launcher.engine.parallelize import build_optimizer, build_scheduler  # noqa: E402
from model import RecursiveGPT  # noqa: E402

TASK_VOCAB = 192  # >= N_TOKENS (characters + perm table entries), a multiple of 64


@dataclass
class TaskSetup:
    """One task instance: what is trained on and the held-out batches it is scored on."""

    task: Any
    difficulties: list[int]  # scored: those with held-out examples
    seq_len: int
    heldout: list[tuple[torch.Tensor, ...]]
    exclude: set[str]
    trained: list[int]  # every difficulty trained on (short tables are trained, not scored)

    @classmethod
    def build(cls, name: str, difficulties: list[int], n_per: int = 128, batch: int = 128,
              **params: Any) -> TaskSetup:
        task = make_task(name, **params)
        seq_len = max(task.length(d) for d in difficulties) - 1
        held = heldout_set(task, difficulties, n_per)
        batches = [task_batch(held[i:i + batch], seq_len) for i in range(0, len(held), batch)]
        scored = sorted({d for d, _ in held})
        return cls(task, scored, seq_len, batches, heldout_texts(task, difficulties, n_per),
                   difficulties)

    def overrides(self) -> dict[str, Any]:
        return {"vocab_size": TASK_VOCAB, "sequence_len": self.seq_len}


@dataclass
class TaskResult:
    name: str
    config: dict[str, Any]
    params: int = 0
    steps: int = 0
    examples: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    curve: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def evaluate_task(model: RecursiveGPT, setup: TaskSetup, n_sup: int | None = None
                  ) -> dict[str, Any]:
    """Exact-match accuracy on the held-out answers by difficulty and by supervision step, and
    the answer loss by step. n_sup: steps to run (default N_sup_inference)."""
    was = model.training
    model.eval()
    n = n_sup or model.config.N_sup_inference
    D = setup.difficulties
    corr = torch.zeros(n, len(D))
    cnt = torch.zeros(len(D))
    loss_sum = torch.zeros(n)
    n_tok = 0
    exit_sum = torch.zeros(n)
    for idx, tgt, aid, diff in setup.heldout:
        y = z = prev = None
        col = torch.tensor([D.index(int(d)) for d in diff])
        for s in range(n):
            st = model.supervision_step(idx, y, z, step=s, prev_loss=prev)
            y, z, prev = st.y, st.z, st.carry
            if st.exit_prob is not None:  # exit_gate: p(exit at s) summed over answer tokens
                exit_sum[s] += float((st.exit_prob * (tgt >= 0)).sum())
            c, k = answer_correct(st.logits, tgt, aid)
            corr[s].index_add_(0, col, c)
            if s == 0:
                cnt.index_add_(0, col, k)
            loss_sum[s] += F.cross_entropy(st.logits.flatten(0, 1), tgt.flatten(),
                                           ignore_index=-1, reduction="sum")
        n_tok += int((tgt >= 0).sum())
    model.train(was)
    acc = corr / cnt.clamp_min(1)                                     # (step, difficulty)
    overall = corr.sum(1) / cnt.sum().clamp_min(1)
    return {"acc": {d: float(acc[-1, i]) for i, d in enumerate(D)},
            "acc_by_step": [float(a) for a in overall],
            "hardest_by_step": [float(a) for a in acc[:, -1]],
            "acc_by_step_difficulty": acc.tolist(),
            "loss_by_step": [float(x) / n_tok for x in loss_sum],
            "exit_by_step": [float(x) / n_tok for x in exit_sum]}


def train_task(name: str, preset: str, overrides: dict[str, Any], setup: TaskSetup,
               steps: int, batch: int, eval_every: int, seconds: float | None = None,
               threads: int = 1, seed: int = 0, log=print) -> tuple[TaskResult, RecursiveGPT]:
    """Train one config on the task for `steps` batches (or until `seconds` of training)."""
    from bench.recursion_study import backward_steps

    torch.set_num_threads(threads)
    over = {**overrides, **setup.overrides(), "max_steps": overrides.get("max_steps", steps)}
    run = resolve(preset, over)
    t, mc = run.train, run.model
    torch.manual_seed(seed)
    model = RecursiveGPT(mc)
    opt = build_optimizer(model, run)
    sched = build_scheduler(opt, run)
    data = train_examples(setup.task, setup.trained, [seed, "train"], setup.exclude)
    res = TaskResult(name, {"preset": preset, **overrides}, params=mc.num_params())
    fpt = mc.flops_per_token(training=True)
    train_s = 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        idx, tgt, _, _ = task_batch([next(data) for _ in range(batch)], setup.seq_len)
        loss = backward_steps(model, opt, sched, t, idx, tgt, mc.N_sup)
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        train_s += time.perf_counter() - t0
        res.steps, res.examples = step, step * batch
        res.flops = res.examples * setup.seq_len * fpt
        done = step == steps or (seconds is not None and train_s >= seconds)
        if step % eval_every == 0 or done:
            ev = evaluate_task(model, setup)
            res.curve.append({"step": step, "examples": res.examples, "flops": res.flops,
                              "seconds": round(train_s, 1), **ev})
            log(f"{name:14s} step {step:4d} {train_s:5.0f}s loss {float(loss):.3f} acc by "
                f"difficulty {fmt_acc(ev['acc'])} by step "
                + " ".join(f"{a:.3f}" for a in ev["acc_by_step"]))
            sys.stdout.flush()
        if done:
            break
    res.seconds = train_s
    res.final = res.curve[-1]
    return res, model


def fmt_acc(acc: dict[int, float]) -> str:
    return " ".join(f"{d}:{a:.3f}" for d, a in acc.items())


def causal_leak_check(model: RecursiveGPT, seq_len: int, n_sup: int | None = None,
                      seed: int = 0) -> float:
    """Largest change of any supervision step's logits at positions <= t when every token
    after t is replaced (t in the middle): 0 up to rounding for a causal model. Raises when a
    later token reaches an earlier position."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    n = n_sup or c.N_sup_inference
    idx = torch.randint(1, len(VOCAB), (2, seq_len), generator=g)
    cut = seq_len // 2
    other = idx.clone()
    other[:, cut + 1:] = torch.randint(1, len(VOCAB), (2, seq_len - cut - 1), generator=g)
    was = model.training
    model.eval()
    worst = 0.0
    with torch.no_grad():
        ya = za = yb = zb = pa = pb = None
        for s in range(n):
            a = model.supervision_step(idx, ya, za, step=s, prev_loss=pa)
            b = model.supervision_step(other, yb, zb, step=s, prev_loss=pb)
            ya, za, yb, zb, pa, pb = a.y, a.z, b.y, b.z, a.carry, b.carry
            worst = max(worst, float((a.logits[:, :cut + 1] - b.logits[:, :cut + 1]).abs().max()))
    model.train(was)
    if worst > 1e-4:
        raise AssertionError(f"causal leak: logits at positions <= {cut} change by {worst:.3g} "
                             "when only later tokens change")
    return worst


def deep_plain_layers(preset: str, base: dict[str, Any], extra: dict[str, Any]) -> int:
    """Layers a plain GPT needs for the recursive config's training FLOPs per token."""
    target = resolve(preset, {**base, **extra}).model.flops_per_token(training=True)
    n = 1
    while resolve(preset, {**base, **extra, "recursion": "false", "n_layer": n + 1}
                  ).model.flops_per_token(training=True) <= target:
        n += 1
    return n


def task_study(preset: str, task: str, difficulties: list[int], base: dict[str, Any],
               steps: int, batch: int, eval_every: int, threads: int, infer_sup: int,
               json_path: str | None = None, **task_params: Any) -> list[TaskResult]:
    """The four configs, the leak check, the inference-depth evaluation, STUDY.md and a PNG."""
    setup = TaskSetup.build(task, difficulties, **task_params)
    plain = {**base, "recursion": "false"}
    results: list[TaskResult] = []
    rec, rec_model = train_task("(b) recursive", preset, base, setup, steps, batch, eval_every,
                                threads=threads)
    leak = causal_leak_check(rec_model, setup.seq_len, n_sup=infer_sup)
    deeper = evaluate_task(rec_model, setup, n_sup=infer_sup)
    results.append(train_task("(a) plain", preset, plain, setup, steps, batch, eval_every,
                              threads=threads)[0])
    results.append(rec)
    k = deep_plain_layers(preset, base, setup.overrides())
    results.append(train_task(f"(c) plain {k}L", preset, {**plain, "n_layer": k}, setup, steps,
                              batch, eval_every, threads=threads)[0])
    per_step = results[0].seconds / results[0].steps
    d_steps = max(steps, int(rec.seconds / per_step * 1.1))
    results.append(train_task("(d) plain, same time", preset, {**plain, "max_steps": d_steps},
                              setup, d_steps, batch, max(eval_every, d_steps // 8),
                              seconds=rec.seconds, threads=threads)[0])
    if json_path:
        with open(json_path, "a") as f:
            for r in results:
                f.write(json.dumps(r.__dict__) + "\n")
    task_report(results, setup, task, preset, base, k, leak, deeper, infer_sup)
    return results


def task_report(results: list[TaskResult], setup: TaskSetup, task: str, preset: str,
                base: dict[str, Any], k: int, leak: float, deeper: dict[str, Any],
                infer_sup: int) -> None:
    D = setup.difficulties
    rec = results[1]
    lines = [f"## Depth task: {task}", "",
             f"`{' '.join(sys.argv)}` on {torch.get_num_threads()} thread(s), "
             f"{time.strftime('%Y-%m-%d %H:%M')}. Task `{setup.task}`, difficulties "
             f"{setup.trained} mixed uniformly in every batch, loss on answer tokens only; "
             "exact-match accuracy on the fixed held-out set "
             f"({sum(len(b[0]) for b in setup.heldout)} examples"
             + (f", difficulties {D}: the shorter ones are a table small enough to train on "
                "whole, not scored" if D != setup.trained else "") + "). "
             f"{chance_note(setup.task)} Seconds are training seconds on a 2-core machine "
             "shared with other sessions: compare them only within one run.", "",
             "| config | params | " + " | ".join(f"acc d={d}" for d in D)
             + " | acc by supervision step | examples | train FLOPs | seconds |",
             "|---|---|" + "---|" * len(D) + "---|---|---|---|"]
    for r in results:
        f = r.final
        lines.append(f"| {r.name} | {r.params / 1e6:.3f}M | "
                     + " | ".join(f"{f['acc'][d]:.3f}" for d in D)
                     + " | " + " ".join(f"{a:.3f}" for a in f["acc_by_step"])
                     + f" | {r.examples:,} | {r.flops:.2e} | {r.seconds:.0f} |")
    a, b, c, d = (r.final["acc"][D[-1]] for r in results)
    hb = rec.final["hardest_by_step"]
    n_tr = len(rec.final["acc_by_step"])
    lines += ["", f"On the hardest difficulty ({D[-1]}) the recursion reaches {b:.3f}: "
              f"{100 * (b - a):+.1f} points against the plain GPT of the same parameters, "
              f"{100 * (b - c):+.1f} against the {k}-layer plain GPT of its training FLOPs, "
              f"{100 * (b - d):+.1f} against the plain GPT given its seconds. Its accuracy on "
              f"that difficulty by supervision step: {' '.join(f'{x:.3f}' for x in hb)} "
              f"({100 * (hb[-1] - hb[0]):+.1f} points from step 1 to {n_tr}).", "",
              f"Depth at inference: trained with {n_tr} supervision steps, evaluated with "
              f"{infer_sup}: accuracy on difficulty {D[-1]} by step "
              + " ".join(f"{x:.3f}" for x in deeper["hardest_by_step"])
              + "; answer loss by step " + " ".join(f"{x:.3f}" for x in deeper["loss_by_step"])
              + ".", "",
              f"Causal-leak check on (b)'s trained model ({infer_sup} steps, every step's "
              f"logits at positions <= t against a copy with every later token replaced): "
              f"passed, largest change {leak:.1e}."]
    write_section(REPO / "bench" / "STUDY.md", f"task:{task}", "\n".join(lines))
    plot(results, setup, task, deeper)
    print("\n".join(lines))


def chance_note(task: Any) -> str:
    if task.name == "pointer":
        return (f"Chance: 1/{task.n_chains} for a model that knows the answer is one of the "
                "chains' roots.")
    if task.name == "perm":
        return f"Chance: 1/{task.n_symbols} per answer."
    if task.name == "cycle":
        return f"Chance: 1/{task.n_symbols - 1} per answer (never the query itself)."
    if task.name == "group":
        return f"Chance: 1/{len(task.elements())} per answer (the group's elements)."
    return "Chance: 10^-(k+1) for a k-digit sum (every digit of the sum must be right)."


def write_section(path: Path, key: str, body: str) -> None:
    """Replace (or append) the block between <!-- key --> markers, keeping the rest."""
    start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
    text = path.read_text() if path.exists() else "# Recursion study\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        pre, rest = text.split(start, 1)
        text = pre + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def plot(results: list[TaskResult], setup: TaskSetup, task: str, deeper: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    D = setup.difficulties
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        ax1.plot(D, [r.final["acc"][d] for d in D], marker="o", label=r.name)
    ax1.set_xlabel("difficulty")
    ax1.set_ylabel("held-out exact-match accuracy")
    ax1.set_xticks(D)
    ax1.set_ylim(0, 1.02)
    ax1.grid(alpha=0.3)
    ax1.legend()
    acc = deeper["acc_by_step_difficulty"]
    steps = range(1, len(acc) + 1)
    n_tr = len(results[1].final["acc_by_step"])
    for i, d in enumerate(D):
        ax2.plot(steps, [row[i] for row in acc], marker="o", label=f"difficulty {d}")
    ax2.axvline(n_tr + 0.5, color="grey", ls="--", lw=1)
    ax2.text(n_tr + 0.6, 0.05, "beyond trained depth", color="grey", fontsize=8)
    ax2.set_xlabel("supervision step")
    ax2.set_ylabel("accuracy, (b) recursive")
    ax2.set_ylim(0, 1.02)
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.suptitle(f"Depth task {task}: {setup.task}")
    fig.tight_layout()
    out = REPO / "bench" / f"study_{task}.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def single(preset: str, task: str, difficulties: list[int], base: dict[str, Any], steps: int,
           batch: int, eval_every: int, threads: int, infer_sup: int | None,
           name: str, json_path: str | None = None, seed: int = 0,
           infer_recursions: list[int] | None = None, **task_params: Any) -> TaskResult:
    """One config (ablations): train, print accuracy by step, leak-check it. infer_recursions:
    also evaluate (and leak-check) with that many recursions per supervision step (fixed
    depth), the trained weights unchanged: does depth at inference pay inside a step?"""
    setup = TaskSetup.build(task, difficulties, **task_params)
    res, model = train_task(name, preset, base, setup, steps, batch, eval_every,
                            threads=threads, seed=seed)
    if infer_sup:
        ev = evaluate_task(model, setup, n_sup=infer_sup)
        leak = causal_leak_check(model, setup.seq_len, n_sup=infer_sup)
        res.final["inference_depth"] = {"n_sup": infer_sup, **ev, "leak": leak}
        print(f"{name}: {infer_sup} steps at inference: hardest by step "
              + " ".join(f"{x:.3f}" for x in ev["hardest_by_step"]) + " loss by step "
              + " ".join(f"{x:.3f}" for x in ev["loss_by_step"]) + f"; leak check {leak:.1e}")
    trained = model.config
    for r in infer_recursions or []:
        model.config = trained.replace(T_recursion=r, depth_sampling="fixed",
                                       backprop_recursions=1)
        ev = evaluate_task(model, setup, n_sup=trained.N_sup_inference)
        leak = causal_leak_check(model, setup.seq_len)
        res.final.setdefault("inference_recursions", {})[r] = {**ev, "leak": leak}
        print(f"{name}: {r} recursions per step at inference: acc by difficulty "
              + fmt_acc(ev["acc"]) + " loss by step "
              + " ".join(f"{x:.3f}" for x in ev["loss_by_step"]) + f"; leak check {leak:.1e}")
    model.config = trained
    print(json.dumps({"name": name, "config": res.config, "steps": res.steps,
                      "seconds": round(res.seconds, 1), "acc": res.final["acc"],
                      "acc_by_step": res.final["acc_by_step"],
                      "hardest_by_step": res.final["hardest_by_step"],
                      "loss_by_step": res.final["loss_by_step"],
                      "exit_by_step": res.final["exit_by_step"]}))
    if json_path:
        with open(json_path, "a") as f:
            f.write(json.dumps(res.__dict__) + "\n")
    return res


def parse_difficulties(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


if __name__ == "__main__":
    rng = random.Random(0)
    s = TaskSetup.build("pointer", [1, 2])
    print(s.seq_len, len(s.heldout))
