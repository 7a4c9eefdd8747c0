"""The GPU training path: presets A and B on one device, bf16, SDPA flash attention, with and
without torch.compile of the stack, ZeRO 0-3 on one rank, activation checkpointing on and off.

    python bench/gpu.py [--presets A,B] [--configs base,compile,...] [--steps 3] [--json FILE]
    python bench/gpu.py --check        # `make gpu-check`: needs CUDA, about 8 minutes at most

Any configuration that fails (non-zero exit, timeout, no result) fails the script: it still writes
its JSON (the failed rows say why) and exits 1. `--check` is the first-contact check of a GPU
machine: which SDPA kernel the model's attention runs, presets A and B a few steps each in bf16
with ZeRO-1 and activation checkpointing, compile off and on (no micro-batch search), tokens/s,
MFU, peak memory against `launcher describe`'s estimate, NCCL all-reduce bandwidth when there is
more than one GPU; it writes bench/results/gpu.json and re-renders bench/REPORT.md. Without a CUDA
device it says so and exits 2.

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


# the aten ops behind each scaled_dot_product_attention kernel, as the profiler names them
SDPA_OPS = {
    "flash": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_flash_attention_forward"),
    "efficient": ("_scaled_dot_product_efficient_attention", "_efficient_attention_forward"),
    "cudnn": ("_scaled_dot_product_cudnn_attention",),
    "math": ("_scaled_dot_product_attention_math",),
}
# presets A and B as they train (ZeRO-1, activation checkpointing), compile off and on
CHECK_CONFIGS = ["base", "compile"]
CHECK_BUDGET_S = 8 * 60


def attention_kernels(fn) -> list[str]:
    """The SDPA kernels that ran inside fn() (flash, efficient, cudnn, math), read from the aten
    ops torch's profiler records: what actually ran, not what was asked for."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ran = {e.key.removeprefix("aten::") for e in prof.key_averages()}
    return sorted(k for k, ops in SDPA_OPS.items() if ran & set(ops))


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
    from launcher.engine.describe import memory_estimate
    from launcher.engine.dist import init_distributed
    from launcher.engine.metrics import peak_flops_per_device
    from launcher.engine.parallelize import parallelize
    from launcher.engine.step import train_step

    init_distributed()
    cuda = torch.cuda.is_available()
    over = {"precision": "bf16", **({} if cuda else CPU_SHAPE), **spec["changes"],
            **spec.get("sets", {})}
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
        with torch.no_grad():  # one supervision step's forward: every attention call it makes
            out["sdpa_kernels"] = attention_kernels(
                lambda: engine(*batches[0][:1], None, None, batches[0][1], 0, None))
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
            "peak_mem_kind": "CUDA max allocated" if cuda else "process peak RSS",
            "mem_estimate_gib": memory_estimate(run, 1)["total"]})

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


def nccl_child(size_mb: int, iters: int) -> None:
    """One rank of the all-reduce bandwidth probe (under torch.distributed.run): rank 0 prints
    the bus bandwidth in GB/s, NCCL's own definition (bytes x 2(n-1)/n per second)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    x = torch.ones(size_mb * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):  # warm-up: NCCL builds its rings on the first calls
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / iters
    if rank == 0:
        bus = x.numel() * x.element_size() * 2 * (world - 1) / world / sec / 1e9
        print(json.dumps({"gpus": world, "size_mb": size_mb, "s_per_all_reduce": sec,
                          "bus_gb_per_s": bus}))
    dist.destroy_process_group()


def nccl_bandwidth(gpus: int, timeout: float) -> dict:
    """All-reduce bus bandwidth over all local GPUs, or {"error": ...}."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={gpus}", __file__, "--nccl-child"]
    try:
        proc = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"gpus": gpus, "error": f"timed out after {timeout:.0f} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = [x for x in proc.stderr.strip().splitlines() if x.strip()] or ["no output"]
        return {"gpus": gpus, "error": err[-1][:300]}
    return json.loads(lines[-1])


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
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override applied to every configuration")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: preset A, base + compile + zero3, one step")
    ap.add_argument("--check", action="store_true",
                    help="make gpu-check: CUDA only; A and B, base + compile, 3 steps, NCCL, "
                         "-> bench/results/gpu.json and bench/REPORT.md")
    # --check on the CPU stand-in shapes: tests the script itself, the figures mean nothing
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--nccl-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.nccl_child:
        nccl_child(256, 20)
        return
    sys.exit(run(args))


def run(args: argparse.Namespace) -> int:
    """The parent: every configuration in its own process; 0 only if all of them ran."""
    import torch

    cuda = torch.cuda.is_available()
    started = time.monotonic()
    if args.check and not cuda and not args.allow_cpu:
        print("gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False, "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda}); nothing was "
              "measured. Run it on a machine with NVIDIA GPUs.", file=sys.stderr)
        return 2
    presets = (args.presets or ("A,B" if cuda else "A")).split(",")
    names = args.configs.split(",")
    if args.quick:
        presets, names, args.steps = ["A"], ["base", "compile", "zero3"], 1
    if args.check:
        names, args.json = CHECK_CONFIGS, args.json or str(REPO / "bench/results/gpu.json")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    sets = dict(x.split("=", 1) for x in args.set)
    where = torch.cuda.get_device_name() if cuda else "CPU (no GPU: a tiny shape, not a GPU figure)"
    print(f"GPU path bench on {where}: presets {presets}, configs {names}, bf16, "
          f"{args.steps} timed steps each, one process per config", flush=True)
    rows = []
    hdr = (f"{'preset':<6} {'config':<16} {'ZeRO':>4} {'ckpt':>4} {'compile':>7} {'micro-b':>7} "
           f"{'tokens/s':>10} {'MFU':>6} {'peak GiB':>8} {'est GiB':>7} {'warm-up s':>9} "
           f"{'largest b':>9}")
    print(hdr)
    # --check: every preset's base before any compile, so that compile (the slow warm-up) gets
    # what the budget has left rather than starving the plain configurations
    order = ([(p, n) for n in names for p in presets] if args.check else
             [(p, n) for p in presets for n in names])
    for preset, name in order:
        changes, search = CONFIGS[name]
        timeout = args.timeout
        if args.check:  # the whole check fits its budget; what is left is shared out
            left = len(presets) * len(names) - len(rows)
            timeout = min(timeout, (CHECK_BUDGET_S - 60 - (time.monotonic() - started))
                          / left)
        spec = {"preset": preset, "name": name, "changes": changes,
                "search": search and not args.check, "steps": args.steps,
                "max_batch": args.max_batch, "flash": not args.no_flash,
                "threads": args.threads, "sets": sets}
        r = run_child(spec, max(timeout, 1))
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
              f"{r['mem_estimate_gib']:>7.2f} {r['warmup_s']:>9.1f} {largest:>9}",
              flush=True)
    ok = [r for r in rows if "error" not in r]
    if ok:
        print(f"SDPA kernels that ran: {ok[0]['sdpa_kernels']} ({ok[0]['sdpa']} asked); MFU "
              f"against {fmt(ok[0]['peak_flops'], '.3g')} FLOP/s; peak memory is "
              f"{ok[0]['peak_mem_kind']}")
    gpus = torch.cuda.device_count() if cuda else 0
    nccl = None
    if gpus > 1:
        left = CHECK_BUDGET_S - (time.monotonic() - started) - 10
        nccl = nccl_bandwidth(gpus, max(30.0, left) if args.check else 300.0)
        print(f"NCCL all-reduce over {gpus} GPUs: " + (f"FAILED: {nccl['error']}"
              if "error" in nccl else f"{nccl['bus_gb_per_s']:.1f} GB/s bus bandwidth "
              f"({nccl['size_mb']} MB)"), flush=True)
    write_json(args.json, {"cuda": cuda, "device": where, "gpus": gpus, "steps": args.steps,
                           "check": args.check, "cpu_shape": None if cuda else CPU_SHAPE,
                           "rows": rows, "nccl": nccl})
    failed = [f"{r['preset']}/{r['config']}" for r in rows if "error" in r]
    if nccl is not None and "error" in nccl:
        failed.append("nccl all-reduce")
    if args.check and cuda and not failed:
        res = subprocess.run([sys.executable, str(REPO / "bench/report.py"), "--render-only"],
                             cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
        if res.returncode != 0:
            failed.append("bench/report.py --render-only")
    print(f"took {time.monotonic() - started:.0f} s", flush=True)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    main()
