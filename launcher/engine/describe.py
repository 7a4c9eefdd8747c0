"""`launcher describe`: the resolved config and its derived figures. Provisions nothing."""

from __future__ import annotations

import dataclasses
import json

from launcher.engine.config import RunConfig
from launcher.engine.parallelize import micro_steps_per_update, resolve_precision


def memory_estimate(run: RunConfig, world: int) -> dict[str, float]:
    """GiB per GPU: weights, gradients and AdamW state as ZeRO partitions them, plus activations
    of one supervision step (only one is alive at a time). An estimate, not a measurement."""
    m, t = run.model, run.train
    p_all = m.num_params(non_embedding=False)
    bf16 = resolve_precision(t.precision) in ("bf16", "fp16") or t.precision == "auto"
    w_bytes = 2 if bf16 else 4
    stage = t.zero_stage
    weights = p_all * w_bytes / (world if stage >= 3 else 1)
    grads = p_all * w_bytes / (world if stage >= 2 else 1)
    optim = p_all * (12 if bf16 else 8) / (world if stage >= 1 else 1)  # master + m + v
    B, T, E, H = t.device_batch_size, m.sequence_len, m.n_embd, m.mlp_hidden
    per_block = B * T * (10 * E + 3 * H) * w_bytes  # saved tensors of one block, flash attention
    graded_apps = m.n_loops + 1                       # stack applications with gradients per step
    if t.activation_checkpointing:  # inputs of each application + one application recomputed
        acts = graded_apps * B * T * E * w_bytes + m.n_layer * per_block
    else:
        acts = graded_apps * m.n_layer * per_block
    logits = B * T * m.vocab_size * 4 * 2             # fp32 logits and their gradient
    gib = 2**30
    parts = {"weights": weights, "gradients": grads, "optimizer": optim,
             "activations": acts, "logits": logits}
    out = {k: round(v / gib, 2) for k, v in parts.items()}
    out["total"] = round(sum(parts.values()) / gib, 2)
    return out


def describe(run: RunConfig, world: int) -> str:
    fig = run.model.summary()
    tokens_per_step = (run.train.device_batch_size * run.model.sequence_len
                       * run.train.grad_accum(world) * world)
    info = {
        "preset": run.preset,
        "model": run.model.to_dict(),
        "train": dataclasses.asdict(run.train),
        "world_size": world,
        "derived": {**fig, "tokens_per_optimizer_step": tokens_per_step,
                    "deepspeed_gradient_accumulation_steps": micro_steps_per_update(run, world),
                    "precision": resolve_precision(run.train.precision)},
        "memory_per_gpu_gib_estimate": memory_estimate(run, world),
    }
    lines = [json.dumps(info, indent=2),
             f"{run.preset}: {fig['params_non_embedding'] / 1e6:.1f}M params (non-embedding), "
             f"{fig['params_total'] / 1e6:.1f}M total | effective depth "
             f"{fig['effective_depth']} | gradient depth {fig['gradient_depth']} | "
             f"{fig['flops_per_token_train'] / 1e9:.2f} GFLOP/token (training) | "
             f"~{info['memory_per_gpu_gib_estimate']['total']} GiB/GPU on {world} GPU(s)"]
    return "\n".join(lines)
