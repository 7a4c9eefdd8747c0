"""Wrap the recursive GPT with DeepSpeed, in this order:

1. build the model (torch only) and, if asked, activation checkpointing around every graded
   application of the shared stack (torch's non-reentrant checkpoint or DeepSpeed's);
2. wrap it in SupervisionStepModule: one engine call = one supervision step, so ZeRO-3 gathers
   the shared parameters inside its own hooks for each step, however often the stack is reused;
3. AdamW over per-kind parameter groups, a warm-up / warm-down LambdaLR;
4. deepspeed.initialize with a config built from TrainConfig: ZeRO stage, precision, clipping,
   gradient_accumulation_steps = micro-batches per optimizer step (× N_sup in accumulate mode);
5. a checkpoint engine that never unpickles arbitrary objects.
"""

from __future__ import annotations

import argparse
import functools
import math
from typing import Any

import torch
from torch import nn

from launcher.engine.config import RunConfig
from launcher.engine.dist import choose_accelerator
from launcher.engine.evaluate import eval_sums
from model import RecursiveGPT, StepCarry


class SupervisionStepModule(nn.Module):
    """What the engine wraps. forward runs one supervision step of the recursive GPT and returns
    (objective, carry, y, z); y, z and carry (a StepCarry: the step's loss, detached, and with
    exit_gate the running exit state) are detached and go into the next call as y, z, prev."""

    def __init__(self, model: RecursiveGPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, y: torch.Tensor | None, z: torch.Tensor | None,
                targets: torch.Tensor, step: int, prev: StepCarry | torch.Tensor | None,
                token_bytes: torch.Tensor | None = None):
        """With token_bytes (evaluation), the first output is the step's eval_sums instead of
        its objective: the (B, T, vocab) logits are reduced here, inside the call (where ZeRO-3
        has the weights), and never outlive the step."""
        st = self.model.supervision_step(idx, y, z, targets, step=step, prev_loss=prev,
                                         keep_logits=token_bytes is not None)
        if token_bytes is not None:
            return eval_sums(st.logits, targets, token_bytes), st.carry, st.y, st.z
        return st.objective, st.carry, st.y, st.z


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def micro_steps_per_update(run: RunConfig, world_size: int) -> int:
    """Backward calls between two optimizer steps (DeepSpeed's gradient_accumulation_steps)."""
    ga = run.train.grad_accum(world_size)
    return ga * run.model.N_sup if run.train.update_mode == "accumulate" else ga


def deepspeed_config(run: RunConfig, world_size: int) -> dict[str, Any]:
    t = run.train
    precision = resolve_precision(t.precision)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.device_batch_size,
        "gradient_accumulation_steps": micro_steps_per_update(run, world_size),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # a torch AdamW with per-kind groups
        # skip (don't apply) an update whose gradient norm is not finite: see train_step
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.zero_stage == 3:
        # the shared stack runs many times per forward: don't let prefetch guess from a trace.
        # Vectors (norm weights, initial states, the halting head) stay gathered on every rank,
        # matrices are partitioned: gathering a 1-D weight costs a collective for a few KB
        # (DeepSpeed's own threshold, 1e5 elements, would keep a small model's whole stack).
        cfg["zero_optimization"].update({"stage3_prefetch_bucket_size": 0,
                                         "stage3_param_persistence_threshold": run.model.n_embd})
    return cfg


def build_optimizer(model: RecursiveGPT, run: RunConfig) -> torch.optim.Optimizer:
    """AdamW, one group per parameter kind with its own learning rate; no weight decay on the
    embedding, norms, initial states and halting head."""
    t = run.train
    lrs = {"matrix": t.matrix_lr, "embedding": t.embedding_lr, "lm_head": t.lm_head_lr,
           "scalar": t.scalar_lr}
    decay = {"matrix": t.weight_decay, "lm_head": t.weight_decay, "embedding": 0.0,
             "scalar": 0.0}
    groups = [{"params": [p for _, p in named], "lr": lrs[kind], "weight_decay": decay[kind],
               "name": kind}
              for kind, named in model.parameter_groups().items() if named]
    return torch.optim.AdamW(groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                             fused=torch.cuda.is_available())


def lr_multiplier(opt_step: int, total: int, warmup: int, shape: str, warmdown_frac: float,
                  final_frac: float) -> float:
    """Linear warm-up to 1, then constant, or a cosine/linear warm-down over the last part."""
    if warmup and opt_step < warmup:
        return (opt_step + 1) / warmup
    if shape == "constant":
        return 1.0
    start = total - int(warmdown_frac * total)
    if opt_step < start:
        return 1.0
    # counted to the end of the step, so the last one (opt_step = total - 1) gets final_frac
    progress = min(1.0, (opt_step + 1 - start) / max(1, total - start))
    if shape == "linear":
        return 1.0 - (1.0 - final_frac) * progress
    return final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_steps(run: RunConfig) -> int:
    n = run.train.max_steps
    return n * run.model.N_sup if run.train.update_mode == "per_step" else n


def build_scheduler(opt: torch.optim.Optimizer, run: RunConfig):
    t = run.train
    fn = functools.partial(lr_multiplier, total=optimizer_steps(run),
                           warmup=t.warmup_steps * (run.model.N_sup
                                                    if t.update_mode == "per_step" else 1),
                           shape=t.warmdown, warmdown_frac=t.warmdown_frac,
                           final_frac=t.final_lr_frac)
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)


def activation_checkpoint_fn(impl: str, ds_config: dict[str, Any]):
    if impl == "deepspeed":
        import deepspeed

        deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
        # its non-reentrant variant: the reentrant one produces the shared weights' gradients in
        # several backward phases, which ZeRO-2/3 refuse ("Gradient computed twice")
        return deepspeed.checkpointing.non_reentrant_checkpoint
    from torch.utils.checkpoint import checkpoint

    return functools.partial(checkpoint, use_reentrant=False)


def parallelize(run: RunConfig, world_size: int, load_universal: bool = False):
    """Build model + DeepSpeed engine. Returns (engine, model, optimizer, scheduler)."""
    choose_accelerator()  # before deepspeed is imported
    import deepspeed

    from launcher.engine.safe_load import SafeTorchCheckpointEngine

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    # the same initial weights on every rank, from a forked generator: the caller's per-rank
    # stream (seed + rank) goes on untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.train.seed)
        model = RecursiveGPT(run.model)
    ds_cfg = deepspeed_config(run, world_size)
    if load_universal:
        ds_cfg["checkpoint"] = {"load_universal": True}
    if run.train.activation_checkpointing:
        model.set_activation_checkpointing(
            activation_checkpoint_fn(run.train.checkpoint_impl, ds_cfg))
    if run.train.compile:
        model.stack.compile()
    opt = build_optimizer(model, run)
    sched = build_scheduler(opt, run)
    # DeepSpeed puts the engine on cuda:LOCAL_RANK unless told a device; Ray Train makes its
    # worker's own GPU current (ray.train.torch.get_device()), which need not be that index
    # within CUDA_VISIBLE_DEVICES: follow the current device, so the engine and every tensor
    # made on launcher.engine.dist.device() agree
    args = (argparse.Namespace(device_rank=torch.cuda.current_device())
            if torch.cuda.is_available() else None)
    engine, opt, _, sched = deepspeed.initialize(
        args=args, model=SupervisionStepModule(model), optimizer=opt, lr_scheduler=sched,
        config=ds_cfg, dist_init_required=False)
    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)  # zip format, as its own
    return engine, model, opt, sched
