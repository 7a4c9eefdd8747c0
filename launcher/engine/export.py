"""Weights out of a run directory, in one process, without DeepSpeed's engine: for eval, sample
and export. Raw weights come from DeepSpeed's own consolidation (the code zero_to_fp32.py runs);
EMA weights from the per-rank EMA shards."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from launcher.engine.checkpoint import Checkpointer, ResumePoint
from launcher.engine.config import RunConfig
from launcher.engine.dist import DistInfo
from launcher.engine.ema_shards import ema_full_from_shards
from launcher.engine.safe_load import safe_load, verify_checkpoint_files
from model import RecursiveGPT

PREFIX = "model."  # the engine wraps RecursiveGPT in SupervisionStepModule


def resume_point(run_dir: str | Path, tag: str | None = None) -> ResumePoint:
    """The newest (or the named) complete checkpoint of a run, on local disk."""
    cfg = Path(run_dir) / "config.json"
    root = (RunConfig.load(cfg).train.checkpoint_dir if cfg.exists() else "") or str(
        Path(run_dir) / "checkpoints")
    ck = Checkpointer(root, DistInfo(0, 1, 0), 10**9, Path(run_dir) / ".cache")
    tags = ck.complete_tags()
    if not tags:
        raise FileNotFoundError(f"no complete checkpoint under {root}")
    if tag is not None and tag not in tags:
        raise ValueError(f"{tag} is not a complete checkpoint; have {tags}")
    return ck.fetch(ck, tag or tags[-1])


def raw_weights(rp: ResumePoint) -> dict[str, torch.Tensor]:
    """fp32 weights as DeepSpeed's zero_to_fp32 consolidates them. Stage 0 has no ZeRO files:
    the module file, which holds the training precision (16-bit under bf16/fp16 training)."""
    verify_checkpoint_files(rp.local_dir / rp.tag)
    if int(rp.meta["zero_stage"]) == 0:
        sd = safe_load(rp.local_dir / rp.tag / "mp_rank_00_model_states.pt")["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(rp.local_dir), tag=rp.tag)
    return {k.removeprefix(PREFIX): v.float() for k, v in sd.items()}


def load_weights(run_dir: str | Path, which: str = "ema",
                 tag: str | None = None) -> tuple[RunConfig, dict[str, torch.Tensor], ResumePoint]:
    if which not in ("ema", "raw"):
        raise ValueError(f"--weights must be ema or raw, got {which!r}")
    rp = resume_point(run_dir, tag)
    run = RunConfig.from_dict(rp.state["config"])
    sd = ema_full_from_shards(rp) if which == "ema" else raw_weights(rp)
    return run, sd, rp


def load_model(run_dir: str | Path, which: str = "ema") -> tuple[RunConfig, RecursiveGPT]:
    run, sd, _ = load_weights(run_dir, which)
    model = RecursiveGPT(run.model)
    model.load_state_dict(sd, strict=True)
    return run, model.eval()


def export(run_dir: str | Path, out: str | Path, which: str = "ema") -> Path:
    """safetensors of the weights, the resolved model config in its metadata and beside it."""
    from safetensors.torch import save_file

    run, sd, rp = load_weights(run_dir, which)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config": json.dumps(run.model.to_dict()), "weights": which, "tag": rp.tag,
            "step": str(rp.state["step"])}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out), metadata=meta)
    out.with_suffix(".config.json").write_text(json.dumps(run.model.to_dict(), indent=2))
    return out
