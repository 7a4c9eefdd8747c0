"""The GPU training path: presets A and B on one device, bf16, SDPA flash attention, with and
without torch.compile of the stack, ZeRO 0-3 on one rank, activation checkpointing on and off.

    python bench/gpu.py [--presets A,B] [--configs base,compile,...] [--steps 3] [--json FILE]

On a CUDA machine it runs the presets' real shapes (sequence 1024, vocabulary 50304, their
micro-batch); without one it runs the same code on a tiny shape of each preset (so the script
never rots; those figures say nothing about a GPU). It needs nothing from the network: the token
stream is synthetic (seeded random ids), which costs exactly what real tokens cost.

Per configuration, in a fresh process (so one configuration's memory, compiled graphs or a failed
allocation never leak into the next): build the engine with launcher.engine.parallelize, one warm-up
training step (torch.compile compiles here; its time is reported apart), then --steps timed
training steps through launcher.engine.step.train_step (the median step). Figures: tokens/s, MFU
against
the device's dense bf16 peak (launcher.engine.metrics.GPU_PEAK: H100 SXM 989 TFLOP/s, A100 312;
none on
CPU), peak memory (CUDA: max allocated; CPU: the process's peak RSS), and for the configurations
marked `search` the largest micro-batch that fits: doubling from the preset's micro-batch until
a step runs out of memory, then bisecting (each try is one supervision step with its backward
and engine.step(): the activation peak of a training step, which does not grow with N_sup or T).
Without a GPU nothing runs out of memory: the search stops at --max-batch and says so.

Configurations (one factor at a time from each preset's own training config; A and B train with
ZeRO-1 and activation checkpointing): base, compile, no-ckpt, compile+no-ckpt, zero0, zero2,
zero3.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, median, read_status_kb, reset_peak_rss, setup, write_json  # noqa: E402

# name -> (changes from the preset's training config, search the largest micro-batch)
CONFIGS: dict[str, tuple[dict, bool]] = {
    "base": ({}, True),
    "compile": ({"compile": True}, False),
    "no-ckpt": ({"activation_checkpointing": False}, True),
    "compile+no-ckpt": ({"compile": True, "activation_checkpointing": False}, False),
    "zero0": ({"zero_stage": 0}, False),
    "zero2": ({"zero_stage": 2}, False),
    "zero3": ({"zero_stage": 3}, False),
}
# the CPU stand-in for a preset: its recursion and objective, a tiny width, length and vocabulary
CPU_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "sequence_len": 64,
             "vocab_size": 512, "N_sup": 2, "N_sup_inference": 2, "device_batch_size": 2}


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def largest_batch(fits, start: int, cap: int) -> tuple[int, bool]:
    """The largest b <= cap with fits(b) True, assuming fits is monotone and fits(start) holds:
    double from start, then bisect between the last fit and the first failure. Returns (b,
    capped): capped means nothing failed below the cap."""
    good, bad = start, None
    b = start
    while bad is None:
        b = min(2 * good, cap)
        if b == good:
            return good, True
        if fits(b):
            good = b
        else:
            bad = b
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good, False


# ----------------------------------------------------------------------------- child process
def child(spec: dict) -> dict:
    setup(spec["threads"])
    import torch

    from launcher.engine.config import resolve
    from launcher.engine.dist import init_distributed
    from launcher.engine.metrics import peak_flops_per_device
    from launcher.engine.parallelize import parallelize
    from launcher.engine.step import train_step

    init_distributed()
    cuda = torch.cuda.is_available()
    over = {"precision": "bf16", **({} if cuda else CPU_SHAPE), **spec["changes"]}
    run = resolve(spec["preset"], over)
    t, c = run.train, run.model
    engine, model, _, _ = parallelize(run, 1)
    dev = engine.device
    g = torch.Generator().manual_seed(0)
    B, L = t.device_batch_size, c.sequence_len

    def batch(b: int):
        ids = torch.randint(0, c.vocab_size, (b, L + 1), generator=g)
        return ids[:, :-1].to(dev), ids[:, 1:].to(dev)

    batches = [batch(B)]
    backend = sdpa_context(spec["flash"])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    out: dict = {"preset": spec["preset"], "config": spec["name"], "device": str(dev),
                 "micro_batch": B, "seq": L, "zero": t.zero_stage,
                 "ckpt": t.activation_checkpointing, "compile": t.compile,
                 "precision": run.train.precision, "sdpa": backend[1]}
    with backend[0]():
        t0 = time.perf_counter()
        train_step(engine, batches, c.N_sup, t.update_mode)  # warm-up (and compilation)
        sync()
        out["warmup_s"] = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        times = []
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            losses, _ = train_step(engine, batches, c.N_sup, t.update_mode)
            sync()
            times.append(time.perf_counter() - t0)
        sec = median(times)
        peak = peak_flops_per_device("bf16") if cuda else None
        tok_s = B * L / sec
        out.update({
            "s_per_step": sec, "all_s_per_step": times, "tokens_per_s": tok_s,
            "flops_per_token": c.flops_per_token(training=True),
            "model_tflop_per_s": tok_s * c.flops_per_token(training=True) / 1e12,
            "mfu": tok_s * c.flops_per_token(training=True) / peak if peak else None,
            "peak_flops": peak, "loss": losses[-1],
            "peak_mem_gib": (torch.cuda.max_memory_allocated() if cuda
                             else read_status_kb("VmHWM") * 1024) / 2**30,
            "peak_mem_kind": "CUDA max allocated" if cuda else "process peak RSS"})

        if spec["search"]:
            def fits(b: int) -> bool:
                try:
                    idx, tgt = batch(b)
                    objective, _, _, _ = engine(idx, None, None, tgt, 0, None)
                    engine.backward(objective)
                    engine.step()
                    sync()
                    return True
                except Exception as e:  # only running out of memory means "does not fit"
                    if not is_oom(e):
                        raise
                    return False
                finally:
                    if cuda:
                        torch.cuda.empty_cache()

            cap = spec["max_batch"] or (1024 if cuda else 4 * B)
            best, capped = largest_batch(fits, B, cap)
            out.update({"largest_micro_batch": best, "search_capped": capped,
                        "search_cap": cap})
    return out


def sdpa_context(flash: bool):
    """Force SDPA's flash kernel when asked and available (a probe with the model's GQA layout
    tells); otherwise torch's own choice. Returns (context factory, what ran)."""
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not flash:
        return contextlib.nullcontext, "default"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    q = torch.randn(1, 4, 16, 64, device=dev, dtype=dtype)
    k = torch.randn(1, 2, 16, 64, device=dev, dtype=dtype)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
    except RuntimeError as e:
        return contextlib.nullcontext, f"default (flash refused: {str(e).splitlines()[0][:80]})"
    return (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])), "flash"


# ----------------------------------------------------------------------------- parent
def run_child(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                              capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"preset": spec["preset"], "config": spec["name"],
                "error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        err = [x for x in proc.stderr.strip().splitlines() if x.strip()] or ["no output"]
        return {"preset": spec["preset"], "config": spec["name"], "error": err[-1][:300]}
    return json.loads(lines[-1])


def fmt(x, spec: str, none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="",
                    help="default A,B on a GPU; A alone on CPU (B's stand-in runs the same code)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"a comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per config")
    ap.add_argument("--max-batch", type=int, default=0,
                    help="cap of the micro-batch search (default 1024 on GPU, 4x on CPU)")
    ap.add_argument("--no-flash", action="store_true", help="let torch choose the SDPA kernel")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument("--threads", type=int, default=1, help="CPU only")
    ap.add_argument("--quick", action="store_true", help="smoke run: preset A, base + zero3")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import torch

    cuda = torch.cuda.is_available()
    presets = (args.presets or ("A,B" if cuda else "A")).split(",")
    names = args.configs.split(",")
    if args.quick:
        presets, names, args.steps = ["A"], ["base", "zero3"], 1
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    where = torch.cuda.get_device_name() if cuda else "CPU (no GPU: a tiny shape, not a GPU figure)"
    print(f"GPU path bench on {where}: presets {presets}, configs {names}, bf16, "
          f"{args.steps} timed steps each, one process per config", flush=True)
    rows = []
    hdr = (f"{'preset':<6} {'config':<16} {'ZeRO':>4} {'ckpt':>4} {'compile':>7} {'micro-b':>7} "
           f"{'tokens/s':>10} {'MFU':>6} {'peak GiB':>8} {'warm-up s':>9} {'largest b':>9}")
    print(hdr)
    for preset in presets:
        for name in names:
            changes, search = CONFIGS[name]
            spec = {"preset": preset, "name": name, "changes": changes, "search": search,
                    "steps": args.steps, "max_batch": args.max_batch, "flash": not args.no_flash,
                    "threads": args.threads}
            r = run_child(spec, args.timeout)
            rows.append(r)
            if "error" in r:
                print(f"{preset:<6} {name:<16} FAILED: {r['error']}", flush=True)
                continue
            largest = ("-" if "largest_micro_batch" not in r else
                       f"{'>=' if r['search_capped'] else ''}{r['largest_micro_batch']}")
            mfu = fmt(r["mfu"] and 100 * r["mfu"], ".1f")
            print(f"{preset:<6} {name:<16} {r['zero']:>4} {'on' if r['ckpt'] else 'off':>4} "
                  f"{'on' if r['compile'] else 'off':>7} {r['micro_batch']:>7} "
                  f"{r['tokens_per_s']:>10,.0f} {mfu:>6} {r['peak_mem_gib']:>8.2f} "
                  f"{r['warmup_s']:>9.1f} {largest:>9}", flush=True)
    ok = [r for r in rows if "error" not in r]
    if ok:
        print(f"SDPA: {ok[0]['sdpa']}; MFU against {fmt(ok[0]['peak_flops'], '.3g')} FLOP/s; "
              f"peak memory is {ok[0]['peak_mem_kind']}")
    write_json(args.json, {"cuda": cuda, "device": where, "steps": args.steps,
                           "cpu_shape": None if cuda else CPU_SHAPE, "rows": rows})


if __name__ == "__main__":
    main()
