"""What every bench script shares: the process settings, interleaved timing, machine facts, and the
JSON file each one writes for `bench/report.py`.

Every script measures the things it compares in one process, interleaved (A, B, A, B, ...), and
reports medians: this 2-core machine is shared, and a figure timed minutes after its reference
would mostly measure the neighbours.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def setup(threads: int = 1) -> None:
    """The environment the launcher gives its commands (offline hubs, DeepSpeed's accelerator
    from the machine, its JIT cache), raised priority where allowed, and torch's intra-op
    threads. One thread by default: on 2 shared cores, two OpenMP threads wait on each other at
    every small op, and the figures would measure the scheduler."""
    from launcher.engine.dist import engine_env

    engine_env()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:  # a higher share of the CPU against other work (allowed for our own autogroup)
        Path("/proc/self/autogroup").write_text("-10")
    except OSError:
        pass
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(threads)


def supervision_backward(model, idx, tgt, n_sup: int):
    """The bare deep-supervision pass every bench compares against: N_sup supervision steps,
    each backpropagated as soon as it is done (states detached between them, as the trainer
    does); no optimizer step. Returns the last step's loss (detached)."""
    y = z = prev = None
    for s in range(n_sup):
        st = model.supervision_step(idx, y, z, tgt, step=s, prev_loss=prev, keep_logits=False)
        st.objective.backward()
        y, z, prev = st.y, st.z, st.loss.detach()
    return prev


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def interleaved(variants: dict[str, Callable[[], Any]], rounds: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each variant: `warmup` untimed calls each, then `rounds` rounds in
    which every variant runs once, in the same order (A, B, C, A, B, C, ...)."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "deepspeed", "ray", "datasets", "tokenizers", "wandb"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a bench that does not need it still reports
            out[mod] = "n/a"
    return out


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "gpu": gpu,
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """The script's figures for bench/report.py, with the machine and when they were taken."""
    if not path:
        return
    result = {"finished": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
              "argv": sys.argv[1:], **result}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1) + "\n")


def read_status_kb(key: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
