"""Metrics: metrics.jsonl, wandb (offline unless WANDB_API_KEY is set), a live progress line.

Only rank 0 writes; other ranks get a logger whose methods do nothing. Secrets stay in the
environment: the key is never written to the config, the metrics or the checkpoint.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# dense bf16 peak FLOP/s per GPU (no sparsity), for MFU
GPU_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops_per_device() -> float:
    """The GPU's dense bf16 peak, or 0 on CPU (MFU is then not reported; set peak_flops)."""
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    for key, val in GPU_PEAK.items():
        if key in name:
            return val
    return 0.0


def memory_gb() -> float:
    """Peak device memory (CUDA) or the process's peak resident set (CPU), in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLogger:
    def __init__(self, run_dir: Path, active: bool, run, wandb_id: str | None) -> None:
        self.active = active
        self.run_id = wandb_id
        self.wandb = None
        self.t0 = time.time()
        self.log_every = run.train.log_every
        if not active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a")
        try:
            os.environ.setdefault("WANDB_SILENT", "true")  # our progress line says enough
            import wandb

            # WANDB_MODE (online/offline/disabled) wins; else online only with a key
            mode = os.environ.get("WANDB_MODE") or (
                "online" if os.environ.get("WANDB_API_KEY") else "offline")
            if mode == "offline":
                print("wandb: no WANDB_API_KEY in the environment, logging offline "
                      f"(sync later with `wandb sync {run_dir / 'wandb'}`)", flush=True)
            self.wandb = wandb.init(project=run.train.wandb_project, dir=str(run_dir),
                                    id=wandb_id, resume="allow", mode=mode,
                                    name=run_dir.name, config=run.to_dict())
            self.run_id = self.wandb.id
        except Exception as e:  # the run must not die because the dashboard can't start
            print(f"wandb disabled: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def write_figures(self, fig: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(fig)

    def log(self, step: int, metrics: dict[str, Any], force: bool = False) -> None:
        if not self.active:
            return
        rec = {"step": step, "time_s": round(time.time() - self.t0, 3), **metrics}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.wandb is not None:
            flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            for key in ("step_losses", "val_step_losses"):
                for i, v in enumerate(metrics.get(key, [])):
                    flat[f"{key}/{i + 1}"] = v
            self.wandb.log(flat, step=step)
        print(progress_line(step, metrics), flush=True)

    def finish(self) -> None:
        if not self.active:
            return
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def progress_line(step: int, m: dict[str, Any]) -> str:
    if "val_loss" in m:
        steps = " ".join(f"{x:.3f}" for x in m["val_step_losses"])
        return (f"step {step:>6} | eval (EMA) | val loss {m['val_loss']:.4f} | bpb "
                f"{m['val_bpb']:.3f} | per step [{steps}] | refinement "
                f"{m['val_refinement']:+.3f}")
    if "loss" not in m:
        return f"step {step:>6} | {m}"
    steps = " ".join(f"{x:.3f}" for x in m["step_losses"])
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
    eta = m.get("eta_s", 0)
    return (f"step {step:>6} | loss {m['loss']:.4f} | per step [{steps}] | refine "
            f"{m['refinement']:+.3f} | {m['tokens_per_s']:,.0f} tok/s | MFU {mfu} | "
            f"mem {m['mem_gb']:.2f} GiB | lr {m['lr']:.2e} | ETA {eta / 60:.1f} min"
            + (" | SKIPPED (non-finite)" if m.get("skipped") else ""))
