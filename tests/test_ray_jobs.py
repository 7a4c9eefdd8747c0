"""Ray Jobs against a real head: `ray start --head` on 127.0.0.1 with token authentication (a token
file of the test's own), the runs' STORAGE a real S3-protocol server on 127.0.0.1, then the make
targets as a user types them (the client has no RAY_AUTH_MODE: the targets send the token):

- `make submit` sends a short tiny job (a TorchTrainer inside the job); it ends SUCCEEDED with a
  checkpoint and metrics in the bucket; `make status` and `make logs` report it;
- `make resume RUN=... ARGS="--max-steps 5"` resubmits it with --resume latest: it continues;
- `make stop` asks a running job to checkpoint, and it stops at that checkpoint;
- a planted fake WANDB_API_KEY (in the submitting user's environment, and on the "node" as the
  mounted key file, which a worker is shown to read) appears in no file of Ray's session folder
  and no object of the bucket; the scan finds the key when it is planted in a file.

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
    def __init__(self, s3) -> None:
        self.bucket = s3.bucket()
        self.storage = f"{self.bucket}/runs"
        self.s3 = s3
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
                    "TRMGPT_WANDB_KEY_FILE": str(node / "wandb_api_key"),
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **s3.env}
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
        """Until a client holding the token can list jobs and sees the head node alive (the
        HTTP server answers before the job module is up and before the raylet registers, and a
        loaded machine takes its time)."""
        code = ("from ray.job_submission import JobSubmissionClient as C; import sys; "
                "from launcher.jobs.ray_jobs import cluster_nodes; c = C(sys.argv[1]); "
                "c.list_jobs(); sys.exit(0 if cluster_nodes(c, wait=0) else 1)")
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
def head(s3):
    h = Head(s3)
    try:
        h.wait_ready()
        yield h
    finally:
        h.stop()


def make(h: Head, *args: str, key: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    env = {**h.env, "RAY_ADDRESS": h.address}
    env.pop("TRMGPT_WANDB_KEY_FILE")  # the client is not a node
    env.pop("RAY_AUTH_MODE")  # a laptop's shell: the make targets send the token themselves
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
    res = make(h, "submit", "PRESET=tiny", "NODES=1", "CPU=1", f"STORAGE={h.storage}",
               f"ARGS=--max-steps {steps} {SMALL}")
    assert ".venv/bin/python -m launcher submit --preset tiny --nodes 1 --cpu" in res.stdout
    assert "not sent with the job" in res.stderr  # the user is told where the key goes instead
    return re.search(r"submitted run (\S+)", res.stdout).group(1)


def test_submit_succeeds_with_checkpoint_and_metrics_and_status_and_logs_report_it(head):
    t0 = time.time()
    run = submit(head, 3)
    st = wait_for(head, run, {"SUCCEEDED", "FAILED", "STOPPED"})
    print(f"submit -> SUCCEEDED: {time.time() - t0:.0f} s")
    assert st["state"] == "SUCCEEDED", make(head, "logs", f"RUN={run}").stdout[-4000:]
    assert st["step"] == "3" and float(st["loss"]) > 0
    fs = head.s3.fs()
    run_dir = f"{head.storage}/{run}"
    assert fs.exists(f"{run_dir}/checkpoints/step_00000003/COMPLETE")
    assert '"step": 3' in fs.cat_file(f"{run_dir}/metrics.jsonl").decode()
    logs = make(head, "logs", f"RUN={run}").stdout
    assert re.search(r"step\s+3 \| loss", logs) and "launcher train --ray --address auto" in logs
    # every checkpoint was registered with Ray, none raised (a failed report restarts the group)
    assert "FailurePolicy" not in logs and "resumed from" not in logs, logs[-5000:]
    # a worker read the node's key file (the key itself is never printed)
    assert f"wandb: the key comes from this node's {head.tmp / 'node' / 'wandb_api_key'}" in logs

    # make resume: the same command again with --resume latest, here extending the run
    res = make(head, "resume", f"RUN={run}", "ARGS=--max-steps 5")
    assert f"as job {run}-r1" in res.stdout
    st = wait_for(head, run, {"SUCCEEDED", "FAILED", "STOPPED"})
    assert st["state"] == "SUCCEEDED" and st["step"] == "5", st
    fs.invalidate_cache()
    assert fs.exists(f"{run_dir}/checkpoints/step_00000005/COMPLETE")
    logs = make(head, "logs", f"RUN={run}").stdout
    assert "resumed from" in logs and "at step 3" in logs


def test_stop_checkpoints_then_stops_a_running_job(head):
    run = submit(head, 2000)
    fs = head.s3.fs()
    run_dir = f"{head.storage}/{run}"
    end = time.time() + 400
    while not fs.exists(f"{run_dir}/checkpoints/step_00000002/COMPLETE"):  # it is training
        assert time.time() < end, make(head, "logs", f"RUN={run}").stdout[-3000:]
        time.sleep(2)
        fs.invalidate_cache()
    res = make(head, "stop", f"RUN={run}", "ARGS=--wait 240")
    assert "checkpointed and stopped" in res.stdout, \
        res.stdout + make(head, "logs", f"RUN={run}", check=False).stdout[-6000:]
    st = wait_for(head, run, {"STOPPED", "FAILED", "SUCCEEDED"}, timeout=60)
    assert st["state"] == "SUCCEEDED", st  # it left by itself, at a checkpoint
    logs = make(head, "logs", f"RUN={run}").stdout
    m = re.search(r"stopping at step (\d+) as asked, after a checkpoint", logs)
    assert m, logs[-3000:]
    fs.invalidate_cache()
    assert fs.exists(f"{run_dir}/checkpoints/step_{int(m.group(1)):08d}/COMPLETE")


def scan(head: Head, needle: bytes) -> tuple[int, list[str]]:
    """(files and objects read, those holding needle): Ray's session folder on the node and
    every object of the runs' bucket. A file that cannot be read fails the test (it would
    otherwise count as scanned, unread)."""
    scanned, found = 0, []
    for p in (head.tmp / "ray").rglob("*"):
        if p.is_file() and not p.is_symlink() and not p.is_socket() and not p.is_fifo():
            scanned += 1
            if needle in p.read_bytes():
                found.append(str(p))
    fs = head.s3.fs()
    for key in fs.find(head.bucket):
        scanned += 1
        if needle in fs.cat_file(key):
            found.append(f"s3://{key}")
    return scanned, found


def test_the_planted_key_is_in_no_file_of_the_runs_or_of_rays_session(head):
    needle = KEY.encode()
    # positive control: the scan finds the key where it is
    planted = f"{head.storage}/control-plant/file.txt"
    head.s3.fs().pipe_file(planted, b"xx" + needle + b"yy")
    scanned, found = scan(head, needle)
    assert found == [planted], found
    head.s3.fs().rm(planted)
    scanned, found = scan(head, needle)
    assert scanned > 50, scanned  # Ray's session logs and the runs' objects were really read
    assert any("/checkpoints/" in k for k in head.s3.fs().find(head.bucket))
    assert not found, found
    # and Ray hands no client the key: the jobs' runtime_env carries settings only
    code = ("from ray.job_submission import JobSubmissionClient as C; import sys; "
            "print(repr(C(sys.argv[1]).list_jobs()))")
    res = subprocess.run([str(BIN / "python"), "-c", code, head.address], env=head.env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "runtime_env" in res.stdout and "TOKENIZERS_PARALLELISM" in res.stdout
    assert KEY not in res.stdout
