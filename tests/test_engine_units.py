"""Small pieces of the engine that need no process group: the learning-rate schedule's end, the
MFU peak table, DeepSpeed's accelerator choice, the staging folder of a remote checkpoint root,
and the evaluation sums behind bits per byte."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from launcher.engine.checkpoint import Checkpointer
from launcher.engine.dist import DistInfo, choose_accelerator, engine_env
from launcher.engine.evaluate import eval_sums, summarize
from launcher.engine.metrics import peak_flops_per_device
from launcher.engine.parallelize import lr_multiplier


@pytest.mark.parametrize("shape", ["linear", "cosine"])
@pytest.mark.parametrize("total,warmdown_frac", [(10, 0.5), (7, 0.3), (4, 1.0), (100, 0.2)])
def test_the_last_step_reaches_final_lr_frac(shape, total, warmdown_frac):
    lrs = [lr_multiplier(k, total, warmup=1, shape=shape, warmdown_frac=warmdown_frac,
                         final_frac=0.1) for k in range(total)]  # the lr of update k
    assert lrs[-1] == pytest.approx(0.1, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False)), lrs  # never rises again


def test_the_peak_table_knows_precision_and_form_factor():
    sxm, pcie = "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe"
    assert peak_flops_per_device("bf16", sxm) == 989e12
    assert peak_flops_per_device("bf16", pcie) == 756e12
    # an fp32 run's matmuls run in fp32 (torch's default, no TF32): far below the bf16 peak
    assert peak_flops_per_device("fp32", sxm) == 67e12
    assert peak_flops_per_device("fp32", "NVIDIA A100-SXM4-80GB") == 19.5e12
    assert peak_flops_per_device("bf16", "NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops_per_device("bf16", "NVIDIA A10") == 125e12
    # unknown parts (an A10G is not an A10; an H100 of unnamed form) get no peak, so no MFU
    assert peak_flops_per_device("bf16", "NVIDIA A10G") is None
    assert peak_flops_per_device("bf16", "NVIDIA H100") is None


def test_the_accelerator_follows_the_machine(monkeypatch):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert choose_accelerator(cuda=True) == "cuda"
    import os

    assert os.environ["DS_ACCELERATOR"] == "cuda"
    monkeypatch.delenv("DS_ACCELERATOR")
    assert choose_accelerator(cuda=False) == "cpu"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # an explicit choice is kept (and reported)
    assert choose_accelerator(cuda=True) == "cpu"


def test_runs_whose_folders_share_a_name_stage_apart(tmp_path: Path):
    def staged(url: str) -> Path:
        return Checkpointer(url, DistInfo(0, 1, 0), 3, tmp_path / "cache").local

    a, b = staged("memory://bucket-a/runs/exp1"), staged("memory://bucket-b/runs/exp1")
    assert a != b
    assert staged("memory://bucket-a/runs/exp1/") == a  # a restart finds its own staging
    assert "exp1" in a.parent.name


def test_bits_per_byte_leaves_out_targets_without_bytes():
    torch.manual_seed(0)
    vocab = 16
    token_bytes = torch.randint(1, 4, (vocab,))
    token_bytes[0] = 0                                  # EOS: a target that stands for no text
    logits = torch.randn(2, 6, vocab)
    targets = torch.tensor([[3, 0, 5, 7, 0, 2], [1, -1, -1, 9, 0, 4]])
    sums = eval_sums(logits, targets, token_bytes)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, vocab), targets.view(-1),
                                           ignore_index=-1, reduction="none").double()
    scored = targets.view(-1) != -1
    text = scored & (targets.view(-1) != 0)
    nbytes = token_bytes[targets.view(-1)[text]].sum().item()
    torch.testing.assert_close(sums, torch.tensor(
        [ce[scored].sum().item(), scored.sum().item(), ce[text].sum().item(), nbytes],
        dtype=torch.float64))
    m = summarize(sums.view(1, -1))
    assert m["val_loss"] == pytest.approx(ce[scored].mean().item())
    assert m["val_bpb"] == pytest.approx(ce[text].sum().item() / (math.log(2) * nbytes))


def test_a_build_lock_left_by_a_killed_build_is_cleared_and_a_live_one_kept(tmp_path, monkeypatch):
    """torch's JIT build holds `<op>/lock` (FileBaton) and every other process waits for it to
    go; a build killed half-way left one here once and every later run hung in DeepSpeed's shm
    op build. engine_env (every command that may import deepspeed) clears locks no build could
    still hold (nothing in the op's folder changed for 20 minutes), and leaves one whose build
    is still writing objects alone."""
    import os
    import time

    from torch.utils.file_baton import FileBaton

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "deepspeed_shm_comm", tmp_path / "other_op"
    stale.mkdir()
    live.mkdir()
    assert FileBaton(str(stale / "lock")).try_acquire()  # what torch leaves when killed
    assert FileBaton(str(live / "lock")).try_acquire()
    (live / "shm.o").write_bytes(b"")  # a build still writing: its lock is old, its objects not
    old = time.time() - 3600
    for f in (stale / "lock", live / "lock"):
        os.utime(f, (old, old))
    engine_env()
    assert not (stale / "lock").exists() and (live / "lock").exists()
    assert FileBaton(str(stale / "lock")).try_acquire()  # the next build can take it
