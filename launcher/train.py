"""The training loop: a preset and a data spec in, a trained recursive GPT and its checkpoints out.

Runs the same on one process, under torchrun/deepspeed, and inside Ray Train workers: it reads
rank and world size from the environment. `train_step` shows the deep supervision in plain sight.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint import Checkpointer, ResumePoint, faults_at
from launcher.config import RunConfig
from launcher.dist import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    init_distributed,
    print0,
    world_size,
)
from launcher.evaluate import SUMS, eval_batch, summarize
from launcher.metrics import MetricsLogger, drop_rows_after, memory_gb, peak_flops_per_device
from launcher.parallelize import parallelize, resolve_precision
from model import EMA


# ---------------------------------------------------------------------------- the step
def train_step(engine, batches: list[tuple[torch.Tensor, torch.Tensor]], n_sup: int,
               update_mode: str, nan_at_step: bool = False) -> tuple[list[float], bool]:
    """One training batch = N_sup supervision steps on each micro-batch.

    Each engine call is one supervision step: T-1 recursions without gradients, one with, the
    head and the step's loss (model.supervision_step). Its share of the objective
    (w_s·L_s + improvement penalty [+ halting]) is backpropagated at once, so only one step's
    activations are alive; y and z come back detached. engine.step() only applies at the
    accumulation boundary:
      accumulate: boundary after all N_sup steps of all micro-batches (one update per batch);
      per_step:   boundary after step s of every micro-batch (one update per supervision step).
    The engine divides every backward by its gradient_accumulation_steps (micro-batches × N_sup
    in accumulate mode, micro-batches in per_step mode): the factor n_sup cancels its N_sup in
    accumulate mode only, so that the update follows Σ_s objective_s (per micro-batch mean);
    a per_step update follows objective_s itself.
    A non-finite loss on any rank skips the batch's remaining updates on every rank (in per_step
    mode the steps before it stand: they were fine); a skipped update still uses up its step of
    the learning-rate schedule, under every ZeRO stage. Returns the mean loss per supervision
    step and whether the batch was clean.
    """
    device = engine.device
    scale = n_sup if update_mode == "accumulate" else 1
    ok = True
    step_losses = [0.0] * n_sup
    states: list[tuple[Any, Any, Any]] = [(None, None, None)] * len(batches)
    order = ([(i, s) for i in range(len(batches)) for s in range(n_sup)]
             if update_mode == "accumulate" else
             [(i, s) for s in range(n_sup) for i in range(len(batches))])
    for i, s in order:
        idx, tgt = (t.to(device, non_blocking=True) for t in batches[i])
        y, z, prev = states[i]
        objective, loss, y, z = engine(idx, y, z, tgt, s, prev)
        if nan_at_step and s == 0:
            objective = objective * float("nan")  # fault injection (TRMGPT_FAULTS=nan@STEP)
        ok = ok and not any_rank(not bool(torch.isfinite(objective)))
        # backward runs even on a skipped batch (DeepSpeed's reductions expect every micro-step);
        # its later steps are poisoned too, so the engine's non-finite check drops the update
        engine.backward(objective * (scale if ok else float("nan")))
        boundary = engine.is_gradient_accumulation_boundary()
        with dropped_update(engine, boundary and not ok) as dropped:
            engine.step()
        if boundary and not ok:
            if not dropped and engine.was_step_applied():
                raise RuntimeError("DeepSpeed applied an update with non-finite gradients")
            if not engine.was_step_applied():
                # DeepSpeed's overflow path skips the scheduler too; stage 0's dropped update
                # went through the engine and stepped it: the schedule follows the step count
                engine.lr_scheduler.step()
        states[i] = (y, z, loss.detach())
        step_losses[s] += loss.item() / len(batches)
    return step_losses, ok


@contextmanager
def dropped_update(engine, drop: bool) -> Iterator[bool]:
    """Around engine.step(): skip the optimizer step when drop. Under ZeRO (and DeepSpeed's
    fp16/bf16 optimizers) the engine does it itself: a non-finite gradient norm discards the
    step and its gradients (yields False). Plain data parallel in fp32 has no such check, so the
    optimizer's step does nothing this once (yields True): the weights, AdamW's moments and its
    step count stay exactly as they were, as on ZeRO's overflow path; the engine still clips,
    zeroes the gradients and steps the scheduler."""
    ours = drop and (engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
                     and not engine.fp16_enabled())
    opt = engine.optimizer
    if ours:
        opt.step = lambda *args, **kwargs: None  # shadows the method on this instance only
    try:
        yield ours
    finally:
        if ours:
            del opt.step


# ---------------------------------------------------------------------------- EMA per rank
def ema_tensors(model: torch.nn.Module, zero3: bool):
    """What this rank holds of each parameter: all of it, or its ZeRO-3 partition."""
    for name, p in model.named_parameters():
        yield name, (p.ds_tensor if zero3 else p.data)


def ema_full_from_shards(rp: ResumePoint) -> dict[str, torch.Tensor]:
    """Rebuild full EMA tensors from a checkpoint's per-rank shards (any ZeRO stage)."""
    numels = rp.state["ema"]["numel"]
    layout = rp.state["ema"]["layout"]
    ranks = range(rp.world_size) if layout == "zero3" else [0]
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in numels}
    for r in ranks:
        tensors, _ = Checkpointer.rank_files(rp, r)
        for n in numels:
            parts[n].append(tensors["ema"][n].flatten())
    shapes = rp.state["ema"]["shape"]
    return {n: torch.cat(parts[n])[: numels[n]].view(shapes[n]) for n in numels}


def ema_load(ema: EMA, model, rp: ResumePoint, zero3: bool, rank: int) -> None:
    same = rp.world_size == world_size()
    if zero3 and same and rp.state["ema"]["layout"] == "zero3":
        tensors, _ = Checkpointer.rank_files(rp, rank)
        ema.load_state_dict({"decay": ema.decay, "num_updates": rp.state["ema"]["num_updates"],
                             "shadow": tensors["ema"]})
        return
    full = ema_full_from_shards(rp)
    shadow = {}
    for name, t in ema_tensors(model, zero3):
        flat = full[name].flatten()
        if zero3:  # this rank's contiguous slice of the flattened parameter, zero-padded
            n = t.numel()
            piece = flat[rank * n: rank * n + n]
            flat = torch.cat([piece, piece.new_zeros(n - piece.numel())])
        shadow[name] = flat.view(t.shape)
    ema.load_state_dict({"decay": ema.decay, "num_updates": rp.state["ema"]["num_updates"],
                         "shadow": shadow})


class swapped_in_ema:
    """Context: the model holds the EMA weights inside, its own weights again after."""

    def __init__(self, ema: EMA, model, zero3: bool) -> None:
        self.ema, self.model, self.zero3 = ema, model, zero3

    def __enter__(self):
        self.backup = {n: t.detach().clone() for n, t in ema_tensors(self.model, self.zero3)}
        self.ema.copy_to(ema_tensors(self.model, self.zero3))

    def __exit__(self, *exc):
        with torch.no_grad():
            for n, t in ema_tensors(self.model, self.zero3):
                t.copy_(self.backup[n])


# ---------------------------------------------------------------------------- eval
def token_bytes(tok) -> torch.Tensor:
    """Bytes of text each token id stands for (0 for special tokens), for bits per byte. In a
    byte-level BPE every character of a token's string is one byte; otherwise decode it."""
    import json as _json

    hf = tok.tok
    byte_level = (_json.loads(hf.to_str()).get("decoder") or {}).get("type") == "ByteLevel"
    special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    out = torch.zeros(tok.padded_vocab_size, dtype=torch.long)
    for text, i in hf.get_vocab(with_added_tokens=True).items():
        if text not in special:
            out[i] = len(text) if byte_level else len(hf.decode([i]).encode("utf-8"))
    return out


@torch.no_grad()
def evaluate(engine, loader, n_sup: int, n_batches: int, token_bytes: torch.Tensor) -> dict:
    """Val loss per supervision step, refinement (L_1 − L_N)/L_1 and bits per byte, summed over
    ranks (launcher.evaluate). Runs through the engine so ZeRO-3 gathers the weights; each
    step's logits are reduced inside its engine call."""
    engine.eval()
    token_bytes = token_bytes.to(engine.device)
    totals = torch.zeros(n_sup, SUMS, dtype=torch.float64, device=engine.device)
    it = iter(loader)
    for _ in range(n_batches):
        try:
            idx, tgt = next(it)
        except StopIteration:
            break
        totals += eval_batch(engine, idx.to(engine.device), tgt.to(engine.device), n_sup,
                             token_bytes)
    engine.train()
    summed = all_reduce_sum(totals.flatten().tolist())
    return summarize(torch.tensor(summed, dtype=torch.float64).view(n_sup, SUMS))


# ---------------------------------------------------------------------------- the loop
def run_checkpointer(run: RunConfig, run_path: Path, info: DistInfo) -> Checkpointer:
    """The run's checkpoints (RUN_DIR/checkpoints or checkpoint_dir); a remote root is staged
    under $TRMGPT_CACHE, in a folder of its own (keyed by the whole URL)."""
    cache = Path(os.environ.get("TRMGPT_CACHE", Path.home() / ".cache" / "trmgpt"))
    return Checkpointer(run.train.checkpoint_dir or str(run_path / "checkpoints"), info,
                        run.train.keep_last, cache)


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


def applied_lr(sched) -> float:
    """The learning rate (first group) of the last update: the scheduler has already moved on
    to the next one."""
    return sched.base_lrs[0] * sched.lr_lambdas[0](max(0, sched.last_epoch - 1))


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


def train(run: RunConfig, run_dir: str, resume: str | None = None,
          stop_at: int | None = None, on_checkpoint=None) -> int:
    """Train until max_steps, or checkpoint and leave at step stop_at (a job segment: the
    schedule still runs to max_steps on resume). Returns the exit code (0 ok, 3 NaNs).
    on_checkpoint(step, path), if given, is called on every rank once a checkpoint is complete
    (the Ray layer registers it with ray.train.report)."""
    from data_pipeline import DataSpec, build_loader, load_tokenizer

    info: DistInfo = init_distributed()
    t, mc = run.train, run.model
    torch.manual_seed(t.seed + info.rank)
    random.seed(t.seed + info.rank)
    run_path = Path(run_dir)
    ckpt = run_checkpointer(run, run_path, info)

    # where do we start? (decided before the engine exists: a new world size loads universal)
    if not resume:
        conflict = earlier_run(run_path, ckpt)
        if any_rank(conflict is not None):  # every rank stops, before anything is written
            raise ValueError(conflict or "another rank found an earlier run in its run directory")
    rp = ckpt.find(resume) if resume else None
    if resume and rp is None:
        raise ValueError(f"--resume {resume}: there is no complete checkpoint under {ckpt.root} "
                         "to resume from; start the run without --resume (a new --run-dir)")
    universal = rp is not None and rp.world_size != info.world_size and t.zero_stage > 0
    if rp is not None:
        saved = rp.state["config"]
        if saved["model"] != mc.to_dict():
            raise ValueError("the checkpoint's model config differs from this run's; resume "
                             "with the same model keys")
        if universal:
            rp = ckpt.universal(rp)

    tok = load_tokenizer(t.tokenizer)
    if tok.vocab_size > mc.vocab_size:
        raise ValueError(f"vocab_size ({mc.vocab_size}) is smaller than the tokenizer's "
                         f"vocabulary ({tok.vocab_size}); set vocab_size={tok.padded_vocab_size}")
    spec = DataSpec.parse(t.data)
    ga = t.grad_accum(info.world_size)
    loader = build_loader(spec, tok, split="train", batch_size=t.device_batch_size,
                          seq_len=mc.sequence_len, rank=info.rank, world_size=info.world_size,
                          seed=t.seed, num_workers=t.num_workers, path=t.data_path,
                          num_samples=t.max_steps * t.device_batch_size * ga * info.world_size)

    engine, model, _, sched = parallelize(run, info.world_size, load_universal=universal)
    zero3 = t.zero_stage == 3
    ema = EMA(ema_tensors(model, zero3), t.ema_decay, warmup=True)
    state: dict[str, Any] = {"step": 0, "tokens": 0, "nonfinite_total": 0, "wandb_id": None}
    if rp is not None:
        load_engine_checkpoint(engine, rp)
        ema_load(ema, model, rp, zero3, info.rank)
        for k in state:
            state[k] = rp.state[k]
        if universal or rp.world_size != info.world_size:
            if "data_global" not in rp.state:
                raise ValueError("resuming on a different number of ranks needs the "
                                 "pre-tokenized data path (global sample order); this run "
                                 "streams, so resume it on "
                                 f"{rp.world_size} rank(s)")
            loader.load_state_dict(rp.state["data_global"])
        else:
            tensors, rj = Checkpointer.rank_files(rp, info.rank)
            loader.load_state_dict(rj["data"])
            set_rng_state(tensors["rng"], rj["py_rng"])
        print0(f"resumed from {rp.local_dir / rp.tag} at step {state['step']}"
               + (f" (universal: {rp.world_size} -> {info.world_size} ranks)" if universal else ""))

    if info.is_main:
        run_path.mkdir(parents=True, exist_ok=True)
        run.save(run_path / "config.json")
        if rp is not None:  # rows logged after that checkpoint are logged again from here
            drop_rows_after(run_path / "metrics.jsonl", state["step"])
    logger = MetricsLogger(run_path, info.is_main, run, state["wandb_id"])
    state["wandb_id"] = logger.run_id
    fig = mc.summary()
    print0(f"trmgpt | preset {run.preset} | {fig['params_non_embedding'] / 1e6:.2f}M params "
           f"(non-embedding) | effective depth {fig['effective_depth']} | gradient depth "
           f"{fig['gradient_depth']} | {fig['flops_per_token_train'] / 1e9:.3f} GFLOP/token "
           f"| ZeRO-{t.zero_stage} | {info.world_size} rank(s) | grad accum {ga} | "
           f"{t.update_mode} | run dir {run_path}")
    if info.is_main:
        logger.write_figures(fig)

    tbytes = token_bytes(tok)
    tokens_per_step = t.device_batch_size * mc.sequence_len * ga * info.world_size
    peak = t.peak_flops or peak_flops_per_device(resolve_precision(t.precision))
    nan_steps, stall_steps = faults_at("nan"), faults_at("data_stall")
    in_a_row = 0
    it = iter(loader)
    last_good = (ckpt.complete_tags() or [None])[-1]

    def save(step: int) -> str:
        rng_t, py_rng = rng_state()
        shadow = ema.state_dict()
        full_state = {
            **state, "config": run.to_dict(),
            "ema": {"layout": "zero3" if zero3 else "full", "num_updates": shadow["num_updates"],
                    "numel": {n: p.ds_numel if zero3 else p.numel()
                              for n, p in model.named_parameters()},
                    "shape": {n: list(p.ds_shape if zero3 else p.shape)
                              for n, p in model.named_parameters()}},
        }
        data_state = loader.state_dict()
        if data_state.get("path") == "pretok":  # one global position, any world size
            full_state["data_global"] = data_state
        rank_tensors = {"rng": rng_t, "ema": shadow["shadow"] if (zero3 or info.is_main) else {}}
        return ckpt.save(step, engine, full_state, rank_tensors,
                         {"data": data_state, "py_rng": py_rng})

    t_last = time.time()
    step_times: list[float] = []
    end = min(t.max_steps, stop_at or t.max_steps)
    while state["step"] < end:
        step = state["step"] + 1
        t0 = time.time()  # a step's time includes waiting for its data
        if step in stall_steps:
            time.sleep(1.0)  # fault injection (TRMGPT_FAULTS=data_stall@STEP): a slow source
        batches = [next(it) for _ in range(ga)]
        step_losses, ok = train_step(engine, batches, mc.N_sup, t.update_mode,
                                     nan_at_step=step in nan_steps)
        if ok:
            ema.update(ema_tensors(model, zero3))
            in_a_row = 0
        else:
            in_a_row += 1
            state["nonfinite_total"] += 1
            print0(f"step {step}: non-finite loss, update skipped ({in_a_row} in a row, "
                   f"{state['nonfinite_total']} in total)")
        state["step"] = step
        state["tokens"] += tokens_per_step
        dt = time.time() - t0
        step_times.append(dt)
        if in_a_row >= t.max_nonfinite:
            print0(f"stopping: {in_a_row} non-finite losses in a row at step {step}. The last "
                   f"good checkpoint is {last_good or 'none (no checkpoint was written)'}; "
                   f"resume with --resume latest after fixing the cause.")
            logger.log(step, {"event": "stopped_nonfinite", "nonfinite_total":
                              state["nonfinite_total"]}, force=True)
            logger.finish()
            return 3
        if step % t.log_every == 0 or step == t.max_steps or not ok:
            losses = all_reduce_sum(step_losses)
            losses = [x / info.world_size for x in losses]
            recent = step_times[-t.log_every:]
            tok_s = tokens_per_step / (sum(recent) / len(recent))
            eta = (t.max_steps - step) * (time.time() - t_last) / max(1, len(recent))
            row = {
                "loss": losses[-1], "step_losses": losses,
                "refinement": (losses[0] - losses[-1]) / losses[0] if losses[0] else 0.0,
                "tokens_per_s": tok_s, "lr": applied_lr(sched),
                "mem_gb": memory_gb(), "tokens": state["tokens"], "skipped": not ok,
                "nonfinite_total": state["nonfinite_total"], "eta_s": eta}
            if peak:  # no figure rather than a wrong one when the device's peak is unknown
                row["mfu"] = mc.flops_per_token() * tok_s / (peak * info.world_size)
            logger.log(step, row)
            t_last = time.time()
        if step % t.eval_every == 0 or step == t.max_steps:
            val_loader = build_loader(spec, tok, split="val",
                                      batch_size=t.device_batch_size, seq_len=mc.sequence_len,
                                      rank=info.rank, world_size=info.world_size, seed=t.seed,
                                      num_workers=0, path=t.data_path,
                                      # every rank exactly eval_batches: ZeRO-3 gathers in step
                                      num_samples=t.eval_batches * t.device_batch_size
                                      * info.world_size)
            with swapped_in_ema(ema, model, zero3):
                metrics = evaluate(engine, val_loader, mc.N_sup, t.eval_batches, tbytes)
            if metrics:
                logger.log(step, metrics, force=True)
        if step % t.checkpoint_every == 0 or step == end:
            last_good = save(step)
            if on_checkpoint is not None:
                on_checkpoint(step, f"{ckpt.root}/{last_good}")
    barrier()
    print0(f"done: {state['step']} steps, {state['tokens']:,} tokens. run dir: {run_path} | "
           f"metrics: {run_path / 'metrics.jsonl'} | checkpoints: {ckpt.root} | "
           f"plots: make plot RUN={run_path.name}")
    logger.finish()
    return 0


def main_train(run: RunConfig, run_dir: str, resume: str | None,
               stop_at: int | None = None) -> None:
    code = train(run, run_dir, resume, stop_at)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
