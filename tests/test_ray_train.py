"""The Ray Train path end to end, real Ray and DeepSpeed on CPU (gloo), a private local Ray per run
(loopback, started by the launcher and gone with it):

- `make train` in a fresh copy of the repo exits 0 through a TorchTrainer, prints where the run,
  metrics, plots and checkpoints are and how to resume/eval/sample; `make eval` and `make sample`
  use its checkpoint;
- a Ray Train worker SIGKILLed mid-run: the group restarts, resumes from the latest complete
  checkpoint and finishes with weights, EMA and losses bit-identical to an uninterrupted run;
- extending a run: 4 steps with --max-steps 4, then --resume latest --max-steps 8 continues.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--set", "sequence_len=64", "--set", "device_batch_size=2", "--set", "log_every=1",
         "--set", "eval_every=1000", "--set", "eval_batches=1", "--set", "warmup_steps=3",
         "--set", "checkpoint_every=4"]

pytestmark = pytest.mark.slow


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
         "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    for k in ("TRMGPT_FAULTS", "RAY_ADDRESS", "DS_ACCELERATOR"):
        e.pop(k, None)
    return {**e, **extra}


def ray_train(run_dir: Path, *args: str, workers: int = 2) -> list[str]:
    return [sys.executable, "-m", "launcher", "train", "--ray", "--workers", str(workers),
            "--preset", "tiny", "--run-dir", str(run_dir), *SMALL, *args]


def launch(cmd: list[str], cwd: Path = REPO, e: dict | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout the whole group goes (the private
    Ray the launcher started included), not only the launcher."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=e or env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-3000:]}\n"
                             f"{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run(cmd: list[str], cwd: Path = REPO, **kw) -> subprocess.CompletedProcess:
    res = launch(cmd, cwd, env(**kw))
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def losses(run_dir: Path) -> dict[int, list[float]]:
    """step -> step losses; a step logged twice (trained again after a restart) keeps its last."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["step_losses"] for r in rows if "step_losses" in r}


def final_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    from launcher.engine.safe_load import safe_load

    tag = run_dir / "checkpoints" / f"step_{step:08d}"
    out = {f"module.{k}": v for k, v in safe_load(tag / "mp_rank_00_model_states.pt")
           ["module"].items()}
    for r in (0, 1):
        f = tag / "trmgpt" / f"rank_{r:05d}.pt"
        if f.exists():
            out.update({f"ema{r}.{k}": v for k, v in safe_load(f)["ema"].items()})
    return out


# ----------------------------------------------------------------------------- make train
def test_make_train_from_a_fresh_copy_then_eval_and_sample(tmp_path):
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    clone = tmp_path / "trmgpt"
    for f in files:
        if (REPO / f).is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, clone / f)
    (clone / ".venv").symlink_to((REPO / ".venv").resolve())
    make = ["make", "--no-print-directory", "-o", ".venv/.installed"]
    t0 = time.time()
    res = run([*make, "train", "RUN=first", "WORKERS=2",
               f"ARGS=--max-steps 4 {' '.join(SMALL)}"], cwd=clone, PYTHONPATH=str(clone))
    print(f"make train (2 workers, 4 steps): {time.time() - t0:.0f} s")
    out = res.stdout
    run_dir = clone / "runs" / "first"
    assert ".venv/bin/python -m launcher train --ray" in out  # the command is printed
    for what in (f"run dir      {run_dir}", f"metrics      {run_dir / 'metrics.jsonl'}",
                 "plots        make plot RUN=first", f"checkpoints  {run_dir / 'checkpoints'}",
                 "make train RUN=first ARGS=\"--resume latest", "make eval RUN=first",
                 "make sample RUN=first"):
        assert what in out, out[-3000:]
    assert (run_dir / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    res = run([*make, "eval", "RUN=first", "ARGS=--batches 1"], cwd=clone, PYTHONPATH=str(clone))
    ev = json.loads(res.stdout[res.stdout.index("{"):])
    # the run's weights, not noise: better than a uniform guess over the vocabulary (what fresh
    # weights give), and bits per byte are that loss over the bytes each token stands for
    vocab = json.loads((run_dir / "config.json").read_text())["model"]["vocab_size"]
    assert 0 < ev["val_loss"] < math.log(vocab) - 0.5, ev
    assert 0 < ev["val_bpb"] < ev["val_loss"] / math.log(2), ev
    res = run([*make, "sample", "RUN=first", "PROMPT=ROMEO:", "ARGS=--max-new-tokens 8"],
              cwd=clone, PYTHONPATH=str(clone))
    assert res.stdout.splitlines()[0].startswith(".venv/bin/python -m launcher sample")
    assert "\nROMEO:" in res.stdout  # the prompt and its continuation


# ----------------------------------------------------------------------------- fault
def train_workers(driver: psutil.Process) -> list[psutil.Process]:
    """The Ray Train worker processes this driver's private Ray started."""
    out = []
    for p in driver.children(recursive=True):
        try:
            if p.cmdline() and p.cmdline()[0].startswith("ray::RayTrainWorker"):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigkilled_worker_restarts_group_and_resumes_to_identical_weights(tmp_path):
    straight, faulty = tmp_path / "straight", tmp_path / "faulty"
    t0 = time.time()
    run(ray_train(straight, "--max-steps", "8"))
    t_straight = time.time() - t0

    t0 = time.time()
    proc = subprocess.Popen(ray_train(faulty, "--max-steps", "8"), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    driver = psutil.Process(proc.pid)
    killed = None
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        done = losses(faulty) if (faulty / "metrics.jsonl").exists() else {}
        if max(done, default=0) >= 5:  # past the step-4 checkpoint, before the end
            workers = train_workers(driver)
            if len(workers) == 2:
                killed = workers[-1]
                killed.send_signal(signal.SIGKILL)
                break
        time.sleep(0.2)
    try:
        out, _ = proc.communicate(timeout=500)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    print(f"uninterrupted: {t_straight:.0f} s; with a SIGKILLed worker: {time.time() - t0:.0f} s")
    assert killed is not None, "the run ended before a worker could be killed:\n" + out[-3000:]
    assert proc.returncode == 0, out[-5000:]
    assert "resumed from" in out and "at step 4" in out, out[-5000:]
    assert sorted(losses(faulty)) == list(range(1, 9))
    # same data order, same updates: every step's losses and the final weights and EMA
    assert losses(faulty) == losses(straight)
    a, b = final_state(straight, 8), final_state(faulty, 8)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- extend
def test_extending_a_run_with_a_larger_max_steps_continues(tmp_path):
    """The streaming loader's fix, on one plain process (the Ray path resumes the same way: the
    Jobs test extends a run through `make resume`): the data goes on where it stopped, to the
    position an 8-step run reaches."""
    run_dir = tmp_path / "ext"
    plain = [sys.executable, "-m", "launcher", "train", "--preset", "tiny", "--run-dir",
             str(run_dir), *SMALL]
    run([*plain, "--max-steps", "4"])
    assert sorted(losses(run_dir)) == [1, 2, 3, 4]
    before = losses(run_dir)
    res = run([*plain, "--max-steps", "8", "--resume", "latest"])
    assert "note: max_steps 4 -> 8" in res.stdout and "lr schedule" in res.stdout
    assert "resumed from" in res.stdout and "at step 4" in res.stdout
    after = losses(run_dir)
    assert sorted(after) == list(range(1, 9))
    assert {s: after[s] for s in before} == before  # steps 1-4 not trained again
    state = json.loads((run_dir / "checkpoints" / "step_00000008" / "trmgpt" / "state.json")
                       .read_text())
    assert state["step"] == 8 and (run_dir / "checkpoints" / "step_00000008" / "COMPLETE").exists()
    # the data continued: after 4 + 4 steps the stream stands where 8 straight steps leave it
    # (restarting it, or skipping, would leave it elsewhere)
    straight = tmp_path / "straight"
    run([sys.executable, "-m", "launcher", "train", "--preset", "tiny", "--run-dir",
         str(straight), *SMALL, "--max-steps", "8"])

    def data_at(d: Path, step: int) -> dict:
        f = d / "checkpoints" / f"step_{step:08d}" / "trmgpt" / "rank_00000.json"
        return json.loads(f.read_text())["data"]

    assert data_at(run_dir, 8) == data_at(straight, 8)
    assert data_at(run_dir, 4) != data_at(run_dir, 8)
    # through Ray, a fresh start into the same folder, or a resume of nothing, is refused before
    # Ray starts
    res = launch(ray_train(run_dir, "--max-steps", "8", workers=1), timeout=120)
    assert res.returncode != 0 and "already holds a run" in res.stderr
    res = launch(ray_train(tmp_path / "empty", "--resume", "latest", workers=1), timeout=120)
    assert res.returncode != 0 and "holds no complete checkpoint" in res.stderr


# ----------------------------------------------------------------------------- errors
def test_a_workers_error_ends_as_one_clear_line(tmp_path):
    """A rank that fails for good (here: non-finite losses three steps in a row, retries off)
    ends the command with one readable line and a non-zero exit, after Ray's own reports."""
    e = env(TRMGPT_FAULTS="nan@1,nan@2,nan@3")
    res = launch(ray_train(tmp_path / "nan", "--max-steps", "4", "--max-failures", "0",
                           workers=1), e=e)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the run failed: ") and "non-finite losses" in last, last
