"""Ray Jobs against a real head: `ray start --head` on 127.0.0.1 with token authentication (a token
file of the test's own), then the make targets as a user types them:

- `make submit` sends a short tiny job (a TorchTrainer inside the job); it ends SUCCEEDED with a
  checkpoint and metrics; `make status` and `make logs` report it;
- `make resume RUN=... ARGS="--max-steps 5"` resubmits it with --resume latest: it continues;
- `make stop` stops a running job;
- a planted fake WANDB_API_KEY (in the submitting user's environment, and on the "node" as the
  mounted key file) appears in no file under the run directories or Ray's session folder.

One head for the module, on free ports and its own temp dir; torn down by its process group (never
a bare `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
KEY = "fake-wandb-key-PLANTED-" + secrets.token_hex(8)
SMALL = ("--set sequence_len=64 --set device_batch_size=2 --set log_every=1 --set eval_every=1000 "
         "--set eval_batches=1 --set warmup_steps=2 --set checkpoint_every=2")

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Head:
    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths
        self.token = self.tmp / "token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        node = self.tmp / "node"
        node.mkdir()
        (node / "wandb_api_key").write_text(KEY)  # what cluster-up mounts on a real node
        (node / "wandb_api_key").chmod(0o600)
        self.runs = self.tmp / "runs"
        gcs, dash, client, agent, agent_grpc, rt_env, metrics, nm, om = free_ports(9)
        self.address = f"http://127.0.0.1:{dash}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token),
                    "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}:{os.environ['PATH']}",
                    "PYTHONPATH": str(REPO), "WANDB_MODE": "offline",
                    "TRMGPT_WANDB_KEY_FILE": str(node / "wandb_api_key")}
        for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "WANDB_API_KEY", "TRMGPT_FAULTS"):
            self.env.pop(k, None)
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
               "--ray-client-server-port", str(client), "--dashboard-agent-listen-port",
               str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
               "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics),
               "--node-manager-port", str(nm), "--object-manager-port", str(om),
               "--temp-dir", str(self.tmp / "ray"), "--num-cpus", "2", "--disable-usage-stats"]
        self.log = open(self.tmp / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # its own process group

    def wait_ready(self, timeout: float = 300) -> None:
        """Until a client holding the token can list jobs (the HTTP server answers before the
        job module is up, and a loaded machine takes its time)."""
        code = ("from ray.job_submission import JobSubmissionClient as C; import sys; "
                "C(sys.argv[1]).list_jobs()")
        end = time.time() + timeout
        while time.time() < end:
            assert self.proc.poll() is None, (self.tmp / "head.log").read_text()[-3000:]
            res = subprocess.run([str(BIN / "python"), "-c", code, self.address], env=self.env,
                                 capture_output=True, text=True, timeout=120)
            if res.returncode == 0:
                return
            time.sleep(2)
        raise TimeoutError((self.tmp / "head.log").read_text()[-3000:])

    def stop(self) -> None:
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in psutil.process_iter(["pid", "cmdline"]):  # anything of ours that left the group
            try:
                if str(self.tmp) in " ".join(p.info["cmdline"] or []):
                    p.kill()
            except psutil.Error:
                pass
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    h = Head()
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()


def make(h: Head, *args: str, key: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    env = {**h.env, "RAY_ADDRESS": h.address}
    env.pop("TRMGPT_WANDB_KEY_FILE")  # the client is not a node
    if key:
        env["WANDB_API_KEY"] = KEY    # the submitting user's environment holds the key
    res = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", *args],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert res.returncode == 0, f"make {args}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def status_of(h: Head, run: str) -> dict[str, str]:
    out = make(h, "status").stdout
    for line in out.splitlines():
        cols = line.split()
        if cols and cols[0] == run:
            return {"state": cols[1], "step": cols[2], "loss": cols[3], "line": line}
    return {}


def wait_for(h: Head, run: str, states: set[str], timeout: float = 400) -> dict[str, str]:
    end = time.time() + timeout
    while time.time() < end:
        st = status_of(h, run)
        if st.get("state") in states:
            return st
        time.sleep(3)
    logs = make(h, "logs", f"RUN={run}", check=False).stdout
    raise TimeoutError(f"{run} never reached {states}: {st}\n{logs[-4000:]}")


def submit(h: Head, steps: int) -> str:
    res = make(h, "submit", "PRESET=tiny", "NODES=1",
               f"ARGS=--cpu --runs-root {h.runs} --max-steps {steps} {SMALL}")
    assert ".venv/bin/python -m launcher submit --preset tiny --nodes 1" in res.stdout
    assert "not sent with the job" in res.stderr  # the user is told where the key goes instead
    return re.search(r"submitted run (\S+)", res.stdout).group(1)


def test_submit_succeeds_with_checkpoint_and_metrics_and_status_and_logs_report_it(head):
    t0 = time.time()
    run = submit(head, 3)
    st = wait_for(head, run, {"SUCCEEDED", "FAILED", "STOPPED"})
    print(f"submit -> SUCCEEDED: {time.time() - t0:.0f} s")
    assert st["state"] == "SUCCEEDED", make(head, "logs", f"RUN={run}").stdout[-4000:]
    assert st["step"] == "3" and float(st["loss"]) > 0
    run_dir = head.runs / run
    assert (run_dir / "checkpoints" / "step_00000003" / "COMPLETE").exists()
    assert '"step": 3' in (run_dir / "metrics.jsonl").read_text()
    logs = make(head, "logs", f"RUN={run}").stdout
    assert re.search(r"step\s+3 \| loss", logs) and "launcher train --ray --address auto" in logs

    # make resume: the same command again with --resume latest, here extending the run
    res = make(head, "resume", f"RUN={run}", "ARGS=--max-steps 5")
    assert f"as job {run}-r1" in res.stdout
    st = wait_for(head, run, {"SUCCEEDED", "FAILED", "STOPPED"})
    assert st["state"] == "SUCCEEDED" and st["step"] == "5", st
    assert (run_dir / "checkpoints" / "step_00000005" / "COMPLETE").exists()
    logs = make(head, "logs", f"RUN={run}").stdout
    assert "resumed from" in logs and "at step 3" in logs


def test_stop_stops_a_running_job(head):
    run = submit(head, 2000)
    wait_for(head, run, {"RUNNING"}, timeout=120)
    res = make(head, "stop", f"RUN={run}")
    assert f"stopping job {run}" in res.stdout
    st = wait_for(head, run, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout=120)
    assert st["state"] == "STOPPED"


def test_the_planted_key_is_in_no_file_of_the_runs_or_of_rays_session(head):
    assert (head.runs).exists() and any(head.runs.iterdir())
    needle = KEY.encode()
    scanned, found = 0, []
    for root in (head.runs, head.tmp / "ray"):
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink() and not p.name.endswith(".sock"):
                scanned += 1
                try:
                    if needle in p.read_bytes():
                        found.append(str(p))
                except OSError:
                    pass
    assert scanned > 50, scanned  # Ray's session logs were really there to read
    assert not found, found
    # and Ray hands no client the key: the jobs' runtime_env carries settings only
    code = ("from ray.job_submission import JobSubmissionClient as C; import sys; "
            "print(repr(C(sys.argv[1]).list_jobs()))")
    res = subprocess.run([str(BIN / "python"), "-c", code, head.address], env=head.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "runtime_env" in res.stdout and "HF_HUB_OFFLINE" in res.stdout
    assert KEY not in res.stdout
