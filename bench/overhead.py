"""Trainer overhead: the real training step against a bare PyTorch loop of the same model.

    python bench/overhead.py [--preset tiny] [--rounds 6] [--steps 2] [--json FILE] [--quick]

Real: what `launcher train` runs per step on one rank (gloo, CPU), built by launcher.engine.train's
own
Trainer: the DeepSpeed engine (ZeRO 0 or 1) through launcher.engine.step.train_step, the real data
loader
(the preset's data spec, streamed and tokenized on the fly), the EMA update, and the metrics row
(all-reduce of the step losses, metrics.jsonl, wandb offline, the progress line) logged at EVERY
step (log_every 1: the most logging a run can do). Evaluation and checkpoints are periodic, not
per step, and are left out.

Bare: the same model (same config and initial weights), the same batch shape (one batch drawn
from the same loader, reused), the same supervision schedule (N_sup steps, each
model.supervision_step + objective.backward() at once), torch AdamW with the launcher's own
parameter groups (launcher.engine.parallelize.build_optimizer), opt.step(), opt.zero_grad(). Nothing
else: no clipping, no scheduler, no data, no logging, so it is the leanest loop of this model.

All variants live in one process and run interleaved (bare, ZeRO-0, ZeRO-1, bare, ...), `--steps`
training steps per turn; the ratio is bare seconds per step / real seconds per step (medians over
rounds; the median of the per-round ratios is printed beside it). With --profile the script also
runs cProfile over a few real steps and prints where their time goes, beside the bare loop's.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    interleaved,
    median,
    setup,
    supervision_backward,
    write_json,
)

TARGET = 0.95


def build_real(preset: str, zero: int, root: Path, overrides: dict):
    """A Trainer exactly as launcher.engine.train.train() builds it, on a fresh run folder."""
    from launcher.engine.checkpoint import run_checkpointer
    from launcher.engine.config import resolve
    from launcher.engine.dist import init_distributed
    from launcher.engine.train import Trainer

    info = init_distributed()
    run = resolve(preset, {"zero_stage": zero, "log_every": 1, "max_steps": 100000,
                           **overrides})
    run_path = root / f"zero{zero}"
    trainer = Trainer(run, run_path, info, run_checkpointer(run, run_path, info), False)
    trainer.open_run_dir(resumed=False)
    state = {"step": 0}

    def step() -> None:  # launcher.engine.train.train()'s loop body, minus eval and checkpoints
        state["step"] += 1
        ok = trainer.train_one(state["step"])
        trainer.log_progress(state["step"], ok)

    return run, trainer, step


def build_bare(run, batch):
    import torch

    from launcher.engine.parallelize import build_optimizer
    from model import RecursiveGPT

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.train.seed)  # parallelize() builds its model from the same seed
        model = RecursiveGPT(run.model)
    opt = build_optimizer(model, run)
    idx, tgt = batch
    n_sup = run.model.N_sup

    def step() -> None:
        supervision_backward(model, idx, tgt, n_sup)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profile(fn, calls: int) -> tuple[float, dict]:
    """Seconds per call under cProfile, and each function's own time per call."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    seconds = (time.perf_counter() - t0) / calls
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    return seconds, {k: (v[1] / calls, v[2] / calls) for k, v in stats.items()}


def extra_time(real: dict, bare: dict, top: int = 12) -> list[dict]:
    """The functions the real loop runs and the bare one never does, by their own time per step:
    where the trainer's extra time goes. (Functions both run, such as the model's matmuls, differ
    between the two profiles by noise only and are left out.)"""
    rows = []
    for key, (calls, tot) in real.items():
        if key in bare:
            continue
        file, line, name = key
        if file == "~":
            where = name.strip("<>")
        else:
            where = f"{file.split('site-packages/')[-1].replace(str(REPO) + '/', '')}:{line}" \
                    f"({name})"
        rows.append({"function": where, "calls": calls, "ms": 1e3 * tot})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--rounds", type=int, default=6, help="timed turns of each variant")
    ap.add_argument("--steps", type=int, default=2, help="training steps per turn")
    ap.add_argument("--zero", default="0,1", help="ZeRO stages of the real trainer")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config overrides for both loops")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile a few steps of each")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 2 rounds")
    ap.add_argument("--json")
    args = ap.parse_args()
    setup(args.threads)
    os.environ.setdefault("WANDB_REINIT", "create_new")  # one offline wandb run per trainer
    os.environ.setdefault("WANDB_SILENT", "true")

    from launcher.engine.config import parse_overrides

    overrides = parse_overrides(args.set, [])
    if args.quick:
        overrides = {"sequence_len": 32, "device_batch_size": 1, "N_sup": 2, **overrides}
        args.rounds, args.steps = 2, 1
    stages = [int(s) for s in args.zero.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        variants, trainers = {}, {}
        run = None
        for zero in stages:
            run, trainer, step = build_real(args.preset, zero, Path(tmp), overrides)
            variants[f"ZeRO-{zero}"], trainers[zero] = step, trainer
        first = trainers[stages[0]]
        batch = next(iter(first.loader))  # the same shape the real loop draws (and real data)
        variants = {"bare": build_bare(run, batch), **variants}

        def turns(fn):
            return lambda: [fn() for _ in range(args.steps)]

        print(f"trainer overhead: preset {args.preset} {overrides or ''}, batch "
              f"{tuple(batch[0].shape)}, N_sup {run.model.N_sup}, T {run.model.T_recursion}, "
              f"n_loops {run.model.n_loops}, {run.train.precision}, 1 rank (gloo), "
              f"{args.rounds} rounds x {args.steps} steps, interleaved", flush=True)
        times = interleaved({k: turns(v) for k, v in variants.items()}, args.rounds, warmup=1)
        per_step = {k: [t / args.steps for t in v] for k, v in times.items()}
        med = {k: median(v) for k, v in per_step.items()}
        rows = []
        print(f"\n{'loop':<8} {'s/step (median)':>15} {'steps/s':>8} {'ratio bare/real':>16} "
              f"{'median per-round ratio':>23}  target >= {TARGET}")
        for k in variants:
            ratio = med["bare"] / med[k]
            per_round = median([b / r for b, r in zip(per_step["bare"], per_step[k],
                                                       strict=True)])
            ok = k == "bare" or ratio >= TARGET
            rows.append({"loop": k, "s_per_step": med[k], "steps_per_s": 1 / med[k],
                         "ratio": ratio, "ratio_per_round": per_round,
                         "all_s_per_step": per_step[k], "meets_target": ok})
            verdict = "" if k == "bare" else ("PASS" if ok else "MISS")
            print(f"{k:<8} {med[k]:>15.3f} {1 / med[k]:>8.3f} {ratio:>16.3f} {per_round:>23.3f}"
                  f"  {verdict}")

        profiles = {}
        if args.profile:
            calls = 3 if args.quick else 2
            prof = {k: profile(fn, calls) for k, fn in variants.items()}
            for k in variants:
                if k == "bare":
                    continue
                rows_k = extra_time(prof[k][1], prof["bare"][1])
                total = sum(r["ms"] for r in extra_time(prof[k][1], prof["bare"][1], 10**6))
                profiles[k] = {"s_per_step": prof[k][0], "bare_s_per_step": prof["bare"][0],
                               "only_real_ms": total, "top": rows_k}
                print(f"\ncProfile, {k} ({prof[k][0]:.3f} s/step; bare {prof['bare'][0]:.3f}): "
                      f"functions only the real loop runs, {total:.1f} ms/step in all; the top:")
                for r in rows_k:
                    print(f"  {r['ms']:>8.2f} ms/step  {r['calls']:>5.0f} calls  {r['function']}")
        for trainer in trainers.values():
            trainer.logger.finish()

    write_json(args.json, {
        "preset": args.preset, "overrides": overrides, "batch": list(batch[0].shape),
        "N_sup": run.model.N_sup, "T_recursion": run.model.T_recursion,
        "n_loops": run.model.n_loops, "precision": run.train.precision,
        "rounds": args.rounds, "steps_per_turn": args.steps, "target": TARGET,
        "rows": rows, "profiles": profiles})


if __name__ == "__main__":
    main()
