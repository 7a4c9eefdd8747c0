"""One training step of deep supervision through the DeepSpeed engine.

`train_step` is the recursion's training in plain sight: N_sup supervision steps per micro-batch,
each backpropagated as soon as it is done, the optimizer stepping at DeepSpeed's accumulation
boundary. The loop around it (data, logging, eval, checkpoints) is launcher.engine.train's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from launcher.engine.dist import any_rank


def train_step(engine, batches: list[tuple[torch.Tensor, torch.Tensor]], n_sup: int,
               update_mode: str, nan_at_step: bool = False) -> tuple[list[float], bool]:
    """One training batch = N_sup supervision steps on each micro-batch.

    Each engine call is one supervision step: T-k recursions without gradients, k with
    (k = backprop_recursions), the head and the step's loss (model.supervision_step). Its
    share of the objective (w_s·L_s + improvement penalty [+ halting], or with exit_gate its
    share of Σ p_s·L_s − β·H(p)) is backpropagated at once, so only one step's activations
    are alive; y, z and the carry (the step's loss and exit state) come back detached.
    engine.step() only applies at the accumulation boundary:
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
    # each micro-batch goes to the device once, not once per supervision step
    batches = [(to_device(idx, device), to_device(tgt, device)) for idx, tgt in batches]
    for i, s in order:
        idx, tgt = batches[i]
        y, z, prev = states[i]
        objective, carry, y, z = engine(idx, y, z, tgt, s, prev)
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
        states[i] = (y, z, carry)  # carry: the step's loss (and exit state), detached
        step_losses[s] += carry.loss.item() / len(batches)
    return step_losses, ok


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto the device without stalling the host: on CUDA, copied from pinned
    memory with non_blocking (from pageable memory the copy waits for every kernel already
    queued, so the host could not run ahead of the GPU). Elsewhere a plain .to()."""
    if device.type == "cuda" and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


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


