"""`launcher describe`: the resolved config and its derived figures. Provisions nothing."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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


# 8-GPU instances: (name, GPU, dense bf16 peak FLOP/s per GPU from the vendor's data sheet).
INSTANCES = [
    ("p4d.24xlarge (AWS)", "A100 40GB SXM", 312e12),
    ("p5.48xlarge (AWS)", "H100 80GB SXM", 989e12),
    ("a2-highgpu-8g (GCP)", "A100 40GB SXM", 312e12),
    ("a3-highgpu-8g (GCP)", "H100 80GB SXM", 989e12),
]
# ASSUMED model FLOPs utilisation per GPU kind (not measured on these GPUs): small widths
# (768-1536) and activation checkpointing's recompute (not counted in the model's FLOPs) keep a
# recursive model below the ~50% a large dense model reaches; H100's higher peak is harder to
# fill at these widths than A100's.
MFU_ASSUMED = {"A100 40GB SXM": 0.35, "H100 80GB SXM": 0.30}
COST_MODEL = Path(__file__).resolve().parents[2] / "bench" / "results" / "cost_model.json"


def cost_model_band() -> tuple[float, str]:
    """(relative uncertainty, where it comes from): bench/cost_model.py measures seconds per
    training FLOP over 27 recursion configurations; its worst deviation from the median bounds
    how far time can stray from FLOPs / (peak x MFU) as n_loops, T and N_sup change."""
    try:
        d = json.loads(COST_MODEL.read_text())
        return float(d["worst_deviation"]), (
            f"bench/results/cost_model.json: seconds per FLOP within {d['worst_deviation']:.0%} "
            f"of the median over {len(d['rows'])} n_loops x T x N_sup configurations")
    except (OSError, KeyError, ValueError):
        return 0.15, "no measured cost model (bench/results/cost_model.json): +-15% assumed"


def cost_estimate(run: RunConfig, world: int) -> dict:
    """Tokens, training FLOPs and, per 8-GPU instance kind, wall time and GPU-hours on
    world // 8 instances at the assumed MFU."""
    t, m = run.train, run.model
    tokens_per_step = t.device_batch_size * m.sequence_len * t.grad_accum(world) * world
    tokens = tokens_per_step * t.max_steps
    fpt = m.flops_per_token(training=True)
    flops = tokens * fpt
    band, source = cost_model_band()
    rows = []
    for name, gpu, peak in INSTANCES:
        mfu = MFU_ASSUMED[gpu]
        hours = flops / (world * peak * mfu) / 3600
        rows.append({"instance": name, "gpu": gpu, "peak_flops": peak, "mfu_assumed": mfu,
                     "hours": hours, "gpu_hours": hours * world})
    return {"tokens": tokens, "steps": t.max_steps, "tokens_per_step": tokens_per_step,
            "token_budget": t.token_budget, "flops_per_token": fpt, "flops": flops,
            "recursion_multiplier": fpt / (6 * m.num_params(non_embedding=True)),
            "gpus": world, "band": band, "band_source": source, "rows": rows}


def format_cost(run: RunConfig, world: int) -> str:
    c = cost_estimate(run, world)
    lines = [
        f"recipe {run.preset}: {c['tokens'] / 1e9:.2f}B tokens ({c['steps']:,} steps x "
        f"{c['tokens_per_step']:,} tokens) x {c['flops_per_token'] / 1e9:.1f} GFLOP/token "
        f"(training, {c['recursion_multiplier']:.0f}x a plain model's 6N) = "
        f"{c['flops']:.3g} training FLOPs",
        f"on {world} GPUs ({max(1, world // 8)} x 8-GPU instances); MFU is an ASSUMPTION "
        f"(A100 {MFU_ASSUMED['A100 40GB SXM']:.0%}, H100 {MFU_ASSUMED['H100 80GB SXM']:.0%}), "
        f"time = FLOPs / (GPUs x peak x MFU), +-{c['band']:.0%} ({c['band_source']}):",
        f"  {'instance':<22} {'GPU':<14} {'peak bf16':>10} {'MFU*':>5} {'hours':>9} "
        f"{'GPU-hours':>10}",
    ]
    for r in c["rows"]:
        lines.append(f"  {r['instance']:<22} {r['gpu']:<14} {r['peak_flops'] / 1e12:>7.0f} TF "
                     f"{r['mfu_assumed']:>5.0%} {r['hours']:>9,.1f} {r['gpu_hours']:>10,.0f}")
    lines.append("  * assumed, not measured on these GPUs")
    return "\n".join(lines)


def inputs_status(run: RunConfig) -> str:
    """One line per input: there, or missing with the make command that makes it."""
    from launcher.engine.config import check_inputs

    try:
        manifest = check_inputs(run)
    except (FileNotFoundError, ValueError) as e:
        return f"inputs: NOT READY: {e}"
    if manifest is None:
        return f"inputs: tokenizer {run.train.tokenizer}; data {run.train.data} (raw, streamed)"
    t = manifest["totals"]
    return (f"inputs: ready: tokenizer {run.train.tokenizer}; data {run.train.data}: "
            f"{t.get('train_tokens', t['tokens']):,} train tokens, "
            f"{t.get('val_tokens', 0):,} val tokens, skipped {t['skipped'] or 'none'}")


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
    if run.train.token_budget:  # a recipe: what it costs and whether its inputs are there
        lines += [format_cost(run, world), inputs_status(run)]
    return "\n".join(lines)
