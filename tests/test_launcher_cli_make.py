"""The make targets: `make help` lists every one, `make -n` shows the command each would run, and
invalid input to each (unknown preset, NODES=0, a bad override, a missing RUN) stops it with one
clear line and a non-zero exit before anything is provisioned or submitted.

"Nothing submitted" is shown by pointing RAY_ADDRESS at a port where no cluster listens: a target
that reached the cluster would fail with "no Ray cluster answers"; these fail on the input first.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.helpers import REPO, run_make

NO_CLUSTER = "http://127.0.0.1:9"


def make(*args: str, dry: bool = False, **env: str) -> subprocess.CompletedProcess:
    return run_make(*args, dry=dry, **{"RAY_ADDRESS": NO_CLUSTER, "RAY_API_SERVER_ADDRESS": None,
                                       **env})


def phony_targets() -> list[str]:
    text = (REPO / "Makefile").read_text()
    block = re.search(r"^\.PHONY:(.*?)(?<!\\)\n", text, re.S | re.M).group(1)
    return block.replace("\\", " ").split()


DRY = {  # target -> (variables, what its command line must contain)
    "help": ([], "awk"),
    # -B: the recipe itself (the install stamp is up to date here): torch pinned in the same
    # pip command as the project, so nothing pulls another torch
    "setup": (["-B"], "pip install -q --disable-pip-version-check torch==2.13.0 -e '.[dev]'"),
    "test": ([], "pytest -q -n 2 --dist loadfile --durations=15 tests"),
    "test-fast": ([], 'pytest -q -n 2 --dist loadfile -m "not slow" tests'),
    "lint": ([], "ruff check ."),
    "format": ([], "ruff format ."),
    "train": (["WORKERS=2"], "python -m launcher train --ray --preset tiny --workers 2"),
    "describe": (["PRESET=B", "NODES=4"], "python -m launcher describe --preset B --nodes 4"),
    "eval": (["RUN=r1"], "python -m launcher eval --run-dir runs/r1"),
    "sample": (["RUN=r1"], 'python -m launcher sample --run-dir runs/r1 --prompt "ROMEO:"'),
    "export": (["RUN=r1"], "--out runs/r1/export.safetensors"),
    "plot": (["RUN=r1"], "python -m launcher plot --run-dir runs/r1"),
    "cluster-up": (["CLOUD=gcp", "GPU=h100", "NODES=2", "STORAGE=gs://b/p"],
                   "python -m cluster up --cloud gcp --gpu h100 --nodes 2 --storage gs://b/p"),
    "cluster-down": ([], "python -m cluster down --cloud aws --gpu a100"),
    "dashboard": ([], "python -m cluster dashboard --cloud aws --gpu a100"),
    "submit": (["PRESET=B", "NODES=4", "ARGS=--n_loops=4"],
               "python -m launcher submit --preset B --nodes 4 --n_loops=4"),
    "resume": (["RUN=B-1"], "python -m launcher resume --run B-1"),
    "logs": (["RUN=B-1"], "python -m launcher logs --run B-1"),
    "status": ([], "python -m launcher status"),
    "stop": (["RUN=B-1"], "python -m launcher stop --run B-1"),
    "study": ([], "bench/recursion_study.py --steps 180"),
    "bench": ([], "bench/model_step.py"),
    "gpu-check": ([], "bench/gpu.py --check"),
    "clean": ([], "rm -rf runs"),
    "tokenizer": (["DATA=configs/data/fineweb-edu-10BT.yaml", "VOCAB=50304"],
                  "python -m data_pipeline tokenizer train --data "
                  "configs/data/fineweb-edu-10BT.yaml --vocab 50304"),
    "data": (["DATA=configs/data/fineweb-edu-10BT.yaml", "TOKENIZER=storage/tokenizers/t"],
             "python -m data_pipeline data --data configs/data/fineweb-edu-10BT.yaml "
             "--tokenizer storage/tokenizers/t"),
}


def test_every_target_is_covered_and_listed_by_help():
    assert set(phony_targets()) == set(DRY)
    res = make("help")
    assert res.returncode == 0
    listed = set(re.findall(r"make (\S+)", res.stdout))
    assert set(DRY) - {"help"} <= listed


@pytest.mark.parametrize("target", sorted(DRY))
def test_make_n_shows_the_command(target):
    variables, expect = DRY[target]
    res = make(target, *variables, dry=True)
    assert res.returncode == 0, res.stderr
    assert expect in res.stdout


BAD = [  # (target, variables, message)
    ("train", ["PRESET=Z"], "unknown PRESET 'Z'"),
    ("train", ["WORKERS=0"], "WORKERS must be a whole number >= 1"),
    ("train", ["ARGS=--n_head=5"], "n_embd (128) must be divisible by n_head (5)"),
    ("train", ["ARGS=--no_such_key=1"], "unknown config key 'no_such_key'"),
    ("train", ["ARGS=--data /nonexistent/x.txt"], "data source '/nonexistent/x.txt' matches no"),
    ("describe", ["PRESET=Z"], "unknown PRESET 'Z'"),
    ("describe", ["NODES=0"], "NODES must be a whole number >= 1"),
    ("submit", ["PRESET=Z"], "unknown PRESET 'Z'"),
    ("submit", ["NODES=0"], "NODES must be a whole number >= 1"),
    ("submit", ["NODES=two"], "NODES must be a whole number >= 1"),
    ("submit", ["PRESET=B", "NODES=3", "ARGS=--n_head=12"],
     "n_embd (1024) must be divisible by n_head (12)"),
    ("submit", ["ARGS=--zero 5"], "invalid choice: 5"),
    ("submit", ["ARGS=--max-steps 0"], "max_steps must be >= 1"),
    ("submit", ["PRESET=B", "NODES=2", "ARGS=--min-workers 8"],
     "elastic workers need the pre-tokenized data path"),
    ("submit", ["NODES=2", "ARGS=--min-workers 20"], "--min-workers must be in [1, 16]"),
    # a recipe preset whose tokenizer is not made yet: the make target that makes it
    ("submit", ["PRESET=A", "STORAGE=/nonexistent/trmgpt"], "make it with `make tokenizer DATA="),
    ("train", ["PRESET=A", "WORKERS=1", "STORAGE=/nonexistent/trmgpt"],
     "make it with `make tokenizer DATA="),
    ("cluster-up", ["NODES=0"], "NODES must be a whole number >= 1"),
    ("cluster-up", ["CLOUD=azure"], "CLOUD must be aws or gcp"),
    ("cluster-up", ["GPU=v100"], "GPU must be a100 or h100"),
    ("cluster-up", ["NODES=2"], "object storage every node can write"),
    ("cluster-down", ["CLOUD=azure"], "CLOUD must be aws or gcp"),
    ("dashboard", ["GPU=t4"], "GPU must be a100 or h100"),
    *[(t, [], "RUN is missing") for t in ("eval", "sample", "export", "plot", "resume", "logs",
                                          "stop")],
]


@pytest.mark.parametrize("target,variables,message", BAD,
                         ids=[f"{t}-{'-'.join(v) or 'noRUN'}" for t, v, _ in BAD])
def test_bad_input_is_refused_before_anything_starts(tmp_path, target, variables, message):
    res = make(target, *variables, HOME=str(tmp_path))
    out = res.stdout + res.stderr
    assert res.returncode != 0
    assert message in out, out[-2000:]
    assert "Traceback" not in out
    assert "no Ray cluster answers" not in out        # refused before contacting a cluster
    assert "+ ray up" not in out                     # nothing provisioned
    assert not (tmp_path / ".trmgpt").exists()


def test_cluster_targets_without_a_cluster_say_how_to_get_one():
    for target, variables in (("status", []), ("logs", ["RUN=x"]), ("stop", ["RUN=x"]),
                              ("resume", ["RUN=x"])):
        res = make(target, *variables)
        assert res.returncode != 0
        assert f"no Ray cluster answers at {NO_CLUSTER}" in res.stderr
        assert "make cluster-up" in res.stderr and "Traceback" not in res.stderr


def test_makefile_leaves_the_accelerator_to_python():
    assert "DS_ACCELERATOR" not in (REPO / "Makefile").read_text()
