"""The Ray layer's decisions that need no cluster: Ray's experiment identity from the run folder,
the elastic sizes Ray may pick, what a cluster can run, where the client finds the token."""

from __future__ import annotations

import pytest

from launcher.engine.config import resolve
from launcher.jobs import ray_jobs
from launcher.jobs.ray_train import elastic_batch, experiment_path


def test_ray_identity_is_the_run_folder():
    assert experiment_path("s3://bucket/run") == ("s3://bucket", "run")  # not "s3:/"
    assert experiment_path("s3://b/prefix/runA") == ("s3://b/prefix", "runA")
    assert experiment_path("/home/u/runs/x/") == ("/home/u/runs", "x")
    # two runs under one prefix: two names, so Ray never restores one run's state into another
    assert experiment_path("gs://b/p/A")[1] != experiment_path("gs://b/p/B")[1]
    with pytest.raises(ValueError, match="needs a parent folder"):
        experiment_path("s3://bucket")


def test_every_elastic_size_ray_may_pick_is_checked():
    run = resolve("tiny", {"device_batch_size": "2", "data_path": "pretok"}, world_size=8)
    with pytest.raises(ValueError, match=r"over \[6, 7\] worker") as e:
        elastic_batch(run, (6, 8), 8)  # 16 sequences split over 8 (and 4) workers only
    assert "global_batch_size=336" in str(e.value)  # 2 x lcm(6, 7, 8)
    run = resolve("tiny", {"device_batch_size": "2", "data_path": "pretok",
                           "global_batch_size": "336"}, world_size=8)
    elastic_batch(run, (6, 8), 8)


def nodes(*res: dict) -> list[dict]:
    return [{"state": "ALIVE", "resources_total": r} for r in res]


def test_the_cluster_is_checked_before_a_job_is_sent():
    cpu_only = nodes({"CPU": 8}, {"CPU": 16})
    with pytest.raises(ray_jobs.JobsError, match=r"no GPU \(2 node\(s\): 8 CPU/0 GPU, 16 CPU"):
        ray_jobs.plan_workers(cpu_only, 2, cpu=False, gpus_per_node=None)
    assert ray_jobs.plan_workers(cpu_only, 2, cpu=True, gpus_per_node=None) == (2, 1, 8)
    gpus = nodes({"CPU": 8}, {"CPU": 192, "GPU": 8}, {"CPU": 192, "GPU": 8})
    # 8 workers a node, the node's CPUs shared out among them (one each left to Ray)
    assert ray_jobs.plan_workers(gpus, 2, cpu=False, gpus_per_node=None) == (16, 8, 23)
    with pytest.raises(ray_jobs.JobsError, match=r"NODES=3 x 8 GPUs = 24 GPU workers; the "
                                                 r"cluster has 3 node\(s\)"):
        ray_jobs.plan_workers(gpus, 3, cpu=False, gpus_per_node=None)


def test_storage_is_required_and_must_be_object_storage():
    with pytest.raises(ray_jobs.JobsError, match="STORAGE is required"):
        ray_jobs.storage_url(None)
    with pytest.raises(ray_jobs.JobsError, match="local path"):
        ray_jobs.storage_url("/mnt/runs")
    assert ray_jobs.storage_url("s3://b/p/") == "s3://b/p"


def test_the_token_is_found_where_rays_loader_looks(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert ray_jobs.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc\n")
    assert ray_jobs.auth_token() == "abc"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert ray_jobs.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert ray_jobs.auth_token() == "from-env"


def test_a_checkpoint_is_registered_on_the_storages_own_filesystem(tmp_path):
    """Ray Train V2 accepts a NO_UPLOAD checkpoint only on the storage's filesystem object and
    under its experiment folder; anything else raises in report() and restarts the group at
    every checkpoint (what `Checkpoint("s3://...")` did: pyarrow's S3 filesystem is not the
    fsspec one the storage uses)."""
    from types import SimpleNamespace

    import ray.train
    from ray.train.v2._internal.execution.context import is_managed_checkpoint

    from launcher.jobs.ray_train import ray_checkpoint, storage_filesystem

    pa_fs, parent = storage_filesystem("s3://bucket/runs")
    storage = SimpleNamespace(storage_filesystem=pa_fs, experiment_fs_path=f"{parent}/run1")
    url = "s3://bucket/runs/run1/checkpoints/step_00000002"
    ck = ray_checkpoint(url, storage)
    assert ck is not None and is_managed_checkpoint(storage, ck)
    # the old way: Checkpoint(url) got pyarrow's own S3 filesystem (made here with its region
    # given, so nothing resolves it over the network)
    from pyarrow.fs import S3FileSystem

    old = ray.train.Checkpoint(url.removeprefix("s3://"), filesystem=S3FileSystem(
        region="us-east-1"))
    assert not is_managed_checkpoint(storage, old)
    # a checkpoint_dir outside the run folder (a sibling run's, another prefix): not Ray's
    assert ray_checkpoint("s3://bucket/runs/run10/checkpoints/step_00000002", storage) is None
    assert ray_checkpoint("s3://bucket/ck/first/step_00000002", storage) is None
    # a local run folder
    from pyarrow.fs import LocalFileSystem

    local = SimpleNamespace(storage_filesystem=LocalFileSystem(),
                            experiment_fs_path=str(tmp_path / "run"))
    ck = ray_checkpoint(str(tmp_path / "run" / "checkpoints" / "step_00000004"), local)
    assert ck is not None and is_managed_checkpoint(local, ck)
