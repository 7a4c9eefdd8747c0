"""The issue-16 switches (depth_sampling + backprop_recursions, exit_gate) through the engine's
interfaces: the step module the DeepSpeed engine wraps (one call per supervision step, the
carry handed back in), the trainer's evaluation, and `python -m launcher train` with a resume
that must draw the same depths as the run it continues."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from launcher.engine.evaluate import eval_batch
from launcher.engine.parallelize import SupervisionStepModule
from model import RecursiveGPT, StepCarry
from tests.helpers import read_losses, run_launcher

SWITCHES = {"exit_gate": True, "depth_sampling": "poisson", "T_recursion": 3,
            "backprop_recursions": 2, "zero_init_out": False}


def test_step_module_path_equals_the_models_per_step_path(tiny_config):
    """What train_step does with the engine (objective, carry, y, z = module(..., prev)) gives
    the gradients of the model's own per-step loop, and the same drawn depths."""
    cfg = tiny_config(**SWITCHES)
    torch.manual_seed(0)
    a = RecursiveGPT(cfg).double()
    torch.nn.init.normal_(a.exit_gate.weight, std=0.5)
    b = RecursiveGPT(cfg).double()
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, cfg.vocab_size, (2, 16))
    module = SupervisionStepModule(a)
    for _ in range(2):  # two batches: the draw counter moves on alike
        y = z = prev = None
        for s in range(cfg.N_sup):
            objective, prev, y, z = module(idx, y, z, tgt, s, prev)
            assert isinstance(prev, StepCarry) and prev.loss.grad_fn is None
            objective.backward()
        y = z = prev = None
        for s in range(cfg.N_sup):
            st = b.supervision_step(idx, y, z, tgt, step=s, prev_loss=prev)
            st.objective.backward()
            y, z, prev = st.y, st.z, st.carry
    assert int(a.depth_draws) == int(b.depth_draws) == 2
    gb = dict(b.named_parameters())
    for n, p in a.named_parameters():
        torch.testing.assert_close(p.grad, gb[n].grad, rtol=1e-12, atol=0, msg=n)
    # the trainer's evaluation hands the carry along too, and runs the fixed depth
    a.eval()
    with torch.no_grad():
        sums = eval_batch(module, idx, tgt, cfg.N_sup, torch.ones(cfg.vocab_size, dtype=torch.long))
    assert sums.shape[0] == cfg.N_sup and torch.isfinite(sums).all()
    assert int(a.depth_draws) == 2


SMALL = ["--preset", "tiny", "--set", "sequence_len=32", "--set", "device_batch_size=2",
         "--set", "log_every=1", "--set", "eval_every=1000", "--set", "checkpoint_every=2",
         "--set", "eval_batches=1", "--set", "exit_gate=true", "--set", "depth_sampling=poisson",
         "--set", "backprop_recursions=2", "--max-steps", "4"]


@pytest.mark.slow
def test_trainer_with_the_switches_resumes_the_same_depth_draws(tmp_path: Path):
    """4 steps straight == 2 steps + resume + 2 steps, loss for loss: the depth draws follow
    the batch counter saved in the checkpoint (a resume that restarted it would draw other
    depths, and other losses)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_launcher("train", *SMALL, "--run-dir", str(straight))
    run_launcher("train", *SMALL, "--run-dir", str(split), "--stop-after", "2")
    run_launcher("train", *SMALL, "--run-dir", str(split), "--resume", "latest")
    a, b = read_losses(straight), read_losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=0), step
    shutil.rmtree(tmp_path, ignore_errors=True)
