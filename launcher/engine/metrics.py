"""Metrics: metrics.jsonl, wandb (offline unless WANDB_API_KEY is set), a live progress line.

Only rank 0 writes; other ranks get a logger whose methods do nothing. Secrets stay in the
environment: the key is never written to the config, the metrics or the checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense peak FLOP/s per GPU (no sparsity) from the vendors' data sheets, for MFU, by the math
# the matmuls run in: "16" (bf16/fp16 tensor cores), "tf32" (fp32 with TF32 matmuls allowed) and
# "fp32" (torch's default for fp32 matmuls). The form factor matters: an H100 PCIe has ~3/4 of
# the SXM part's peak. Matched against torch.cuda.get_device_name(), first match wins; a name
# that matches nothing has no peak, and MFU is then not reported (or set peak_flops).
GPU_PEAK: list[tuple[str, dict[str, float]]] = [
    (r"H200 NVL", {"16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"H200", {"16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    (r"H100.*PCIe", {"16": 756e12, "tf32": 378e12, "fp32": 51e12}),
    (r"H100.*NVL", {"16": 835e12, "tf32": 418e12, "fp32": 60e12}),
    (r"H100.*(SXM|HBM3)", {"16": 989e12, "tf32": 495e12, "fp32": 67e12}),
    (r"A100", {"16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),  # SXM4 and PCIe alike
    (r"L40S", {"16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    (r"A10$", {"16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
]


def matmul_math(precision: str) -> str:
    """Which column of GPU_PEAK a run's matmuls use (precision already resolved)."""
    if precision in ("bf16", "fp16"):
        return "16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops_per_device(precision: str, name: str | None = None) -> float | None:
    """Dense peak FLOP/s of this GPU (or the named one) at the run's precision; None on CPU or
    for a GPU not in GPU_PEAK: no MFU is better than one against the wrong peak."""
    if name is None:
        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
    for pattern, peaks in GPU_PEAK:
        if re.search(pattern, name):
            return peaks[matmul_math(precision)]
    return None


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of steps <= step: a resume logs the later ones again, and a row logged
    twice (once before a crash, once after the resume) would count twice in every plot."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


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


def cache_root() -> Path:
    """This node's local cache ($TRMGPT_CACHE, else ~/.cache/trmgpt): staging, downloads."""
    return Path(os.environ.get("TRMGPT_CACHE") or Path.home() / ".cache" / "trmgpt")


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


def join(base: str, rel: str) -> str:
    """base/rel for a path or a URL (pathlib would turn s3://b into s3:/b)."""
    return f"{str(base).rstrip('/')}/{rel}"


class RunFolder:
    """A run's folder. Locally a path; on a cluster a URL ($STORAGE/<run id>): the files live in
    the bucket and each node works on a staged copy in a local folder of its own (keyed by the
    whole URL, so two runs never share one). Rank 0 pushes config.json and metrics.jsonl back
    (at most every `every` seconds, and at every checkpoint, eval and the end), so the run can
    be read, plotted and resumed from the bucket alone, on any node or on a laptop."""

    FILES = ("config.json", "metrics.jsonl")

    def __init__(self, run_dir: str | Path, every: float = 20.0) -> None:
        import hashlib

        self.url = str(run_dir).rstrip("/")
        self.remote = is_url(self.url)
        self.name = self.url.rsplit("/", 1)[-1]
        self.every = every
        self.last_push = 0.0
        if self.remote:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.url)
            digest = hashlib.sha256(self.url.encode()).hexdigest()[:16]
            self.local = cache_root() / "runs" / f"{self.name}-{digest}"
        else:
            self.local = Path(self.url)

    def join(self, rel: str) -> str:
        return join(self.url, rel)

    def exists(self, rel: str) -> bool:
        if self.remote:
            path = f"{self.root}/{rel}"
            # s3fs/gcsfs answer from a cached listing of the folder when they have one: a file
            # written since (by another node, by `make stop`) would never be seen
            self.fs.invalidate_cache(path.rsplit("/", 1)[0])
            return self.fs.exists(path)
        return (self.local / rel).exists()

    def read_text(self, rel: str) -> str:
        if self.remote:
            return self.fs.cat_file(f"{self.root}/{rel}").decode()
        return (self.local / rel).read_text()

    def pull(self, names: tuple[str, ...] = FILES) -> Path:
        """Make the local copy of these files what the bucket holds (absent there: absent
        here, so a lost attempt's rows left on this node's disk never count)."""
        self.local.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            return self.local
        for n in names:
            dst = self.local / n
            if self.exists(n):
                tmp = dst.with_name(f".{n}.{os.getpid()}")
                self.fs.get_file(f"{self.root}/{n}", str(tmp))
                os.replace(tmp, dst)
            elif dst.exists():
                dst.unlink()
        return self.local

    def push(self, force: bool = False, names: tuple[str, ...] = FILES) -> None:
        """Upload the staged files (rank 0 only calls this). Each object is replaced whole."""
        if not self.remote or (not force and time.time() - self.last_push < self.every):
            return
        for n in names:
            src = self.local / n
            if src.exists():
                self.fs.put_file(str(src), f"{self.root}/{n}")
        self.last_push = time.time()

    def push_tree(self, rel: str) -> None:
        """Upload a folder (the offline wandb files) at the end of a run."""
        src = self.local / rel
        if self.remote and src.is_dir():
            self.fs.put(str(src), f"{self.root}/", recursive=True)

    def move_aside(self, rel: str, new: str) -> None:
        """Rename a file in the run folder (the bucket's copy too)."""
        if self.remote and self.fs.exists(f"{self.root}/{rel}"):
            self.fs.mv(f"{self.root}/{rel}", f"{self.root}/{new}")
        p = self.local / rel
        if p.exists():
            p.rename(p.with_name(new))
