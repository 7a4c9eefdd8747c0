"""What `launcher train` does with a run directory that already holds work, through the CLI as a
user (or a restarting cluster) calls it: one real DeepSpeed rank, gloo, streamed test plays.

- a fresh start into a folder with checkpoints or metrics is refused and changes nothing;
- --resume latest with nothing complete to resume stops, and so does a checkpoint DeepSpeed
  has nothing to load from;
- a resume drops the metrics rows logged after its checkpoint (no step logged twice);
- tokens/s counts the time spent waiting for data; the logged lr is the one the update used,
  and the last step's is final_lr_frac of the peak.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import assets_spec
from tests.helpers import run_launcher as launcher

pytestmark = pytest.mark.slow
LR = 1e-3
ARGS = ["--preset", "tiny", "--set", "sequence_len=64", "--set", "device_batch_size=2",
        "--set", "log_every=1", "--set", "eval_every=1000", "--set", "checkpoint_every=2",
        "--set", "warmup_steps=2", "--set", "warmdown=linear", "--set", "warmdown_frac=1.0",
        "--set", "final_lr_frac=0.1", "--set", f"matrix_lr={LR}", "--zero", "2",
        "--max-steps", "4"]
TOKENS_PER_STEP = 2 * 64  # device_batch_size x sequence_len x 1 rank


def train(run_dir: Path, data: Path, *extra: str, check: bool = True, **env: str):
    return launcher("train", *ARGS, "--data", str(data), "--run-dir", str(run_dir), *extra,
                    check=check, **env)


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def snapshot(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return assets_spec(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, data) -> Path:
    """4 steps logged, step 2 checkpointed, the process killed while writing step 4's."""
    run = tmp_path_factory.mktemp("runs") / "crashed"
    res = train(run, data, check=False, TRMGPT_FAULTS="kill_in_save@4")
    assert res.returncode != 0
    assert (run / "checkpoints" / "step_00000002" / "COMPLETE").exists()
    assert not (run / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4]
    return run


def test_a_fresh_start_into_an_earlier_run_is_refused(crashed, data, tmp_path):
    only_metrics = tmp_path / "only_metrics"
    only_metrics.mkdir()
    shutil.copy(crashed / "metrics.jsonl", only_metrics / "metrics.jsonl")
    for run in (crashed, only_metrics):
        before = snapshot(run)
        res = train(run, data, check=False)
        assert res.returncode != 0
        msg = res.stderr + res.stdout
        assert str(run) in msg and "--resume latest" in msg and "--run-dir" in msg, msg[-2000:]
        assert snapshot(run) == before, "a refused start touched the run"


def test_resume_latest_with_nothing_to_resume_stops(data, tmp_path):
    res = train(tmp_path / "new", data, "--resume", "latest", check=False)
    assert res.returncode != 0
    assert "no complete checkpoint" in res.stderr + res.stdout, res.stderr[-2000:]
    assert not (tmp_path / "new" / "metrics.jsonl").exists()


def test_a_checkpoint_deepspeed_cannot_load_stops_the_resume(crashed, data, tmp_path):
    run = tmp_path / "broken"
    shutil.copytree(crashed, run)
    for f in (run / "checkpoints" / "step_00000002").glob("*model_states.pt"):
        f.unlink()
    res = train(run, data, "--resume", "latest", check=False)
    assert res.returncode != 0
    assert "nothing to resume" in res.stderr + res.stdout, res.stderr[-2000:]


def test_resume_logs_each_step_once_and_counts_data_stalls(crashed, data, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(crashed, run)
    res = train(run, data, "--resume", "latest", TRMGPT_FAULTS="data_stall@3")
    assert "at step 2" in res.stdout
    got = rows(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4], "rows after the checkpoint logged twice"
    by_step = {r["step"]: r for r in got}
    # step 3 waited a second for its batch: the step time tokens/s implies must be longer than
    # its neighbours' by most of that second (relative to the same run's steps, not an
    # absolute rate a slow machine meets anyway)
    secs = {s: TOKENS_PER_STEP / by_step[s]["tokens_per_s"] for s in (2, 3, 4)}
    assert secs[3] - max(secs[2], secs[4]) > 0.7, secs
    # lr of the update itself: warm-up 1/2, then linear decay to final_lr_frac at the last step
    assert by_step[1]["lr"] == pytest.approx(LR * 0.5)
    assert by_step[4]["lr"] == pytest.approx(LR * 0.1)
    assert "mfu" not in by_step[4]  # no known peak on a CPU: no MFU rather than a wrong one
