"""The training engine end to end, through `python -m launcher train` as a user runs it: real
DeepSpeed, 1 or 2 processes over gloo, the pre-tokenized test corpus.

- 20 steps straight == 10 steps + resume + 10 steps, bit for bit (losses, lr, EMA weights);
- a 2-rank checkpoint resumes on 1 rank (universal checkpoint) with the same losses;
- DeepSpeed's own zero_to_fp32.py on a ZeRO-3 checkpoint == `launcher export --weights raw`;
- a process killed while writing a checkpoint leaves it unused: the previous one is resumed;
- a NaN loss is skipped and reported; NaNs in a row stop the run with the last good checkpoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, assets_spec, product_env, read_metrics, run_launcher

SMALL = ["--preset", "tiny", "--set", "sequence_len=64", "--set", "device_batch_size=2",
         "--set", "log_every=1", "--set", "eval_every=1000", "--set", "warmup_steps=3",
         "--set", "checkpoint_every=5", "--set", "eval_batches=1"]

pytestmark = pytest.mark.slow
launcher = run_launcher
metrics = read_metrics


def train(run_dir: Path, data: Path, *extra: str, workers: int = 1, check: bool = True,
          **extra_env: str) -> subprocess.CompletedProcess:
    return launcher("train", *SMALL, "--data", str(data), "--run-dir", str(run_dir),
                    "--workers", str(workers), *extra, check=check, **extra_env)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The test plays, tokenized by the pipeline into megatron shards (global sample order)."""
    root = tmp_path_factory.mktemp("data")
    spec = assets_spec(root)
    out = root / "tok"
    res = subprocess.run([sys.executable, "-m", "data_pipeline", "tokenize", "--data", str(spec),
                          "--out", str(out), "--workers", "0", "--quiet"], cwd=REPO,
                         env=product_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data) -> dict[str, Path]:
    """straight: 2 ranks x 20 steps. split: 2 ranks x 10 steps, then resumed to 20 on 2 ranks.
    one: the same 10-step checkpoint resumed on 1 rank with the same global batch."""
    root = tmp_path_factory.mktemp("runs")
    straight, split, one = root / "straight", root / "split", root / "one"
    # the default objective, improvement reward on
    common = ("--max-steps", "20", "--zero", "2")
    train(straight, data, *common, workers=2)
    train(split, data, *common, "--stop-after", "10", workers=2)
    shutil.copytree(split, one)
    train(split, data, *common, "--resume", "latest", workers=2)
    res = train(one, data, *common, "--resume", "latest", "--set", "global_batch_size=4",
                workers=1)
    assert "universal: 2 -> 1 ranks" in res.stdout
    return {"straight": straight, "split": split, "one": one}


def test_resume_is_bit_identical(runs):
    a, b = metrics(runs["straight"]), metrics(runs["split"])
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in range(11, 21):
        assert a[step]["step_losses"] == b[step]["step_losses"], f"step {step}"
        assert a[step]["lr"] == b[step]["lr"], f"step {step}"
    assert a[20]["loss"] < a[1]["loss"]
    # EMA, carried through the checkpoint, ends identical too
    for name in ("straight", "split"):
        launcher("export", "--run-dir", str(runs[name]), "--out", str(runs[name] / "ema.st"))
    from safetensors.torch import load_file

    ea, eb = load_file(runs["straight"] / "ema.st"), load_file(runs["split"] / "ema.st")
    assert ea.keys() == eb.keys()
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_two_rank_checkpoint_resumes_on_one_rank(runs):
    a, c = metrics(runs["straight"]), metrics(runs["one"])
    for step in range(11, 21):
        torch.testing.assert_close(torch.tensor(c[step]["step_losses"]),
                                   torch.tensor(a[step]["step_losses"]), rtol=0, atol=1e-5)


def test_zero_to_fp32_equals_export_raw(tmp_path, data):
    run = tmp_path / "z3"
    # ema_decay 0: the EMA is the weights, so its consolidation from ZeRO-3 partitions is
    # checked exactly against DeepSpeed's own consolidation below
    train(run, data, "--max-steps", "3", "--zero", "3", "--set", "ema_decay=0", workers=2)
    ckpt = run / "checkpoints"
    out = tmp_path / "consolidated"
    res = subprocess.run([sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out),
                          "--tag", "step_00000003"], cwd=REPO, env=product_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    files = sorted(out.glob("*.bin")) + sorted(out.glob("*.safetensors")) if out.is_dir() else []
    if out.is_dir():
        theirs: dict[str, torch.Tensor] = {}
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                theirs.update(load_file(f))
            else:
                theirs.update(torch.load(f, weights_only=True))
    else:
        theirs = torch.load(out, weights_only=True)
    launcher("export", "--run-dir", str(run), "--out", str(tmp_path / "raw.st"),
             "--weights", "raw")
    from safetensors.torch import load_file

    ours = load_file(tmp_path / "raw.st")
    theirs = {k.removeprefix("model."): v for k, v in theirs.items()}
    assert theirs.keys() == ours.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k].float()), k
    launcher("export", "--run-dir", str(run), "--out", str(tmp_path / "ema.st"))
    ema = load_file(tmp_path / "ema.st")
    assert all(torch.equal(ema[k], ours[k]) for k in ours)


def test_killed_while_saving_is_never_resumed(tmp_path, data):
    run = tmp_path / "kill"
    res = train(run, data, "--max-steps", "14", check=False,
                TRMGPT_FAULTS="kill_in_save@10")
    assert res.returncode != 0
    ck = run / "checkpoints"
    assert (ck / "step_00000010").is_dir(), "the fault should hit mid-save"
    assert not (ck / "step_00000010" / "COMPLETE").exists()
    assert (ck / "step_00000005" / "COMPLETE").exists()
    assert (ck / "latest").read_text().strip() == "step_00000005"
    res = train(run, data, "--max-steps", "14", "--resume", "latest")
    assert "step_00000005 at step 5" in res.stdout
    rows = metrics(run)
    assert max(rows) == 14 and (ck / "step_00000014" / "COMPLETE").exists()
    # the finished run serves eval, sample and plot
    res = launcher("eval", "--run-dir", str(run), "--batches", "2")
    ev = json.loads(res.stdout[res.stdout.index("{"):])
    # held-out loss of the EMA weights near the last training losses (within 25%: a 14-step
    # run neither overfits nor lags far behind its EMA), one per supervision step
    assert len(ev["val_step_losses"]) == 4 and ev["val_bpb"] > 0
    last = rows[14]["step_losses"]
    for got, train_loss in zip(ev["val_step_losses"], last, strict=True):
        assert abs(got - train_loss) < 0.25 * train_loss, (ev["val_step_losses"], last)
    res = launcher("sample", "--run-dir", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "8")
    assert res.stdout.startswith("ROMEO:")
    launcher("plot", "--run-dir", str(run))
    assert {p.name for p in (run / "plots").glob("*.png")} == {
        "loss.png", "step_losses.png", "refinement.png"}


def test_nan_is_skipped_then_repeated_nans_stop(tmp_path, data):
    run = tmp_path / "nan"
    res = train(run, data, "--max-steps", "12", "--set", "max_nonfinite=3", check=False,
                TRMGPT_FAULTS="nan@3,nan@7,nan@8,nan@9")
    assert res.returncode == 3, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    assert "step 3: non-finite loss, update skipped (1 in a row, 1 in total)" in out
    assert "stopping: 3 non-finite losses in a row at step 9" in out
    assert "last good checkpoint is step_00000005" in out
    rows = metrics(run)
    assert rows[3]["skipped"] and not rows[4]["skipped"]
    assert rows[4]["nonfinite_total"] == 1
    ck = run / "checkpoints"
    assert (ck / "step_00000005" / "COMPLETE").exists()
    assert not (ck / "step_00000009").exists()
    # the last good checkpoint still loads and exports
    launcher("export", "--run-dir", str(run), "--out", str(tmp_path / "good.st"))
