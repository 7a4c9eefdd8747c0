"""Elastic training on a real two-node Ray cluster on loopback (two raylets on this machine, one
CPU each): a 2-worker run with --min-workers 1 loses a node mid-run (its raylet and workers
SIGKILLed); Ray Train restarts the group on the one node left, the engine converts the 2-rank
checkpoint (DeepSpeed universal) and the run finishes on 1 worker with the same global batch
(2 micro-batches of accumulation) and the global sample order of the pre-tokenized path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest_data import speeches, write_txt_corpus

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
pytestmark = pytest.mark.slow


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """`ray start --block` in its own process group: the head, or a worker node joining it."""

    def __init__(self, tmp: Path, env: dict, name: str, head_port: int | None = None) -> None:
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
               "--num-cpus", "1", "--disable-usage-stats", "--temp-dir", str(tmp / "ray")]
        if head_port is None:
            self.port = free_port()
            cmd += ["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(free_port())]
        else:
            cmd += ["--address", f"127.0.0.1:{head_port}"]
        self.log = open(tmp / f"{name}.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def kill(self) -> None:
        """SIGKILL the node: its raylet, its workers, everything in its process group."""
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        for p in kids:
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def alive_nodes(env: dict, port: int) -> int:
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    res = subprocess.run([str(BIN / "python"), "-c", code, f"127.0.0.1:{port}"], env=env,
                         capture_output=True, text=True, timeout=120)
    return int(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else 0


def test_a_run_that_loses_a_node_goes_on_with_fewer_workers(tmp_path):
    tmp = Path(tempfile.mkdtemp(prefix="re", dir="/tmp"))  # short: Ray's socket paths
    token = tmp / "token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{BIN}:{os.environ['PATH']}",
           # notice a dead node within seconds, not Ray's default half a minute
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
           "RAY_agent_register_timeout_ms": "120000",
           "TRMGPT_FAULTS": ",".join(f"data_stall@{s}" for s in range(3, 7))}
    for k in ("RAY_ADDRESS", "DS_ACCELERATOR"):
        env.pop(k, None)

    # the pre-tokenized path: one global sample order for any number of workers
    write_txt_corpus(tmp_path / "plays", speeches()[:60])
    data = tmp_path / "tok"
    subprocess.run([str(BIN / "python"), "-m", "data_pipeline", "tokenize", "--data",
                    str(tmp_path / "plays"), "--out", str(data), "--tokenizer",
                    "configs/tokenizers/shakespeare-4k", "--workers", "0"],
                   cwd=REPO, env=env, check=True, capture_output=True)

    head = Node(tmp, env, "head")
    second = None
    try:
        time.sleep(5)
        second = Node(tmp, env, "second", head_port=head.port)
        end = time.time() + 240
        while alive_nodes(env, head.port) < 2:
            assert time.time() < end, (tmp / "head.log").read_text()[-3000:]
            time.sleep(2)

        run_dir = tmp_path / "elastic"
        cmd = [sys.executable, "-m", "launcher", "train", "--ray", "--address",
               f"127.0.0.1:{head.port}", "--workers", "2", "--min-workers", "1", "--preset",
               "tiny", "--run-dir", str(run_dir), "--data", str(data), "--max-steps", "6",
               "--set", "sequence_len=64", "--set", "device_batch_size=2", "--set", "log_every=1",
               "--set", "eval_every=1000", "--set", "eval_batches=1", "--set", "warmup_steps=2",
               "--set", "checkpoint_every=2", "--set", "data_path=pretok"]
        out = open(tmp_path / "launcher.log", "w")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        first = run_dir / "checkpoints" / "step_00000002" / "COMPLETE"
        end = time.time() + 600
        while not first.exists():
            assert proc.poll() is None and time.time() < end, \
                (tmp_path / "launcher.log").read_text()[-4000:]
            time.sleep(1)
        second.kill()  # a node is gone: its worker with it
        try:
            code = proc.wait(timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        log = (tmp_path / "launcher.log").read_text()
        assert code == 0, log[-6000:]
    finally:
        for n in (second, head):
            if n is not None:
                n.kill()

    # it went on from a 2-rank checkpoint on one rank, through the universal checkpoint
    assert "(universal: 2 -> 1 ranks)" in log, log[-6000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step_losses" in r]
    assert sorted({r["step"] for r in steps}) == list(range(1, 7))
    state = json.loads((run_dir / "checkpoints" / "step_00000006" / "trmgpt" / "state.json")
                       .read_text())
    assert state["step"] == 6
    # the same global batch throughout: 2 sequences x 64 tokens x 2 (workers, or accumulation)
    assert state["tokens"] == 6 * 2 * 64 * 2
    assert state["data_global"]["consumed_samples"] == 6 * 2 * 2
    meta = json.loads((run_dir / "checkpoints" / "step_00000006" / "COMPLETE").read_text())
    assert meta["world_size"] == 1
