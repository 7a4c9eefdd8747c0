"""Process-group plumbing and rank-0 side effects behind tiny helpers."""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def choose_accelerator(cuda: bool | None = None) -> str:
    """DeepSpeed's accelerator, from what this machine has unless DS_ACCELERATOR names one.

    Every entry point calls this before deepspeed is imported (DeepSpeed reads the variable once,
    on first use): a GPU machine gets cuda, a CPU-only one cpu. An explicit cpu on a machine with
    CUDA is kept but reported: DeepSpeed would then run on the CPU while torch sees the GPUs.
    """
    if cuda is None:
        cuda = torch.cuda.is_available()
    name = os.environ.get("DS_ACCELERATOR", "")
    if not name:
        name = "cuda" if cuda else "cpu"
        os.environ["DS_ACCELERATOR"] = name
    elif name == "cpu" and cuda:
        print("warning: DS_ACCELERATOR=cpu on a machine with CUDA: DeepSpeed will run on its CPU "
              "accelerator. Unset it to use the GPUs.", file=sys.stderr, flush=True)
    return name


def world_size() -> int:
    """Ranks in the process group this process belongs to (1 without one), not what the
    environment says: a restarted worker group may carry a stale WORLD_SIZE."""
    return dist.get_world_size() if dist.is_initialized() else 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the process group the launcher (torchrun, deepspeed, Ray Train) set up through the
    environment, or make a one-rank group for a plain `python -m launcher train`."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats over ranks (one small collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True if flag is set on any rank: every rank takes the same branch."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


def extensions_dir() -> str:
    """DeepSpeed's JIT-built ops, cached once per Python installation: the build records the
    include paths it was compiled with, so two checkouts (or two paths to one venv) sharing one
    folder would rebuild it for each other on every start."""
    import hashlib

    key = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return str(Path.home() / ".cache" / "trmgpt" / "torch_extensions" / key)


ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "TORCH_EXTENSIONS_DIR": extensions_dir()}


def engine_env() -> None:
    """Environment of every command that may import deepspeed: DeepSpeed's accelerator from the
    machine (cuda on a GPU machine, cpu otherwise) unless DS_ACCELERATOR is set, offline hubs."""
    choose_accelerator()
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    clear_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))


# DeepSpeed's CPU shm op builds in under a minute on 2 shared cores; a CUDA op on a GPU node can
# take several minutes, writing an object file into the folder as each unit finishes
STALE_BUILD_S = 1200.0


def clear_stale_build_locks(root: Path, max_age_s: float = STALE_BUILD_S) -> list[Path]:
    """Remove `<op>/lock` files older than max_age_s under torch's extensions folder.

    torch's JIT build (FileBaton) holds an op's folder with a `lock` file and every other
    process waits, forever, for it to go; a build killed half-way (a timeout, SIGKILL, a lost
    node) leaves it, and from then on every run hangs in deepspeed.init_distributed building
    the shm op. A lock is stale when nothing in its op's folder (the lock, ninja's objects and
    logs) has changed for max_age_s: a running build writes there. Returns what was removed."""
    removed = []
    now = time.time()
    for lock in root.glob("*/lock") if root.is_dir() else []:
        try:
            newest = max(f.stat().st_mtime for f in lock.parent.iterdir())
            if now - newest > max_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # another rank got there first
            continue
    for lock in removed:
        print(f"removed a stale build lock left by a killed build: {lock}", file=sys.stderr)
    return removed
