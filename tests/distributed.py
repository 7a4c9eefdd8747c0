"""Run a function on N real processes over gloo (OLMo's run_distributed_test, in our words).

Each process gets RANK/WORLD_SIZE/MASTER_* in its environment and one CPU thread, calls
fn(*args), and sends back its return value (or its traceback). No torch test base classes.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from launcher.engine.dist import free_port


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    import torch

    torch.set_num_threads(1)
    try:
        queue.put((rank, True, fn(*args)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world: int = 2, args: tuple = (),
                    timeout: float = 600) -> list[Any]:
    """fn's return value on each rank, in rank order; raises if any rank failed."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, fn, args, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world):
            rank, ok, val = queue.get(timeout=timeout)
            if ok:
                results[rank] = val
            else:
                errors.append(f"rank {rank} failed:\n{val}")
                break
    finally:
        for p in procs:
            p.join(timeout=30 if not errors else 1)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]
