"""Nodes that share nothing but object storage: a loopback Ray cluster of a head and two worker
nodes, each in its own mount namespace with a tmpfs over the same folder (its home, cache, Ray
session and staging), so no node sees another's files; the run's storage is a real S3-protocol
server (moto) on 127.0.0.1. The nodes run `.venv/bin/ray` with no venv on their PATH; the head
turns token auth on by itself (a token exists, RAY_AUTH_MODE is unset anywhere), and the client
has no RAY_AUTH_MODE either: the make targets send the token themselves.

- `make submit NODES=2 CPU=1` (pre-tokenized data in the bucket, elastic 1..2 workers): the
  refusals first (no STORAGE; GPUs the cluster lacks); the run's preflight, index cache,
  config, metrics, checkpoints and driver log are in the bucket; the node holding rank 0 is
  SIGKILLed after the first checkpoint: the run goes on from the bucket on the node left and
  SUCCEEDS, with the per-step losses of an uninterrupted run (the global sample order);
- `make status/logs/plot/eval` from a third folder with no copy of the run;
- a group lost during its first checkpoint (after the shards' upload, before COMPLETE) recovers;
- two runs under one STORAGE prefix share no Ray state.

One cluster for the module; each node is torn down by its process group.
"""

from __future__ import annotations

import json
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
from conftest_data import speeches, write_txt_corpus

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
SMALL = ("--set sequence_len=64 --set device_batch_size=2 --set log_every=1 --set eval_every=1000 "
         "--set eval_batches=1 --set warmup_steps=2 --set checkpoint_every=2 "
         "--set data_path=pretok")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """`ray start --block` in a mount namespace of its own: a tmpfs over `root`, so its home,
    caches, staging and Ray session are its alone."""

    def __init__(self, root: Path, logs: Path, env: dict, name: str, head: Node | None = None,
                 cpus: int = 1, ip: str = "127.0.0.1") -> None:
        self.name = name
        # every port chosen here: with a port of 0 the raylet waits for its agents to write
        # theirs to a file, and gives up (a crash) when a loaded machine is slow
        agent, agent_grpc, rt_env, metrics, nm, om = (free_port() for _ in range(6))
        ray = [str(BIN / "ray"), "start", "--block", "--node-ip-address", ip,
               "--num-cpus", str(cpus), "--disable-usage-stats", "--temp-dir", str(root / "ray"),
               "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port",
               str(agent_grpc), "--runtime-env-agent-port", str(rt_env),
               "--metrics-export-port", str(metrics), "--node-manager-port", str(nm),
               "--object-manager-port", str(om)]
        if head is None:
            self.port, self.dash = free_port(), free_port()
            ray += ["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(self.dash), "--ray-client-server-port",
                    str(free_port())]
        else:
            ray += ["--address", f"127.0.0.1:{head.port}"]
        # a node that dies leaves its Ray logs where the test can read them
        setup = (f"mount -t tmpfs -o size=3g tmpfs {root} && mkdir -p {root}/home {root}/cache "
                 f"&& \"$@\"; cp -r {root}/ray/session_latest/logs {logs}/{name}-ray-logs")
        self.log = open(logs / f"{name}.log", "w")
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                      setup, "sh", *ray], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self) -> set[int]:
        """Every process of this node: those in its mount namespace (Ray's workers need not stay
        in the raylet's process tree)."""
        try:
            ns = os.readlink(f"/proc/{self.proc.pid}/ns/mnt")
        except OSError:
            return set()
        out = set()
        for pid in psutil.pids():
            try:
                if os.readlink(f"/proc/{pid}/ns/mnt") == ns:
                    out.add(pid)
            except OSError:
                pass
        return out

    def kill(self) -> None:
        """SIGKILL the node: its raylet, its workers, everything in its process group."""
        for pid in self.pids():
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Cluster:
    def __init__(self, s3) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rm", dir="/tmp"))  # short: Ray's sockets
        self.host = Path(tempfile.mkdtemp(prefix="rmh", dir="/tmp"))  # the test's, not a node's
        self.token = self.host / "token"
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        path = ":".join(p for p in os.environ["PATH"].split(":") if ".venv" not in p)
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("RAY_", "TRMGPT_", "WANDB_", "VIRTUAL_ENV", "PYTHONPATH"))}
        self.node_env = {**base, **s3.env, "PATH": path, "HOME": str(self.root / "home"),
                         "TRMGPT_CACHE": str(self.root / "cache"),
                         "RAY_AUTH_TOKEN_PATH": str(self.token), "RAY_USAGE_STATS_ENABLED": "0",
                         "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                         "HF_DATASETS_OFFLINE": "1",
                         # notice a dead node within seconds, not Ray's default half a minute
                         "RAY_health_check_period_ms": "1000",
                         "RAY_health_check_failure_threshold": "3",
                         "RAY_agent_register_timeout_ms": "120000"}
        self.head = Node(self.root, self.host, self.node_env, "head", cpus=0)
        self.address = f"http://127.0.0.1:{self.head.dash}"
        self.workers: list[Node] = []
        self.runs: list[str] = []  # every run submitted in the module
        self.bucket = s3.bucket()
        self.storage = f"{self.bucket}/runs"
        self.s3 = s3
        # the laptop: its own home (no ~/.ray token, no cache), the token file Ray's loader reads
        (self.host / "laptop").mkdir()
        self.client_env = {**base, **s3.env, "HOME": str(self.host / "laptop"),
                           "RAY_ADDRESS": self.address, "RAY_AUTH_TOKEN_PATH": str(self.token),
                           "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                           "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}

    def add_worker(self) -> Node:
        # the head enabled token auth by itself (a token exists); a node joining it is told
        # (Ray's cluster launcher and cluster/ set RAY_AUTH_MODE=token on every node)
        # an address of its own on loopback (127.0.0.2, .3): Ray tells nodes (and Ray Train
        # its local ranks) apart by IP, as on a real cluster
        n = Node(self.root, self.host, {**self.node_env, "RAY_AUTH_MODE": "token"},
                 f"worker{len(self.workers)}", self.head, ip=f"127.0.0.{len(self.workers) + 2}")
        self.workers.append(n)
        return n

    def alive(self) -> int:
        """Alive nodes, as the laptop sees them (the dashboard's state API: a driver here could
        not attach, the head's raylet socket is in the head's namespace)."""
        code = ("from launcher.jobs.ray_jobs import client, cluster_nodes; "
                "print(len(cluster_nodes(client(), wait=0)))")
        res = subprocess.run([str(BIN / "python"), "-c", code], cwd=REPO,
                             env={**self.client_env, "PYTHONPATH": str(REPO)},
                             capture_output=True, text=True, timeout=120)
        return int(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else 0

    def wait_nodes(self, n: int, timeout: float = 300) -> None:
        end = time.time() + timeout
        while self.alive() < n:
            assert time.time() < end, (self.host / "head.log").read_text()[-3000:]
            time.sleep(2)

    def stop(self) -> None:
        for n in [*self.workers, self.head]:
            n.kill()
            n.log.close()
        time.sleep(1)
        shutil.rmtree(self.root, ignore_errors=True)  # the host's view: nodes wrote nothing here
        shutil.rmtree(self.host, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    c = Cluster(s3)
    try:
        c.wait_nodes(1)  # a node joins a head that is up
        c.add_worker()
        c.wait_nodes(2)
        c.add_worker()
        c.wait_nodes(3)
        # the pre-tokenized corpus, tokenized here and put in the bucket: the nodes read it there
        tmp = tmp_path_factory.mktemp("data")
        # enough text that the held-out split holds whole samples (`make eval` reads one pass)
        write_txt_corpus(tmp / "plays", speeches()[:400])
        env = {**c.client_env, "PYTHONPATH": str(REPO)}
        subprocess.run([str(BIN / "python"), "-m", "data_pipeline", "tokenize", "--data",
                        str(tmp / "plays"), "--out", str(tmp / "tok"), "--tokenizer",
                        "configs/tokenizers/shakespeare-4k", "--workers", "0"],
                       cwd=REPO, env=env, check=True, capture_output=True)
        c.local_data = tmp / "tok"
        c.data = f"{c.bucket}/data/tok"
        s3.fs().put(str(tmp / "tok"), c.data, recursive=True)
        # a third folder: a copy of the repo with no runs/, for the laptop's make targets
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.split()
        c.laptop = tmp_path_factory.mktemp("laptop") / "trmgpt"
        for f in files:
            if (REPO / f).is_file():
                (c.laptop / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / f, c.laptop / f)
        (c.laptop / ".venv").symlink_to((REPO / ".venv").resolve())
        yield c
    finally:
        c.stop()


def make(c: Cluster, *args: str, cwd: Path = REPO, check: bool = True,
         env: dict | None = None) -> subprocess.CompletedProcess:
    res = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", *args],
                         cwd=cwd, env=env or {**c.client_env, "PYTHONPATH": str(cwd)},
                         capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, f"make {args}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def submit(c: Cluster, nodes: int, args: str, storage: str | None = None) -> str:
    res = make(c, "submit", "PRESET=tiny", f"NODES={nodes}", "CPU=1",
               f"STORAGE={storage or c.storage}", f"ARGS={args}")
    run = re.search(r"submitted run (\S+)", res.stdout).group(1)
    c.runs.append(run)
    return run


def state_of(c: Cluster, run: str) -> dict[str, str]:
    for line in make(c, "status").stdout.splitlines():
        cols = line.split()
        if cols and cols[0] == run:
            return {"state": cols[1], "step": cols[2], "loss": cols[3]}
    return {}


def wait_done(c: Cluster, run: str, timeout: float = 900) -> dict[str, str]:
    end = time.time() + timeout
    while time.time() < end:
        st = state_of(c, run)
        if st.get("state") in ("SUCCEEDED", "FAILED", "STOPPED"):
            return st
        time.sleep(4)
    raise TimeoutError(make(c, "logs", f"RUN={run}", check=False).stdout[-5000:])


def losses_of(text: str) -> dict[int, list[float]]:
    rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    return {r["step"]: r["step_losses"] for r in rows if "step_losses" in r}


def test_submit_refusals_say_what_is_missing(cluster):
    c = cluster
    res = make(c, "submit", "NODES=1", "CPU=1", check=False)
    assert res.returncode != 0 and "STORAGE is required" in res.stderr
    res = make(c, "submit", "NODES=2", f"STORAGE={c.storage}", check=False)
    assert res.returncode != 0, res.stdout
    assert "no GPU" in res.stderr and "3 node(s)" in res.stderr and "CPU=1" in res.stderr
    assert "no runs on this cluster" in make(c, "status").stdout  # nothing was sent
    # token auth is really on: a request without the token is refused
    import requests

    assert requests.get(f"{c.address}/api/jobs/", timeout=30).status_code in (401, 403)


def test_two_nodes_share_only_the_bucket_and_survive_losing_rank0s_node(cluster):
    c = cluster
    fs = c.s3.fs()
    t0 = time.time()
    # the uninterrupted reference (one process, the same global batch) trains meanwhile
    straight = c.host / "straight"
    env = {**c.client_env, "PYTHONPATH": str(REPO), "TRMGPT_CACHE": str(c.host / "cache")}
    ref_proc = subprocess.Popen(
        [str(BIN / "python"), "-m", "launcher", "train", "--preset", "tiny", "--run-dir",
         str(straight), "--data", str(c.local_data), "--max-steps", "8", *SMALL.split(),
         "--set", "global_batch_size=4"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    run = submit(c, 2, f"--min-workers 1 --data {c.data} --max-steps 8 {SMALL} "
                       "--faults " + ",".join(f"data_stall@{s}" for s in range(3, 8)))
    base = f"{c.storage}/{run}"
    first = f"{base}/checkpoints/step_00000002/COMPLETE"
    end = time.time() + 600
    while not fs.exists(first):
        assert time.time() < end, make(c, "logs", f"RUN={run}", check=False).stdout[-5000:]
        assert state_of(c, run).get("state") in ("PENDING", "RUNNING"), \
            make(c, "logs", f"RUN={run}", check=False).stdout[-5000:]
        time.sleep(1)
        fs.invalidate_cache()
    pre = json.loads(fs.cat_file(f"{base}/preflight.json"))
    assert pre["workers"] == 2 and pre["nodes"] == 2, pre
    rank0 = next(r for r in pre["ranks"] if r["rank"] == 0)
    victim = c.workers[int(rank0["ip"].rsplit(".", 1)[1]) - 2]  # worker i has 127.0.0.(i+2)
    assert victim.pids(), f"{victim.name} is not running"
    print(f"first checkpoint complete at {time.time() - t0:.0f} s; killing {victim.name}")
    victim.kill()  # rank 0's node, its disk (tmpfs) with it
    st = wait_done(c, run)
    print(f"2 nodes, rank 0's node killed, finished on 1: {time.time() - t0:.0f} s")
    logs = make(c, "logs", f"RUN={run}").stdout
    assert st["state"] == "SUCCEEDED" and st["step"] == "8", logs[-5000:]
    assert "(universal: 2 -> 1 ranks)" in logs, logs[-5000:]
    assert "preflight: 2 worker(s) on 2 node(s); bucket write ok" in logs
    # the job ran on the project's Python though no venv is on the nodes' PATH
    assert f"entry.sh: {BIN.resolve()}/python -m launcher train" in logs or \
        f"entry.sh: {BIN}/python -m launcher train" in logs, logs[:3000]

    # everything of the run is in the bucket; the host (the nodes' shared folder) got nothing
    fs.invalidate_cache()
    assert fs.exists(f"{base}/config.json") and fs.exists(f"{base}/checkpoints/step_00000008"
                                                          "/COMPLETE")
    meta = json.loads(fs.cat_file(f"{base}/checkpoints/step_00000008/COMPLETE"))
    assert meta["world_size"] == 1
    index = [p.rsplit("/", 1)[-1] for p in fs.find(f"{base}/index_cache")]
    assert any(n.endswith(".npy") for n in index) and any(n.startswith(".built-")
                                                          for n in index), index
    assert fs.find(f"{base}/logs"), "no driver log in the bucket"
    assert not any(c.root.iterdir()), list(c.root.iterdir())
    got = losses_of(fs.cat_file(f"{base}/metrics.jsonl").decode())
    assert sorted(got) == list(range(1, 9))

    # the same global sample order as an uninterrupted run: one process, the same global batch
    _, err = ref_proc.communicate(timeout=600)
    assert ref_proc.returncode == 0, err.decode()[-3000:]
    ref = losses_of((straight / "metrics.jsonl").read_text())
    diff = max(abs(a - b) for s in ref for a, b in zip(ref[s], got[s], strict=True))
    # the tolerance tells orders apart: the same run read one step late is far outside it
    shifted = max(abs(a - b) for s in range(1, 8) for a, b in zip(ref[s], ref[s + 1],
                                                                  strict=True))
    print(f"max |loss - uninterrupted| = {diff:.2e}; one step off: {shifted:.2e}")
    assert diff < 2e-3 < shifted, (diff, shifted)
    c.elastic_run = run


def test_status_logs_plot_eval_from_a_third_folder_with_no_copy(cluster):
    c = cluster
    run = getattr(c, "elastic_run", None)
    if run is None:
        pytest.skip("the two-node run failed")
    env = {**c.client_env, "PYTHONPATH": str(c.laptop)}
    assert not (c.laptop / "runs").exists()
    st = make(c, "status", cwd=c.laptop, env=env).stdout
    assert re.search(rf"{run}\s+SUCCEEDED\s+8\s", st), st
    logs = make(c, "logs", f"RUN={run}", cwd=c.laptop, env=env).stdout
    assert "resumed from" in logs
    res = make(c, "plot", f"RUN={run}", f"STORAGE={c.storage}", cwd=c.laptop, env=env)
    assert list((c.laptop / "runs" / run / "plots").glob("*.png")), res.stdout
    res = make(c, "eval", f"RUN={run}", f"STORAGE={c.storage}", "ARGS=--batches 1",
               cwd=c.laptop, env=env)
    out = json.loads(res.stdout[res.stdout.index("{"):])
    assert 0 < out["val_bpb"] < 20, out
    # with the cluster gone (here: no cluster at this address), logs come from the bucket
    gone = {**env, "RAY_ADDRESS": f"http://127.0.0.1:{free_port()}"}
    logs = make(c, "logs", f"RUN={run}", f"STORAGE={c.storage}", cwd=c.laptop, env=gone).stdout
    assert "universal: 2 -> 1 ranks" in logs


def test_a_group_lost_in_its_first_checkpoint_recovers_and_runs_under_one_prefix_share_no_ray_state(
        cluster):
    c = cluster
    c.wait_nodes(2)  # the head and the worker node left
    fs = c.s3.fs()
    ck = f"{c.bucket}/ck/first"  # checkpoints outside the run folder: registered as metrics
    run = submit(c, 1, f"--data {c.data} --max-steps 3 {SMALL} --set checkpoint_dir={ck} "
                       "--faults kill_after_upload@2")
    st = wait_done(c, run)
    logs = make(c, "logs", f"RUN={run}").stdout
    assert st["state"] == "SUCCEEDED" and st["step"] == "3", logs[-5000:]
    assert "[fault injection] kill_after_upload at step 2" in logs
    assert "restart before the first complete checkpoint: dropped ['step_00000002']" in logs
    # one restart (the injected kill), none after it: a report that raised would restart the
    # group and resume it from the checkpoint it had just written
    assert "resumed from" not in logs, logs[-5000:]
    fs.invalidate_cache()
    assert fs.exists(f"{ck}/step_00000003/COMPLETE")
    got = losses_of(fs.cat_file(f"{c.storage}/{run}/metrics.jsonl").decode())
    assert sorted(got) == [1, 2, 3]  # trained from step 1 again, each step logged once
    # two runs under one STORAGE prefix (this one and the two-node run): Ray's own state of each
    # lies in that run's folder (Ray's experiment dir = the run folder), never in a common parent
    runs = c.runs
    assert len(runs) >= 2, runs
    for r in runs:
        assert fs.exists(f"{c.storage}/{r}/.validate_storage_marker"), r
    assert not [p for p in fs.find(c.bucket) if p.rsplit("/", 1)[-1].startswith(".validate")
                and p.rsplit("/", 2)[-2] not in runs]
