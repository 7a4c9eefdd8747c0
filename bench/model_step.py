"""Model step benchmark on CPU: forward+backward tokens/s and peak activation memory.

    python bench/model_step.py            # everything (~5 minutes on 2 cores)
    python bench/model_step.py --quick    # tiny alone, a 2 x 2 memory grid: a smoke run

Every figure comes from the path the trainer runs: N_sup supervision steps, each backpropagated
as soon as it finishes (model.supervision_step + objective.backward()); no optimizer step.

How memory is measured: each configuration runs in a fresh subprocess (python bench/model_step.py
--child SPEC). The child builds the model, runs one warm-up supervision step (so every .grad
buffer exists), then resets the kernel's peak-RSS counter (`5` > /proc/self/clear_refs, which
resets VmHWM) and reads VmRSS as the baseline; after the measured training step, VmHWM - baseline
is the peak memory the step added on top of weights and gradients: activations, logits and
temporaries. The children run with MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns every
freed tensor buffer to the kernel at once (no heap caching hiding or inflating the peak); that
costs some speed, so tokens/s is measured in separate children with the default allocator.
A control row runs the one-graph path (model(idx, targets).loss.backward()), whose peak must grow
with N_sup: it shows that the method sees activation memory at all.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    read_status_kb,
    reset_peak_rss,
    supervision_backward,
    write_json,
)

MIB = 1024 * 1024


# ----------------------------------------------------------------------------- child process
def child(spec: dict) -> dict:
    import torch
    from torch.utils.checkpoint import checkpoint

    from model import GPTConfig, RecursiveGPT

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = GPTConfig.preset(spec["preset"], **spec["overrides"])
    model = RecursiveGPT(cfg)
    if spec.get("checkpointing"):
        model.set_activation_checkpointing(
            lambda f, *a: checkpoint(f, *a, use_reentrant=False))
    B, T = spec["batch"], cfg.sequence_len
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    tgt = torch.randint(0, cfg.vocab_size, (B, T))

    def train_step() -> None:
        if spec.get("one_graph"):
            model(idx, tgt).loss.backward()
            return
        supervision_backward(model, idx, tgt, cfg.N_sup)

    # warm-up: one graded supervision step allocates the .grad buffers (kept: zero, not None)
    model.supervision_step(idx, targets=tgt).objective.backward()
    model.zero_grad(set_to_none=False)
    gc.collect()
    base_kb = read_status_kb("VmRSS")
    resettable = reset_peak_rss()
    t0 = time.perf_counter()
    for _ in range(spec["steps"]):
        train_step()
    seconds = (time.perf_counter() - t0) / spec["steps"]
    peak_kb = read_status_kb("VmHWM") if resettable else 0
    return {
        "seconds_per_step": seconds,
        "tokens_per_s": B * T / seconds,
        "model_gflops_per_s": B * T * model.flops_per_token(training=True) / seconds / 1e9,
        "peak_delta_mib": (peak_kb - base_kb) / 1024 if resettable else float("nan"),
        "baseline_mib": base_kb / 1024,
        "params_total_m": cfg.num_params(non_embedding=False) / 1e6,
    }


# ----------------------------------------------------------------------------- parent
def run(spec: dict, memory: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> float:
    return max(values) / min(values) - 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run (tiny only, fewer cells)")
    # One intra-op thread by default: on a 2-core machine that is also running other work, two
    # OpenMP threads wait on each other at every op and run 5-20x slower than one.
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="fresh processes per throughput row (the median is reported)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the figures here (for bench/report.py)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    th = args.threads
    print(f"trmgpt model step bench: torch {torch.__version__}, CPU, {th} thread(s), "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("forward+backward, per-step backward path (supervision_step + objective.backward()),"
          " no optimizer step\n")

    # ---- throughput: tiny, and A with a short sequence (--quick: tiny alone, a smaller grid)
    rows = [("tiny", dict(preset="tiny", overrides={}, batch=4, steps=2)),
            ("A, seq 64", dict(preset="A", overrides={"sequence_len": 64}, batch=1, steps=1))]
    n_sups, ts = (1, 2, 4, 8), (1, 2, 3)
    if args.quick:
        rows = [("tiny", dict(preset="tiny", overrides={}, batch=2, steps=1))]
        n_sups, ts, args.repeats = (1, 4), (2,), 1
    print(f"{'config':<10} {'batch x seq':>11} {'params':>8} {'s/step':>8} {'tokens/s':>9} "
          f"{'model GFLOP/s':>13} {'peak act. MiB':>13}")
    out: dict = {"threads": th, "quick": args.quick, "throughput": []}
    for name, spec in rows:
        spec["threads"] = th
        # tokens/s: the median of --repeats fresh processes (one may meet a busy neighbour);
        # A's row once: its one step takes ~20 s, which evens out the neighbours by itself
        runs = [run(spec, memory=False)
                for _ in range(args.repeats if spec["preset"] == "tiny" else 1)]
        speed = sorted(runs, key=lambda r: r["seconds_per_step"])[len(runs) // 2]
        mem = run(dict(spec, steps=1), memory=True)
        seq = 256 if spec["preset"] == "tiny" else spec["overrides"]["sequence_len"]
        out["throughput"].append({"config": name, "batch": spec["batch"], "seq": seq,
                                  "params_total_m": speed["params_total_m"],
                                  "s_per_step": speed["seconds_per_step"],
                                  "tokens_per_s": speed["tokens_per_s"],
                                  "all_s_per_step": [r["seconds_per_step"] for r in runs],
                                  "model_gflop_per_s": speed["model_gflops_per_s"],
                                  "peak_act_mib": mem["peak_delta_mib"]})
        print(f"{name:<10} {spec['batch']:>5} x {seq:<4} {speed['params_total_m']:>7.1f}M "
              f"{speed['seconds_per_step']:>8.2f} {speed['tokens_per_s']:>9.1f} "
              f"{speed['model_gflops_per_s']:>13.1f} {mem['peak_delta_mib']:>13.1f}")

    # ---- peak memory vs N_sup and T_recursion: tiny's blocks at a batch where activations
    # dominate (vocab 4096, seq 256)
    mem_b = 4 if args.quick else 16
    print(f"\npeak memory added by one training step, MiB (tiny, batch {mem_b} x seq 256; "
          "fresh process per cell)")
    print(f"{'N_sup':>6} " + " ".join(f"{'T=' + str(t):>9}" for t in ts))
    table: dict[tuple[int, int], float] = {}
    for n_sup in n_sups:
        cells = []
        for t in ts:
            spec = dict(preset="tiny", overrides={"N_sup": n_sup, "T_recursion": t},
                        batch=mem_b, steps=1, threads=th)
            table[n_sup, t] = run(spec, memory=True)["peak_delta_mib"]
            cells.append(f"{table[n_sup, t]:>9.1f}")
        print(f"{n_sup:>6} " + " ".join(cells))
    by_nsup = max(spread([table[n, t] for n in n_sups]) for t in ts)
    by_t = max(spread([table[n, t] for t in ts]) for n in n_sups)
    worst = max(by_nsup, by_t)
    print(f"largest growth across N_sup (any T): {by_nsup:+.1%}; across T (any N_sup): "
          f"{by_t:+.1%}; requirement <= 10%: {'PASS' if worst <= 0.10 else 'FAIL'}")
    out["memory"] = {"batch": mem_b, "cells": [{"N_sup": n, "T": t, "peak_mib": v}
                                               for (n, t), v in table.items()],
                     "growth_n_sup": by_nsup, "growth_t": by_t, "meets_target": worst <= 0.10}

    # ---- activation checkpointing, and the one-graph control
    base = dict(preset="tiny", overrides={"N_sup": 4, "T_recursion": 2}, batch=mem_b, steps=1,
                threads=th)
    off = run(base, memory=True)
    on = run(dict(base, checkpointing=True), memory=True)
    print(f"\nactivation checkpointing (tiny, N_sup 4, T 2, batch {mem_b}): "
          f"off {off['peak_delta_mib']:.1f} MiB, on {on['peak_delta_mib']:.1f} MiB; "
          f"s/step off {off['seconds_per_step']:.2f}, on {on['seconds_per_step']:.2f}")
    out["checkpointing"] = [{"config": f"tiny, N_sup 4, T 2, batch {mem_b}",
                             "off_mib": off["peak_delta_mib"], "on_mib": on["peak_delta_mib"],
                             "off_s": off["seconds_per_step"], "on_s": on["seconds_per_step"]}]
    if not args.quick:
        a_ac = dict(preset="A", overrides={"sequence_len": 128, "N_sup": 2, "vocab_size": 4096},
                    batch=1, steps=1, threads=th)
        off, on = run(a_ac, memory=True), run(dict(a_ac, checkpointing=True), memory=True)
        name = "A's blocks, seq 128, N_sup 2, vocab 4096, batch 1"
        print(f"activation checkpointing ({name}): off {off['peak_delta_mib']:.1f} MiB, on "
              f"{on['peak_delta_mib']:.1f} MiB; s/step off {off['seconds_per_step']:.2f}, on "
              f"{on['seconds_per_step']:.2f}")
        out["checkpointing"].append({"config": name, "off_mib": off["peak_delta_mib"],
                                     "on_mib": on["peak_delta_mib"],
                                     "off_s": off["seconds_per_step"],
                                     "on_s": on["seconds_per_step"]})
    control = {n: run(dict(base, overrides={"N_sup": n, "T_recursion": 2}, one_graph=True),
                      memory=True)["peak_delta_mib"] for n in (1, 4)}
    print(f"control, one graph (model(idx, targets).loss.backward(), T 2): "
          f"N_sup 1 {control[1]:.1f} MiB, N_sup 4 {control[4]:.1f} MiB "
          f"(per-step path at N_sup 4: {table[4, 2]:.1f} MiB)")
    out["one_graph_control"] = {"n_sup_1_mib": control[1], "n_sup_4_mib": control[4],
                                "per_step_n_sup_4_mib": table[4, 2]}
    write_json(args.json, out)


if __name__ == "__main__":
    main()
