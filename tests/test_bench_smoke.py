"""The bench scripts still run: each one on its --quick settings, then the report from their
JSON. These check that the scripts work and write what bench/report.py reads, never how fast
anything is (benchmarks are not timed tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

# script -> keys its JSON must hold; the slow ones take more than 20 s on 2 cores
SCRIPTS = {
    "overhead": (["rows", "batch", "target"], True),
    "cost_model": (["rows", "fit", "worst_deviation"], False),
    "inference": (["generation", "halting"], False),
    "model_step": (["throughput", "memory", "one_graph_control"], True),
    "data_throughput": (["rows", "a_tok_s", "a_flops_per_token"], False),
    "gpu": (["rows", "cuda"], False),
}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench") / "results"


def run(args: list[str], timeout: float = 170) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if slow else n for n, (_, slow) in SCRIPTS.items()])
def test_script_runs_quick_and_writes_its_json(name, results_dir):
    out = results_dir / f"{name}.json"
    res = run([f"bench/{name}.py", "--quick", "--json", str(out)])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in SCRIPTS[name][0] + ["machine", "finished"]:
        assert key in data, key
    if name == "gpu":  # every configuration ran, bf16, with a kernel and an estimate recorded
        # A's training config (ZeRO-1, checkpointing), compiled, and ZeRO-3, through DeepSpeed
        assert [r["config"] for r in data["rows"]] == ["base", "compile", "zero3"]
        assert [(r["zero"], r["ckpt"], r["compile"]) for r in data["rows"]] == [
            (1, True, False), (1, True, True), (3, True, False)]
        for r in data["rows"]:
            assert "error" not in r, r
            assert r["precision"] == "bf16" and r["tokens_per_s"] > 0, r
            assert r["sdpa_kernels"] == ["flash"], r  # the fused kernel, not math
            assert isinstance(r["mem_estimate_gib"], float), r  # rounds to 0 GiB at this size


def test_gpu_bench_fails_when_a_configuration_fails(results_dir):
    """A configuration that cannot run (a refused config, planted with --set) fails the whole
    script, though its JSON is still written with the failed row saying why."""
    out = results_dir.parent / "gpu_failed.json"
    res = run(["bench/gpu.py", "--configs", "base", "--steps", "1", "--set", "n_kv_head=3",
               "--json", str(out)])
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "FAILED: A/base" in res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 1 and "n_kv_head" in rows[0]["error"], rows


def test_gpu_check_refuses_a_machine_without_cuda():
    """`make gpu-check` on this CPU-only machine says so and exits non-zero, measuring nothing."""
    res = run(["bench/gpu.py", "--check", "--json", os.devnull])
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "no CUDA GPU on this machine" in res.stderr


def test_report_renders_what_the_scripts_wrote(results_dir):
    present = sorted(p.stem for p in results_dir.glob("*.json"))
    if not present:  # run on its own: one script's results to render
        res = run(["bench/cost_model.py", "--quick", "--json",
                   str(results_dir / "cost_model.json")])
        assert res.returncode == 0, res.stderr[-3000:]
        present = ["cost_model"]
    res = run(["bench/report.py", "--render-only", "--out", str(results_dir.parent)])
    assert res.returncode == 0, res.stderr[-3000:]
    text = (results_dir.parent / "REPORT.md").read_text()
    assert "## Targets" in text
    if "gpu" in present:  # this machine has no GPU: the section must say so, not claim figures
        gpu = json.loads((results_dir / "gpu.json").read_text())
        assert not gpu["cuda"]
        assert "pending a GPU machine" in text and "Measured on" not in text
        assert f"All {len(gpu['rows'])} configurations ran." in text
    if "cost_model" in present:
        assert (results_dir.parent / "cost_model.png").exists()


def test_largest_batch_search_finds_the_limit():
    from gpu import largest_batch

    tried = []

    def fits(b):
        tried.append(b)
        return b <= 37

    assert largest_batch(fits, 4, 1024) == (37, False)
    assert tried[:4] == [8, 16, 32, 64]           # doubling, then bisection
    assert len(tried) <= 4 + 5
    assert largest_batch(lambda b: True, 4, 20) == (20, True)   # nothing failed: the cap
    assert largest_batch(lambda b: b <= 4, 4, 1024) == (4, False)


def test_recursion_study_runs_both_update_modes_and_across_steps(monkeypatch):
    """recursion_study's single runs: per_step makes an optimizer step after every supervision
    step (N_sup per batch), accumulate one per batch, and --backprop-across-steps trains."""
    import math

    import recursion_study as rs

    updates: list[int] = []
    build = rs.build_optimizer

    def counted(model, run):
        opt = build(model, run)
        opt.register_step_post_hook(lambda *_: updates.append(1))
        return opt

    monkeypatch.setattr(rs, "build_optimizer", counted)
    val, tbytes = rs.val_set("tiny", 1)
    small = {"device_batch_size": "2"}
    for mode, per_batch in (("accumulate", 1), ("per_step", 4)):
        updates.clear()
        res = rs.run_config(mode, "tiny", {**small, "update_mode": mode}, 2, None, 2, val, tbytes,
                            threads=1, log=lambda *_: None)
        assert res.steps == 2 and res.tokens == 2 * 2 * 256
        assert len(updates) == 2 * per_batch, mode
    res = rs.run_config("across", "tiny", {**small, "T_recursion": "1"}, 2, None, 2, val, tbytes,
                        threads=1, log=lambda *_: None, across=True)
    assert math.isfinite(res.final["val_loss"]) and len(res.final["val_step_losses"]) == 4
