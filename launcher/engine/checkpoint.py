"""Sharded, atomic checkpoints in DeepSpeed's layout, on a local path or object storage (fsspec).

    checkpoints/
      latest                    DeepSpeed's pointer: the newest COMPLETE tag
      zero_to_fp32.py           DeepSpeed's own consolidation script
      step_00000100/
        mp_rank_00_model_states.pt, *zero_pp_rank_R_*optim_states.pt   (DeepSpeed, per rank)
        trmgpt/state.json        step, tokens, config, wandb id, world size, data state (rank 0)
        trmgpt/rank_0000R.pt     EMA of what rank R holds, torch RNG (tensors only)
        trmgpt/rank_0000R.json   this rank's data-pipeline state and Python RNG
        COMPLETE                 written last, by rank 0, after every rank's files are in place

A tag without COMPLETE is never chosen, so a crash while saving leaves the previous checkpoint as
the one to resume. Remote roots are staged in a local folder of their own (keyed by the whole
URL, so two runs never share one) and uploaded before COMPLETE. Every
file is loaded with weights_only=True (launcher.engine.safe_load). A resume on a different world
size goes
through DeepSpeed's universal checkpoint (ds_to_universal), converted once per node.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from launcher.engine.dist import DistInfo, any_rank, barrier
from launcher.engine.safe_load import safe_load, verify_checkpoint_files

if TYPE_CHECKING:
    from launcher.engine.config import RunConfig

TAG_RE = re.compile(r"^step_(\d{8})$")
MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def staging_dir(cache: Path, root: str) -> Path:
    """This node's local folder for a remote checkpoint root: named after the root's last part
    for people, keyed by a hash of the whole URL so that runs whose folders share a name (two
    buckets, two prefixes) never share staged or downloaded files."""
    name = root.rstrip("/").rsplit("/", 1)[-1] or "root"
    return cache / "stage" / f"{name}-{hashlib.sha256(root.encode()).hexdigest()[:16]}"


@dataclass
class ResumePoint:
    tag: str
    local_dir: Path          # the DeepSpeed checkpoint root holding tag/, on local disk
    meta: dict[str, Any]     # the COMPLETE marker
    state: dict[str, Any]    # trmgpt/state.json

    @property
    def world_size(self) -> int:
        return int(self.meta["world_size"])


class Checkpointer:
    def __init__(self, root: str, info: DistInfo, keep_last: int, cache: Path) -> None:
        """root: a local path or fsspec URL; cache: where remote roots are staged (staging_dir)."""
        self.root = root.rstrip("/")
        self.cache = cache
        self.fs, self.root_path = fsspec.core.url_to_fs(self.root)
        self.remote = not isinstance(self.fs, LocalFileSystem)
        self.local = (staging_dir(cache, self.root) / "checkpoints" if self.remote
                      else Path(self.root_path))
        self.info = info
        self.keep_last = keep_last

    # ------------------------------------------------------------------ listing
    def tags(self) -> list[str]:
        """Every tag folder, complete or not, oldest first."""
        if not self.fs.exists(self.root_path):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1]
                 for p in self.fs.ls(self.root_path, detail=False))
        return sorted(n for n in names if TAG_RE.match(n))

    def complete_tags(self) -> list[str]:
        """Tags whose COMPLETE marker exists, oldest first."""
        return [t for t in self.tags() if self.fs.exists(f"{self.root_path}/{t}/{MARKER}")]

    def drop_incomplete(self) -> list[str]:
        """Delete the tags without COMPLETE (what a group lost while saving left behind) and
        this node's staged copies of them; returns their names. Only the run's own restarted
        group calls this: a fresh driver refuses a folder holding any tag."""
        done = set(self.complete_tags())
        gone = [t for t in self.tags() if t not in done]
        for t in gone:
            self.fs.rm(f"{self.root_path}/{t}", recursive=True)
            if self.remote:
                shutil.rmtree(self.local / t, ignore_errors=True)
        return gone

    # ------------------------------------------------------------------ save
    def save(self, step: int, engine, state: dict[str, Any], rank_tensors: dict[str, Any],
             rank_json: dict[str, Any]) -> str:
        """Every rank calls this. Returns the tag once the checkpoint is complete."""
        tag = tag_for(step)
        r = self.info.rank
        if r == 0 and self.fs.exists(f"{self.root_path}/{tag}/{MARKER}"):
            self.fs.rm(f"{self.root_path}/{tag}/{MARKER}")  # re-written: incomplete until done
        barrier()
        engine.save_checkpoint(str(self.local), tag=tag, save_latest=False)
        own = self.local / tag / "trmgpt"
        own.mkdir(parents=True, exist_ok=True)
        torch.save(rank_tensors, own / f"rank_{r:05d}.pt")
        (own / f"rank_{r:05d}.json").write_text(json.dumps(rank_json))
        if r == 0:
            (own / "state.json").write_text(json.dumps(state, indent=1))
        fault_hook("kill_in_save", step)
        barrier()
        if self.remote and self.info.local_rank == 0:
            self.fs.put(str(self.local / tag), f"{self.root_path}/", recursive=True)
            if (self.local / "zero_to_fp32.py").exists():
                self.fs.put(str(self.local / "zero_to_fp32.py"), f"{self.root_path}/")
        barrier()
        fault_hook("kill_after_upload", step)  # every shard in storage, no COMPLETE yet
        if self.remote and self.info.local_rank == 0:
            shutil.rmtree(self.local / tag, ignore_errors=True)  # uploaded: free the node's disk
        if r == 0:
            meta = {"step": step, "world_size": self.info.world_size,
                    "zero_stage": engine.zero_optimization_stage()}
            self.write_text(f"{tag}/{MARKER}", json.dumps(meta))
            self.write_text("latest", tag)  # DeepSpeed's own pointer, for its tools
            self.prune()
        barrier()
        return tag

    def write_text(self, rel: str, text: str) -> None:
        if self.remote:
            with self.fs.open(f"{self.root_path}/{rel}", "w") as f:
                f.write(text)
            return
        path = self.local / rel
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # atomic on a local filesystem

    def prune(self) -> None:
        """Keep the newest keep_last complete checkpoints; drop older and abandoned ones."""
        tags = self.complete_tags()
        keep = set(tags[-self.keep_last:])
        newest = tags[-1] if tags else None
        for p in self.fs.ls(self.root_path, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            if TAG_RE.match(name) and name not in keep and newest and name < newest:
                self.fs.rm(f"{self.root_path}/{name}", recursive=True)
                if self.remote:
                    shutil.rmtree(self.local / name, ignore_errors=True)

    # ------------------------------------------------------------------ load
    def find(self, which: str) -> ResumePoint | None:
        """'latest' (None if the run has no complete checkpoint) or a path to a tag folder."""
        if which == "latest":
            tags = self.complete_tags()
            if not tags:
                return None
            return self.fetch(self, tags[-1])
        src = Checkpointer(str(Path(which).parent) if "://" not in which
                           else which.rstrip("/").rsplit("/", 1)[0],
                           self.info, self.keep_last, self.cache)
        tag = which.rstrip("/").rsplit("/", 1)[-1]
        tags = src.complete_tags()
        if tag not in tags:
            raise ValueError(f"{which} is not a complete checkpoint (no {MARKER} marker)")
        mine = self.complete_tags()
        if src.root_path == self.root_path and mine and tag != mine[-1]:
            raise ValueError(f"{which} is older than this run's newest checkpoint {mine[-1]}: "
                             "resuming it here would mix two timelines in one folder; resume "
                             "it with a new --run-dir, or move the newer checkpoints away")
        return self.fetch(src, tag)

    def fetch(self, src: Checkpointer, tag: str) -> ResumePoint:
        """Bring a remote tag to local disk (once per node), check it is safe to load."""
        fetched = src.local / tag / ".fetched"
        if src.remote and self.info.local_rank == 0 and not fetched.exists():
            tmp = src.local / f".{tag}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            src.fs.get(f"{src.root_path}/{tag}/", f"{tmp}/", recursive=True)
            shutil.rmtree(src.local / tag, ignore_errors=True)  # e.g. this node's staging copy
            os.replace(tmp, src.local / tag)
            fetched.touch()  # last: a download cut short is fetched again
        barrier()
        verify_checkpoint_files(src.local / tag)
        meta = json.loads((src.local / tag / MARKER).read_text())
        state = json.loads((src.local / tag / "trmgpt" / "state.json").read_text())
        return ResumePoint(tag=tag, local_dir=src.local, meta=meta, state=state)

    def universal(self, rp: ResumePoint) -> ResumePoint:
        """Convert to DeepSpeed's universal format for a different world size (once per node)."""
        out_root = rp.local_dir.parent / "universal"
        out = out_root / rp.tag
        if self.info.local_rank == 0 and not (out / MARKER).exists():
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                   "--input_folder", str(rp.local_dir / rp.tag), "--output_folder", str(out)]
            if int(rp.meta["zero_stage"]) in (1, 2):
                cmd.append("--inject_missing_state")  # this DeepSpeed needs it for ZeRO-1/2
            res = subprocess.run(cmd, capture_output=True, text=True)
            failed = res.returncode != 0
            if not failed:  # our own files ride along: the universal folder is a resume point
                shutil.copytree(rp.local_dir / rp.tag / "trmgpt", out / "trmgpt",
                                dirs_exist_ok=True)
                shutil.copy(rp.local_dir / rp.tag / MARKER, out / MARKER)
        else:
            failed = False
        if any_rank(failed):  # every rank stops, not only the converting one
            detail = f":\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}" if failed else ""
            raise RuntimeError(f"ds_to_universal failed on {rp.local_dir / rp.tag}{detail}")
        return ResumePoint(tag=rp.tag, local_dir=out_root, meta=rp.meta, state=rp.state)

    @staticmethod
    def rank_files(rp: ResumePoint, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
        d = rp.local_dir / rp.tag / "trmgpt"
        return safe_load(d / f"rank_{rank:05d}.pt"), json.loads(
            (d / f"rank_{rank:05d}.json").read_text())


def fault_hook(name: str, step: int) -> None:
    """Fault injection for tests: TRMGPT_FAULTS='kill_in_save@20,nan@5'. Kills the process
    (as a worker lost mid-save would be) when the named point is reached at that step."""
    spec = os.environ.get("TRMGPT_FAULTS", "")
    if f"{name}@{step}" in spec.split(","):
        print(f"[fault injection] {name} at step {step}", flush=True)
        os._exit(137)


def faults_at(name: str) -> set[int]:
    """Steps at which the trainer injects a fault: nan@STEP (a non-finite loss) or
    data_stall@STEP (the step's batch arrives a second late)."""
    out = set()
    for item in os.environ.get("TRMGPT_FAULTS", "").split(","):
        if item.startswith(name + "@"):
            out.add(int(item.split("@", 1)[1]))
    return out


# ------------------------------------------------------------------ the trainer's side of it
def checkpoint_root(run: RunConfig, run_dir: str | Path) -> str:
    """checkpoint_dir, else RUN_DIR/checkpoints (a path or a URL: $STORAGE/<run id>/...)."""
    from launcher.engine.metrics import join

    return (run.train.checkpoint_dir or join(str(run_dir), "checkpoints")).rstrip("/")


def run_checkpointer(run: RunConfig, run_dir: str | Path, info: DistInfo) -> Checkpointer:
    """The run's checkpoints (checkpoint_root); a remote root is staged under $TRMGPT_CACHE, in
    a folder of its own (keyed by the whole URL)."""
    from launcher.engine.metrics import cache_root

    return Checkpointer(checkpoint_root(run, run_dir), info, run.train.keep_last, cache_root())


def earlier_run(run_path: Path, ckpt: Checkpointer) -> str | None:
    """Why a fresh start may not use this run directory, or None. Starting over on top of an
    earlier run would let its pruning delete that run's checkpoints and mix its metrics rows
    with ours, so any checkpoint (complete or not) or logged metric refuses it."""
    held = []
    if ckpt.tags():
        held.append(f"checkpoints in {ckpt.root}")
    metrics = run_path / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size > 0:
        held.append(f"metrics in {metrics}")
    if not held:
        return None
    return (f"{run_path} already holds a run ({'; '.join(held)}). Continue it with "
            "--resume latest, or start a new run with another --run-dir.")


def load_engine_checkpoint(engine, rp: ResumePoint) -> None:
    """DeepSpeed's load, refusing to go on when it loaded nothing: the run would carry on from
    fresh weights with the saved step, data position and EMA."""
    where = rp.local_dir / rp.tag
    if not any(where.glob("*model_states.pt")):
        raise ValueError(f"{where} has no DeepSpeed model states (*model_states.pt): nothing to "
                         "resume from; check the checkpoint or resume another one")
    path, _ = engine.load_checkpoint(str(rp.local_dir), tag=rp.tag, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise ValueError(f"DeepSpeed loaded nothing from {where}: the run would go on from fresh "
                         "weights; check the checkpoint or resume another one")


def rng_state() -> tuple[dict[str, torch.Tensor], list]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    st = random.getstate()
    return tensors, [st[0], list(st[1]), st[2]]


def set_rng_state(tensors: dict[str, torch.Tensor], py: list) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available() and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"])
    random.setstate((py[0], tuple(py[1]), py[2]))
