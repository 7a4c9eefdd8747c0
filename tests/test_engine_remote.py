"""Checkpoints through fsspec to object storage, on two stores: a real S3-protocol server on
127.0.0.1 (moto, the `s3` fixture: s3fs over HTTP, S3's put/get semantics, no rename, no
directories) and `memory://` (fsspec's in-process dict). The staging, upload, COMPLETE marker,
pruning and download paths are the ones a bucket takes. One real DeepSpeed rank: train, stop,
resume from the remote copy on the same node and on a fresh one (no local cache), compare with an
uninterrupted local run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.helpers import assets_spec, read_losses

STORES = ["memory", "s3"]


def story(root: str, urls: dict[str, str]) -> dict:
    """For each store: 3 steps, stop; resume to 4, stop; drop the node's cache, resume to 6.
    Then the same 6 steps locally in one go."""
    import os

    os.environ["WANDB_MODE"] = "disabled"
    import fsspec

    from launcher.engine.config import resolve
    from launcher.engine.train import train

    spec = assets_spec(Path(root))
    over = {"sequence_len": 64, "device_batch_size": 2, "log_every": 1, "eval_every": 100,
            "eval_batches": 1, "warmup_steps": 2, "max_steps": 6, "checkpoint_every": 3,
            "keep_last": 2, "data": str(spec), "zero_stage": 2}
    out: dict = {}
    for store, url in urls.items():
        run_dir, cache = f"{root}/{store}", Path(root) / f"cache-{store}"
        remote = resolve("tiny", {**over, "checkpoint_dir": url})
        os.environ["TRMGPT_CACHE"] = str(cache)
        fs, path = fsspec.core.url_to_fs(url)

        def names(fs=fs, path=path) -> list[str]:
            fs.invalidate_cache()
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))

        assert train(remote, run_dir, stop_at=3) == 0
        after_stop = names()
        # a restart on the same node (its cache is there), then on a fresh one (no cache)
        assert train(remote, run_dir, resume="latest", stop_at=4) == 0
        shutil.rmtree(cache)
        assert train(remote, run_dir, resume="latest") == 0
        out[store] = {"after_stop": after_stop, "final": names(),
                      "marker": json.loads(fs.cat(f"{path}/step_00000006/COMPLETE")),
                      "losses": read_losses(Path(run_dir))}
    os.environ["TRMGPT_CACHE"] = str(Path(root) / "cache-local")
    assert train(resolve("tiny", over), f"{root}/local") == 0
    out["local"] = read_losses(Path(f"{root}/local"))
    return out


@pytest.fixture(scope="module")
def stories(s3, tmp_path_factory) -> dict:
    urls = {"memory": "memory://bucket/run", "s3": s3.bucket() + "/run"}
    root = tmp_path_factory.mktemp("remote")
    return run_distributed(story, world=1, args=(str(root), urls))[0]


@pytest.mark.slow
@pytest.mark.parametrize("store", STORES)
def test_checkpoints_round_trip_through_object_storage(stories, store):
    out = stories[store]
    assert "step_00000003" in out["after_stop"] and "latest" in out["after_stop"]
    # keep_last 2 pruned step 3 from the bucket
    assert {"step_00000004", "step_00000006", "zero_to_fp32.py"} <= set(out["final"])
    assert "step_00000003" not in out["final"]
    assert out["marker"]["step"] == 6 and out["marker"]["world_size"] == 1
    remote = {int(k): v for k, v in out["losses"].items()}
    local = {int(k): v for k, v in stories["local"].items()}
    assert sorted(local) == sorted(remote) == list(range(1, 7))
    for step in range(1, 7):  # bit for bit, before and after each resume from the bucket
        assert remote[step] == local[step], step
