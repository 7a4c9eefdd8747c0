"""Checkpoints through fsspec to object storage: `memory://` stands in for s3/gs (same fsspec
API; the staging, upload, COMPLETE marker and download paths are the ones a bucket takes).
One real DeepSpeed rank; the memory filesystem lives in that process, so the whole story —
train, stop, resume from the remote copy, compare with an uninterrupted run — runs inside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed import run_distributed

ASSETS = Path(__file__).resolve().parent / "assets" / "shakespeare"


def story(root: str) -> dict:
    import os

    os.environ["WANDB_MODE"] = "disabled"
    import fsspec

    from launcher.engine.config import resolve
    from launcher.engine.train import train

    spec = Path(root) / "spec.yaml"
    spec.write_text(f"name: assets\nsources:\n  - path: {ASSETS}/train/*.txt\n"
                    f"val_sources:\n  - path: {ASSETS}/val/*.txt\n")
    over = {"sequence_len": 64, "device_batch_size": 2, "log_every": 1, "eval_every": 100,
            "eval_batches": 1, "warmup_steps": 2, "max_steps": 6, "checkpoint_every": 3,
            "keep_last": 2,
            "data": str(spec), "zero_stage": 2}
    remote = resolve("tiny", {**over, "checkpoint_dir": "memory://bucket/run"})
    os.environ["TRMGPT_CACHE"] = str(Path(root) / "cache")
    assert train(remote, f"{root}/remote", stop_at=3) == 0
    fs = fsspec.filesystem("memory")
    after_stop = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/bucket/run", detail=False))
    # a restart on the same node (its cache is there), then on a fresh one (no cache)
    assert train(remote, f"{root}/remote", resume="latest", stop_at=4) == 0
    import shutil

    shutil.rmtree(Path(root) / "cache")
    assert train(remote, f"{root}/remote", resume="latest") == 0
    final = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/bucket/run", detail=False))
    marker = json.loads(fs.cat("/bucket/run/step_00000006/COMPLETE"))
    assert train(resolve("tiny", over), f"{root}/local") == 0

    def losses(d: str) -> dict[int, list[float]]:
        rows = [json.loads(x) for x in Path(d, "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["step_losses"] for r in rows if "loss" in r}

    return {"after_stop": after_stop, "final": final, "marker": marker,
            "remote": losses(f"{root}/remote"), "local": losses(f"{root}/local")}


@pytest.mark.slow
def test_checkpoints_round_trip_through_object_storage(tmp_path):
    out = run_distributed(story, world=1, args=(str(tmp_path),))[0]
    assert "step_00000003" in out["after_stop"] and "latest" in out["after_stop"]
    # keep_last 2 pruned step 3 from the bucket
    assert {"step_00000004", "step_00000006", "zero_to_fp32.py"} <= set(out["final"])
    assert "step_00000003" not in out["final"]
    assert out["marker"]["step"] == 6 and out["marker"]["world_size"] == 1
    remote = {int(k): v for k, v in out["remote"].items()}
    local = {int(k): v for k, v in out["local"].items()}
    assert sorted(local) == list(range(1, 7))
    for step in range(4, 7):  # the steps after the resume from the bucket
        assert remote[step] == local[step], step
