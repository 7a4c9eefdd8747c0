"""Does the recursion cost what the FLOP count says? Step time over n_loops x T x N_sup.

    python bench/cost_model.py [--rounds 3] [--json FILE] [--quick]

For every configuration of n_loops {1, 2, 4} x T_recursion {1, 2, 3} x N_sup {1, 4, 8} (27), one
real training step through the DeepSpeed engine (launcher.engine.parallelize +
launcher.engine.step.train_step,
fp32, one rank, ZeRO-0: ZeRO-1's own cost is a fixed cost per optimizer update, measured by
bench/overhead.py, not a cost of the recursion), on one fixed random batch. The figure of merit
is seconds per training FLOP: step time / (tokens x model.flops_per_token(training=True)). If
the recursion had a hidden cost per application (or the no-grad passes cost more or less than
the count's 1x against the graded passes' 3x), it would move with n_loops, T or N_sup. The
claim holds if every configuration is within 15% of the median configuration.

The shape makes the shared stack dominate: n_embd 256 (2 layers, 4 heads, 2 KV heads), sequence
256, batch 4 (1024 tokens, so that the optimizer update, a fixed cost per step, is a small part
of even the smallest configuration), vocabulary 512 (the lm_head is ~4% of a step's FLOPs). All
27 engines are built first; then `--rounds` sweeps each run every configuration once, in a fresh
random order per sweep (drift in the machine's load spreads over all of them); the median of the
sweeps is reported (the first sweep includes each engine's first step: the median drops it).

A least-squares fit t = a_g·graded FLOPs + a_n·no-grad FLOPs + b says where a deviation comes
from: a_g/a_n = 1 if a graded pass costs the count's 3x of a no-grad pass, and b is the fixed
cost per training step (optimizer update, engine calls), which the FLOP count leaves out.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, setup, write_json  # noqa: E402

TOLERANCE = 0.15
SHAPE = {"n_layer": 2, "n_embd": 256, "n_head": 4, "n_kv_head": 2, "sequence_len": 256,
         "vocab_size": 512, "device_batch_size": 4}
QUICK_SHAPE = {"n_layer": 1, "n_embd": 64, "n_head": 2, "n_kv_head": 1, "sequence_len": 16,
               "vocab_size": 128, "device_batch_size": 1}


def build(shape: dict, n_loops: int, T: int, n_sup: int):
    """One engine of this configuration; returns a function running one training step."""
    import torch

    from launcher.engine.config import resolve
    from launcher.engine.parallelize import parallelize
    from launcher.engine.step import train_step

    run = resolve("tiny", {**shape, "n_loops": n_loops, "T_recursion": T, "N_sup": n_sup,
                           "N_sup_inference": n_sup, "zero_stage": 0, "precision": "fp32",
                           "activation_checkpointing": False})
    engine, model, _, _ = parallelize(run, 1)
    g = torch.Generator().manual_seed(0)
    B, L, V = run.train.device_batch_size, run.model.sequence_len, run.model.vocab_size
    batch = (torch.randint(0, V, (B, L), generator=g), torch.randint(0, V, (B, L), generator=g))

    def step() -> None:
        train_step(engine, [batch], n_sup, run.train.update_mode)

    c = run.model
    total = model.flops_per_token(training=True) * B * L
    # the no-grad recursions' share (forward only): block applications x FLOPs of one of them
    one = c.replace(n_loops=1, T_recursion=1, N_sup=1, N_sup_inference=1)
    per_block = (one.flops_per_token(training=False) - 2 * c.n_embd * c.vocab_size) // (
        one.applications_per_recursion)
    nograd = c.N_sup * (c.T_recursion - 1) * c.applications_per_recursion * per_block * B * L
    return step, total, nograd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="sweeps over all configurations")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="smoke run: a tiny shape, 1 sweep")
    ap.add_argument("--json")
    args = ap.parse_args()
    setup(args.threads)
    from launcher.engine.dist import init_distributed

    init_distributed()
    shape = QUICK_SHAPE if args.quick else SHAPE
    if args.quick:
        args.rounds = 1
    grid = list(itertools.product((1, 2, 4), (1, 2, 3), (1, 4, 8)))  # n_loops, T, N_sup
    steps, flops, nograd = {}, {}, {}
    for cfg in grid:
        steps[cfg], flops[cfg], nograd[cfg] = build(shape, *cfg)
    print(f"cost model: {len(grid)} configurations, shape {shape}, ZeRO-0 fp32, 1 rank, "
          f"{args.rounds} sweeps in random order", flush=True)
    times: dict[tuple, list[float]] = {cfg: [] for cfg in grid}
    rng = random.Random(0)
    for r in range(args.rounds):
        order = grid[:]
        rng.shuffle(order)
        t_sweep = time.perf_counter()
        for cfg in order:
            t0 = time.perf_counter()
            steps[cfg]()
            times[cfg].append(time.perf_counter() - t0)
        print(f"  sweep {r + 1}: {time.perf_counter() - t_sweep:.1f} s", flush=True)

    sec = {cfg: median(times[cfg]) for cfg in grid}
    per_flop = {cfg: sec[cfg] / flops[cfg] for cfg in grid}
    ref = median(list(per_flop.values()))
    rows = []
    print(f"\n{'n_loops':>7} {'T':>2} {'N_sup':>5} {'GFLOP/step':>10} {'s/step':>8} "
          f"{'GFLOP/s':>8} {'s/FLOP vs median':>17}")
    for cfg in grid:
        rel = per_flop[cfg] / ref
        rows.append({"n_loops": cfg[0], "T": cfg[1], "N_sup": cfg[2],
                     "gflop_per_step": flops[cfg] / 1e9, "s_per_step": sec[cfg],
                     "all_s_per_step": times[cfg], "gflop_per_s": flops[cfg] / sec[cfg] / 1e9,
                     "relative": rel})
        print(f"{cfg[0]:>7} {cfg[1]:>2} {cfg[2]:>5} {flops[cfg] / 1e9:>10.2f} {sec[cfg]:>8.3f} "
              f"{flops[cfg] / sec[cfg] / 1e9:>8.1f} {rel:>17.3f}")
    rels = [r["relative"] for r in rows]
    worst = max(abs(x - 1) for x in rels)
    ok = worst <= TOLERANCE
    fit = fit_costs(grid, sec, flops, nograd)
    print(f"\nfit t = a_g*graded + a_n*no-grad FLOPs + b: a_g/a_n {fit['graded_over_nograd']:.3f}"
          f" (1 = a graded pass costs the count's 3x of a no-grad pass), b {1e3 * fit['b']:.1f} ms"
          f" per step; largest residual {fit['worst_residual']:+.1%}")
    print(f"seconds per FLOP: max/min {max(rels) / min(rels):.3f}; largest deviation from the "
          f"median configuration {worst:+.1%} (tolerance {TOLERANCE:.0%}): "
          f"{'PASS' if ok else 'MISS'}")
    write_json(args.json, {"shape": shape, "zero_stage": 0, "precision": "fp32",
                           "rounds": args.rounds, "tolerance": TOLERANCE, "rows": rows,
                           "max_over_min": max(rels) / min(rels), "worst_deviation": worst,
                           "meets_target": ok, "fit": fit})


def fit_costs(grid, sec, flops, nograd) -> dict:
    """Least squares t = a_g·graded + a_n·nograd + b over the configurations, each weighted by
    1/t (relative errors: the small configurations count as much as the large ones)."""
    import numpy as np

    X = np.array([[flops[c] - nograd[c], nograd[c], 1.0] for c in grid])
    t = np.array([sec[c] for c in grid])
    coef, *_ = np.linalg.lstsq(X / t[:, None], np.ones_like(t), rcond=None)
    a_g, a_n, b = (float(x) for x in coef)
    resid = X @ coef / t - 1
    return {"a_graded": a_g, "a_nograd": a_n, "b": b,
            "graded_over_nograd": a_g / a_n if a_n else float("nan"),
            "worst_residual": float(resid[np.argmax(np.abs(resid))])}


if __name__ == "__main__":
    main()
