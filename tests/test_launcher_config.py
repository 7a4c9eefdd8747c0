"""Run configuration and the dry run: presets resolve, every key is overridable (nanochat flags
included), and a broken config is refused before anything starts, naming the key and the rule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.engine.config import RunConfig, parse_overrides, resolve
from launcher.engine.describe import memory_estimate

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset,zero,depth", [("tiny", 2, 48), ("A", 1, 768), ("B", 1, 1280),
                                               ("C", 1, 2400), ("D", 1, 2880)])
def test_presets_resolve(preset, zero, depth):
    run = resolve(preset)
    assert run.train.zero_stage == zero and run.model.effective_depth == depth
    assert run.train.activation_checkpointing == (preset != "tiny")


def test_nanochat_flags_and_set_map_onto_model_and_train():
    over = parse_overrides(["n_loops=4", "update_mode=per_step"],
                           ["--depth", "6", "--matrix_lr=2e-4", "--compile", "--n_kv_head", "6"])
    run = resolve("A", over)
    assert (run.model.n_layer, run.model.n_loops, run.model.n_kv_head) == (6, 4, 6)
    assert run.train.matrix_lr == 2e-4 and run.train.compile is True
    assert run.train.update_mode == "per_step"
    again = RunConfig.from_dict(json.loads(json.dumps(run.to_dict())))
    assert again == run


@pytest.mark.parametrize("over,words", [
    ({"n_head": "12"}, ["n_embd", "n_head", "divisible"]),        # B's seeds mistake
    ({"bogus": "1"}, ["unknown config key", "bogus"]),
    ({"zero_stage": "4"}, ["zero_stage", "0, 1, 2 or 3"]),
    ({"update_mode": "sometimes"}, ["update_mode", "accumulate"]),
    ({"global_batch_size": "5"}, ["global_batch_size", "divisible"]),
    ({"max_steps": "0"}, ["max_steps", ">= 1"]),
    ({"n_loops": "two"}, ["n_loops", "int"]),
    ({"matrix_lr": "-1"}, ["matrix_lr", "> 0"]),
])
def test_broken_config_is_refused_naming_key_and_rule(over, words):
    with pytest.raises(ValueError) as e:
        resolve("B", over)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_memory_estimate_shrinks_with_zero_stage_and_checkpointing():
    est = {z: memory_estimate(resolve("B", {"zero_stage": z}), 8)["total"] for z in (0, 1, 2, 3)}
    assert est[0] > est[1] > est[2] > est[3]
    on = memory_estimate(resolve("B"), 8)["activations"]
    off = memory_estimate(resolve("B", {"activation_checkpointing": "false"}), 8)["activations"]
    assert on < off


def test_describe_cli_prints_figures_and_refuses_bad_input():
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, "-m", "launcher", "describe", "--preset", "C",
                          "--nodes", "2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "effective depth 2400 | gradient depth 1200" in res.stdout
    assert "on 16 GPU(s)" in res.stdout
    res = subprocess.run([sys.executable, "-m", "launcher", "describe", "--preset", "C",
                          "--n_kv_head", "5"], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode != 0
    assert "n_head (16) must be divisible by n_kv_head (5)" in res.stderr
