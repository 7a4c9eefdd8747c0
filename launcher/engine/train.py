"""The training loop: a preset and a data spec in, a trained recursive GPT and its checkpoints out.

`train()` is the run's story: resolve where it starts, build what each rank holds, maybe resume,
loop, save. The pieces it calls each live in one place:

    launcher/step.py         one step of deep supervision through the DeepSpeed engine
    launcher/parallelize.py  the DeepSpeed engine, its ZeRO config and the optimizer groups
    launcher/ema_shards.py   the EMA of the weights under every ZeRO stage
    launcher/evaluate.py     val loss per supervision step, refinement, bits per byte
    launcher/checkpoint.py   sharded atomic checkpoints, the run folder's rules, RNG state
    launcher/metrics.py      the metrics file, wandb, MFU

It runs the same in one process, under torchrun/deepspeed and inside Ray Train workers (the job
layer, launcher/ray_train.py and launcher/jobs.py, only calls it): it reads rank and world size
from the environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from launcher.engine.checkpoint import (
    Checkpointer,
    ResumePoint,
    earlier_run,
    faults_at,
    load_engine_checkpoint,
    rng_state,
    run_checkpointer,
    set_rng_state,
)
from launcher.engine.config import RunConfig
from launcher.engine.dist import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    init_distributed,
    print0,
)
from launcher.engine.ema_shards import ema_load, ema_record, ema_tensors, swapped_in_ema
from launcher.engine.evaluate import VAL_SEED, evaluate, token_bytes
from launcher.engine.metrics import (
    MetricsLogger,
    RunFolder,
    cache_root,
    drop_rows_after,
    memory_gb,
    peak_flops_per_device,
)
from launcher.engine.parallelize import parallelize, resolve_precision
from launcher.engine.step import train_step
from model import EMA


def train(run: RunConfig, run_dir: str, resume: str | None = None,
          stop_at: int | None = None, on_checkpoint=None, control=None) -> int:
    """Train until max_steps, or checkpoint and leave at step stop_at (a job segment: the
    schedule still runs to max_steps on resume). Returns the exit code (0 ok, 3 NaNs).
    run_dir: a path, or a URL ($STORAGE/<run id>) whose files are staged on each node.
    on_checkpoint(step, path), if given, is called on every rank once a checkpoint is complete
    (the Ray layer registers it with ray.train.report). control(step), if given, is called on
    every rank every log_every steps and returns None, "save" (a checkpoint now: a preemption
    notice) or "stop" (a checkpoint now, then leave: `make stop`); every rank must get the
    same answer."""
    info = init_distributed()
    t = run.train
    torch.manual_seed(t.seed + info.rank)
    random.seed(t.seed + info.rank)
    folder = RunFolder(run_dir)
    if folder.remote:  # each node's staged copy is what the bucket holds, nothing older
        if info.local_rank == 0:
            folder.pull()
        barrier()
    run_path = folder.local
    ckpt = run_checkpointer(run, run_dir, info)

    rp, universal = where_to_start(run, run_path, ckpt, resume, info)
    trainer = Trainer(run, run_path, info, ckpt, universal, folder)
    if rp is not None:
        trainer.resume(rp, universal)
    trainer.open_run_dir(resumed=rp is not None)

    end = min(t.max_steps, stop_at or t.max_steps)
    while trainer.step < end:
        step = trainer.step + 1
        ok = trainer.train_one(step)
        if trainer.nonfinite_in_a_row >= t.max_nonfinite:
            return trainer.stop_nonfinite(step)
        if step % t.log_every == 0 or step == t.max_steps or not ok:
            trainer.log_progress(step, ok)
        if step % t.eval_every == 0 or step == t.max_steps:
            trainer.evaluate(step)
        saved = step % t.checkpoint_every == 0 or step == end
        if saved:
            path = trainer.save(step)
            if on_checkpoint is not None:
                on_checkpoint(step, path)
        act = control(step) if control is not None and step % t.log_every == 0 else None
        if act in ("save", "stop") and not saved:
            path = trainer.save(step)
            if on_checkpoint is not None:
                on_checkpoint(step, path)
        if act == "stop" and step < end:
            print0(f"stopping at step {step} as asked, after a checkpoint; continue with "
                   "--resume latest")
            break
    return trainer.finish()


def loader_is_pretok(run: RunConfig) -> bool:
    from data_pipeline import DataSpec

    t = run.train
    return t.data_path == "pretok" or (t.data_path == "auto"
                                       and DataSpec.parse(t.data).is_pretokenized)


def share_index_cache(folder: RunFolder, info: DistInfo, run: RunConfig,
                      loader_kwargs: dict[str, Any]) -> None:
    """The megatron index of a pre-tokenized run, built once and read by every node through
    the run's bucket (nodes share no filesystem). Megatron builds its index on global rank 0
    and every other rank *loads* it from path_to_cache, so the files must be on each node's
    disk before the loader is built. Global rank 0 builds it in a one-rank process of its own
    (a megatron build with no other rank to wait for), uploads it to $RUN/index_cache/, and
    every node's local rank 0 downloads it; the loader then finds it on every rank."""
    if not folder.remote or info.world_size == 1 or not loader_is_pretok(run):
        return
    local = cache_root() / "index" / folder.local.name
    os.environ["TRMGPT_INDEX_CACHE"] = str(local)  # read by data_pipeline.pretok
    fs, remote = folder.fs, f"{folder.root}/index_cache"
    key = hashlib.sha256(json.dumps(loader_kwargs, sort_keys=True).encode()).hexdigest()[:16]
    error = None
    if info.is_main and not fs.exists(f"{remote}/.built-{key}"):
        try:
            build_index_alone(local, loader_kwargs)
            have = {p.rsplit("/", 1)[-1] for p in fs.find(remote)} if fs.exists(remote) else set()
            for f in sorted(local.iterdir()):
                if f.is_file() and f.name not in have:
                    fs.put_file(str(f), f"{remote}/{f.name}")
            fs.pipe_file(f"{remote}/.built-{key}", b"")
        except Exception as e:  # every rank stops with it, not only this one
            error = f"{type(e).__name__}: {e}"
    if any_rank(error is not None):
        raise RuntimeError(f"building the data index for {folder.url} failed on rank 0: "
                           f"{error or 'see rank 0'}")
    if info.local_rank == 0:
        local.mkdir(parents=True, exist_ok=True)
        for p in fs.find(remote):
            name = p.rsplit("/", 1)[-1]
            if not name.startswith(".built-") and not (local / name).exists():
                tmp = local / f".{name}.{os.getpid()}"
                fs.get_file(p, str(tmp))
                os.replace(tmp, local / name)
    barrier()


def build_index_alone(cache: Path, loader_kwargs: dict[str, Any]) -> None:
    """Build a loader's megatron index in a fresh one-rank process group (its own process: this
    one already belongs to the run's group) with path_to_cache = `cache`."""
    code = ("import json, sys, torch.distributed as d\n"
            "d.init_process_group('gloo', init_method=sys.argv[2], rank=0, world_size=1)\n"
            "from data_pipeline import build_loader\n"
            "build_loader(**json.loads(sys.argv[1]))\n"
            "d.destroy_process_group()\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT")}
    env["TRMGPT_INDEX_CACHE"] = str(cache)
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, "-c", code, json.dumps(loader_kwargs),
                              f"file://{tmp}/store"], env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip()[-2000:])


def where_to_start(run: RunConfig, run_path: Path, ckpt: Checkpointer, resume: str | None,
                   info: DistInfo) -> tuple[ResumePoint | None, bool]:
    """A fresh start (the run folder must hold no earlier run) or the checkpoint to resume, and
    whether it loads through DeepSpeed's universal format (another world size under ZeRO).
    Decided before the engine exists: the engine is built for a universal load."""
    if not resume:
        conflict = earlier_run(run_path, ckpt)
        if any_rank(conflict is not None):  # every rank stops, before anything is written
            raise ValueError(conflict or "another rank found an earlier run in its run directory")
        return None, False
    rp = ckpt.find(resume)
    if rp is None:
        raise ValueError(f"--resume {resume}: there is no complete checkpoint under {ckpt.root} "
                         "to resume from; start the run without --resume (a new --run-dir)")
    if rp.state["config"]["model"] != run.model.to_dict():
        raise ValueError("the checkpoint's model config differs from this run's; resume "
                         "with the same model keys")
    universal = rp.world_size != info.world_size and run.train.zero_stage > 0
    return (ckpt.universal(rp) if universal else rp), universal


class Trainer:
    """What one rank holds for a run: the data, the engine, the EMA, the metrics, the counters."""

    def __init__(self, run: RunConfig, run_path: Path, info: DistInfo, ckpt: Checkpointer,
                 universal: bool, folder: RunFolder | None = None) -> None:
        from data_pipeline import DataSpec, build_loader, load_tokenizer

        t, mc = run.train, run.model
        self.run, self.run_path, self.info, self.ckpt = run, run_path, info, ckpt
        self.folder = folder or RunFolder(run_path)
        self.tok = load_tokenizer(t.tokenizer)
        if self.tok.vocab_size > mc.vocab_size:
            raise ValueError(f"vocab_size ({mc.vocab_size}) is smaller than the tokenizer's "
                             f"vocabulary ({self.tok.vocab_size}); set "
                             f"vocab_size={self.tok.padded_vocab_size}")
        self.spec = DataSpec.parse(t.data)
        self.ga = t.grad_accum(info.world_size)
        kw = self.loader_kwargs("train", t.num_workers,
                                t.max_steps * t.device_batch_size * self.ga * info.world_size)
        share_index_cache(self.folder, info, run, kw)
        self.loader = build_loader(**{**kw, "spec": self.spec, "tok": self.tok,
                                      "rank": info.rank})
        self.engine, self.model, _, self.sched = parallelize(run, info.world_size,
                                                             load_universal=universal)
        self.zero3 = t.zero_stage == 3
        self.ema = EMA(ema_tensors(self.model, self.zero3), t.ema_decay, warmup=True)
        self.state: dict[str, Any] = {"step": 0, "tokens": 0, "nonfinite_total": 0,
                                      "wandb_id": None}
        self.token_bytes = token_bytes(self.tok)
        self.tokens_per_step = t.device_batch_size * mc.sequence_len * self.ga * info.world_size
        self.peak = t.peak_flops or peak_flops_per_device(resolve_precision(t.precision))
        self.nan_steps, self.stall_steps = faults_at("nan"), faults_at("data_stall")
        self.nonfinite_in_a_row = 0
        self.step_times: list[float] = []
        self.t_last = time.time()
        self.batches = None  # the train loader's iterator, opened at the first step
        self.last_good = (ckpt.complete_tags() or [None])[-1]
        self.logger: MetricsLogger | None = None

    @property
    def step(self) -> int:
        return self.state["step"]

    def loader_kwargs(self, split: str, num_workers: int, num_samples: int) -> dict[str, Any]:
        """build_loader's arguments as plain data (they also key the shared index cache)."""
        t = self.run.train
        return {"spec": t.data, "tok": t.tokenizer, "split": split,
                "batch_size": t.device_batch_size, "seq_len": self.run.model.sequence_len,
                "rank": 0, "world_size": self.info.world_size,
                "seed": VAL_SEED if split == "val" else t.seed,
                "num_workers": num_workers, "path": t.data_path, "num_samples": num_samples}

    # ------------------------------------------------------------------ resume
    def resume(self, rp: ResumePoint, universal: bool) -> None:
        """Weights, optimizer, schedule (DeepSpeed), EMA, counters, data position, RNG."""
        load_engine_checkpoint(self.engine, rp)
        ema_load(self.ema, self.model, rp, self.zero3, self.info.rank)
        for k in self.state:
            self.state[k] = rp.state[k]
        if universal or rp.world_size != self.info.world_size:
            if "data_global" not in rp.state:
                raise ValueError("resuming on a different number of ranks needs the "
                                 "pre-tokenized data path (global sample order); this run "
                                 f"streams, so resume it on {rp.world_size} rank(s)")
            self.loader.load_state_dict(rp.state["data_global"])
        else:
            tensors, rj = Checkpointer.rank_files(rp, self.info.rank)
            self.loader.load_state_dict(rj["data"])
            set_rng_state(tensors["rng"], rj["py_rng"])
        print0(f"resumed from {rp.local_dir / rp.tag} at step {self.step}"
               + (f" (universal: {rp.world_size} -> {self.info.world_size} ranks)"
                  if universal else ""))

    def open_run_dir(self, resumed: bool) -> None:
        """config.json, the metrics log (rows after a resumed checkpoint are logged again from
        here, so the ones a crash left behind go), wandb, and the run's banner."""
        run, t, info = self.run, self.run.train, self.info
        if info.is_main:
            self.run_path.mkdir(parents=True, exist_ok=True)
            run.save(self.run_path / "config.json")
            if resumed:
                drop_rows_after(self.run_path / "metrics.jsonl", self.step)
            self.folder.push(force=True)  # config.json (and the trimmed metrics) in the bucket
        self.logger = MetricsLogger(self.run_path, info.is_main, run, self.state["wandb_id"])
        self.state["wandb_id"] = self.logger.run_id
        fig = run.model.summary()
        print0(f"trmgpt | preset {run.preset} | {fig['params_non_embedding'] / 1e6:.2f}M params "
               f"(non-embedding) | effective depth {fig['effective_depth']} | gradient depth "
               f"{fig['gradient_depth']} | {fig['flops_per_token_train'] / 1e9:.3f} GFLOP/token "
               f"| ZeRO-{t.zero_stage} | {info.world_size} rank(s) | grad accum {self.ga} | "
               f"{t.update_mode} | run dir {self.folder.url}")
        if info.is_main:
            self.logger.write_figures(fig)
        self.t_last = time.time()

    # ------------------------------------------------------------------ the loop's parts
    def train_one(self, step: int) -> bool:
        """One optimizer step's batches through train_step; the EMA follows a clean update."""
        t0 = time.time()  # a step's time includes waiting for its data
        if self.batches is None:
            self.batches = iter(self.loader)
        if step in self.stall_steps:
            time.sleep(1.0)  # fault injection (TRMGPT_FAULTS=data_stall@STEP): a slow source
        batches = [next(self.batches) for _ in range(self.ga)]
        self.step_losses, ok = train_step(self.engine, batches, self.run.model.N_sup,
                                          self.run.train.update_mode,
                                          nan_at_step=step in self.nan_steps)
        if ok:
            self.ema.update(ema_tensors(self.model, self.zero3))
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
            self.state["nonfinite_total"] += 1
            print0(f"step {step}: non-finite loss, update skipped ({self.nonfinite_in_a_row} in a "
                   f"row, {self.state['nonfinite_total']} in total)")
        self.state["step"] = step
        self.state["tokens"] += self.tokens_per_step
        self.step_times.append(time.time() - t0)
        return ok

    def log_progress(self, step: int, ok: bool) -> None:
        t = self.run.train
        losses = [x / self.info.world_size for x in all_reduce_sum(self.step_losses)]
        recent = self.step_times[-t.log_every:]
        tok_s = self.tokens_per_step / (sum(recent) / len(recent))
        eta = (t.max_steps - step) * (time.time() - self.t_last) / max(1, len(recent))
        row = {
            "loss": losses[-1], "step_losses": losses,
            "refinement": (losses[0] - losses[-1]) / losses[0] if losses[0] else 0.0,
            "tokens_per_s": tok_s, "lr": applied_lr(self.sched),
            "mem_gb": memory_gb(), "tokens": self.state["tokens"], "skipped": not ok,
            "nonfinite_total": self.state["nonfinite_total"], "eta_s": eta}
        if self.peak:  # no figure rather than a wrong one when the device's peak is unknown
            row["mfu"] = (self.run.model.flops_per_token() * tok_s
                          / (self.peak * self.info.world_size))
        self.logger.log(step, row)
        self.t_last = time.time()
        if self.info.is_main:
            self.folder.push()  # at most every folder.every seconds

    def evaluate(self, step: int) -> None:
        """Held-out loss per supervision step and bits per byte, with the EMA weights."""
        from data_pipeline import build_loader

        t, mc, info = self.run.train, self.run.model, self.info
        # every rank exactly eval_batches: ZeRO-3 gathers in step
        kw = self.loader_kwargs("val", 0, t.eval_batches * t.device_batch_size * info.world_size)
        share_index_cache(self.folder, info, self.run, kw)
        val_loader = build_loader(**{**kw, "spec": self.spec, "tok": self.tok,
                                     "rank": info.rank})
        with swapped_in_ema(self.ema, self.model, self.zero3):
            metrics = evaluate(self.engine, val_loader, mc.N_sup, t.eval_batches,
                               self.token_bytes)
        if metrics:
            self.logger.log(step, metrics, force=True)
        if info.is_main:
            self.folder.push(force=True)

    def save(self, step: int) -> str:
        """A complete checkpoint of this step; returns its path."""
        rng_t, py_rng = rng_state()
        shadow = self.ema.state_dict()["shadow"]
        full_state = {**self.state, "config": self.run.to_dict(),
                      "ema": ema_record(self.ema, self.model, self.zero3)}
        data_state = self.loader.state_dict()
        if data_state.get("path") == "pretok":  # one global position, any world size
            full_state["data_global"] = data_state
        rank_tensors = {"rng": rng_t, "ema": shadow if (self.zero3 or self.info.is_main) else {}}
        self.last_good = self.ckpt.save(step, self.engine, full_state, rank_tensors,
                                        {"data": data_state, "py_rng": py_rng})
        if self.info.is_main:  # the metrics up to a checkpoint go with it
            self.folder.push(force=True)
        return f"{self.ckpt.root}/{self.last_good}"

    def stop_nonfinite(self, step: int) -> int:
        print0(f"stopping: {self.nonfinite_in_a_row} non-finite losses in a row at step {step}. "
               f"The last good checkpoint is {self.last_good or 'none (no checkpoint was written)'}"
               "; resume with --resume latest after fixing the cause.")
        self.logger.log(step, {"event": "stopped_nonfinite",
                               "nonfinite_total": self.state["nonfinite_total"]}, force=True)
        self.logger.finish()
        if self.info.is_main:
            self.folder.push(force=True)
        return 3

    def finish(self) -> int:
        barrier()
        print0(f"done: {self.step} steps, {self.state['tokens']:,} tokens. run dir: "
               f"{self.folder.url} | metrics: {self.folder.join('metrics.jsonl')} | checkpoints: "
               f"{self.ckpt.root} | plots: make plot RUN={self.folder.name}")
        self.logger.finish()
        if self.info.is_main:
            self.folder.push(force=True)
            self.folder.push_tree("wandb")  # offline wandb files: gone with the node otherwise
        return 0


def applied_lr(sched) -> float:
    """The learning rate (first group) of the last update: the scheduler has already moved on
    to the next one."""
    return sched.base_lrs[0] * sched.lr_lambdas[0](max(0, sched.last_epoch - 1))


def main_train(run: RunConfig, run_dir: str, resume: str | None,
               stop_at: int | None = None) -> None:
    code = train(run, run_dir, resume, stop_at)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
