"""Ray Jobs: submit, status, logs, stop and resume runs on a Ray cluster.

A run is a series of Ray jobs that share one run id and one run folder, $STORAGE/<run id>/ in
object storage (config, metrics, checkpoints, the data index, preflight, job logs): nodes share
nothing else, and the laptop reads a run from there. `submit` starts it (submission id = run
id), `resume` resubmits the same command with `--resume latest` (submission id `<run>-r<n>`).
The job's entrypoint runs launcher/jobs/entry.sh, which starts `-m launcher train --ray
--address auto ...` with the Python that runs the cluster's Ray (not `python` from a PATH):
the driver runs on the head node and its TorchTrainer spreads the workers over the nodes.

The cluster is found as Ray's own CLI finds it: `RAY_API_SERVER_ADDRESS` or `RAY_ADDRESS`, else
http://127.0.0.1:8265 (the head's dashboard port, which `make dashboard` tunnels here). Token
auth: whenever a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token: where
Ray's own loader looks) every request carries it, whether or not RAY_AUTH_MODE is set here
(Ray's client sends it only when it is; a head started with `ray start --head` enables token
auth by itself).

Secrets never ride in the job's runtime_env: Ray returns its env_vars to every client that lists
jobs and writes them to runtime_env_agent.log. The nodes read the wandb key from a mounted file
(launcher.jobs.ray_train.secret_file); cluster/ mounts it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from launcher.engine.config import REPO

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# settings (never secrets) the job carries to the head and the workers. The hubs stay online
# on a cluster (a hub data source streams there); offline is for laptops and tests, whose
# nodes set it in their own environment.
JOB_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
PASS_ENV = ("WANDB_MODE",)
SECRET_NAMES = re.compile(r"(_KEY|_TOKEN|_SECRET|PASSWORD|CREDENTIALS?)$", re.I)
# what the job's working_dir upload leaves behind (Ray also honours .gitignore): run folders,
# tokenized corpora and tokenizer outputs (data/, tok/, *.bin/*.idx shards), caches
EXCLUDES = ["/runs", "/data", "/tok", "/wandb", "**/*.bin", "**/*.idx", "**/__pycache__",
            ".pytest_cache", "bench/REPORT.md", "bench/results", "tests"]
ENTRY = "launcher/jobs/entry.sh"


class JobsError(Exception):
    """A Jobs request that cannot be done (no cluster, unknown run): one line for the user."""


def address() -> str:
    """As `ray job`: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, then the tunnel's local port."""
    return (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def auth_token() -> str | None:
    """The cluster token where Ray's own loader looks for it, in its order."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for p in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if p and Path(p).expanduser().is_file():
            tok = Path(p).expanduser().read_text().strip()
            if tok:
                return tok
    return None


def client(addr: str | None = None):
    from ray.job_submission import JobSubmissionClient

    addr = addr or address()
    if not addr.startswith(("http://", "https://")):
        raise JobsError(f"RAY_ADDRESS={addr!r}: the job API needs the dashboard's http address, "
                        f"e.g. {DEFAULT_ADDRESS} (what `make dashboard` forwards)")
    tok = auth_token()
    # Ray's client adds the token only when RAY_AUTH_MODE=token is set in *this* process; a
    # header of our own is sent always (and Ray then leaves it alone)
    headers = {"Authorization": f"Bearer {tok}"} if tok else None
    try:
        return JobSubmissionClient(addr, headers=headers)
    except Exception as e:  # connection refused, auth refused: say where we looked
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobsError(f"no Ray cluster answers at {addr} ({msg}). Start one with `make "
                        "cluster-up` and open the tunnel with `make dashboard`, or set "
                        "RAY_ADDRESS") from None


def job_env() -> dict[str, str]:
    env = dict(JOB_ENV)
    for k in PASS_ENV:
        if k in os.environ:
            env[k] = os.environ[k]
    if any(SECRET_NAMES.search(k) for k in env):  # never: Ray would hand it to every client
        raise JobsError("refusing to send a secret in the job's runtime_env")
    return env


def entrypoint(argv: list[str]) -> str:
    """entry.sh picks the Python that runs the cluster's Ray (the project's environment on the
    node), then runs `-m launcher ARGV` with it."""
    return " ".join(shlex.quote(a) for a in ["sh", ENTRY, *argv])


def storage_url(storage: str | None) -> str:
    """$STORAGE, checked: every cluster run lives there (nodes share nothing else)."""
    if not storage:
        raise JobsError("STORAGE is required for a cluster run: the run lives in "
                        "$STORAGE/<run id>/ (config, metrics, checkpoints, data index), the "
                        "only place every node and this machine share. Pass STORAGE=s3://bucket"
                        "/prefix (or gs://...), e.g. `make submit STORAGE=s3://my-bucket/runs "
                        "...`, or export TRMGPT_STORAGE")
    if "://" not in storage:
        raise JobsError(f"STORAGE={storage!r} is a local path: the nodes of a cluster don't "
                        "share one. Use object storage (s3://bucket/prefix, gs://...)")
    return storage.rstrip("/")


def cluster_nodes(c, wait: float = 60.0) -> list[dict[str, Any]]:
    """The cluster's alive nodes and their resources (Ray's state API, through the dashboard,
    with the same auth as the job API). The dashboard answers before the head's own raylet has
    registered (a cluster just started, a loaded head): an empty list is asked again for up to
    `wait` seconds, since a cluster that serves this API always has its head node."""
    end = time.time() + wait
    while True:
        r = c._do_request("GET", "/api/v0/nodes?limit=10000&detail=true")
        if r.status_code != 200:
            raise JobsError(f"cannot list the cluster's nodes ({r.status_code}: {r.text[:200]})")
        alive = [n for n in r.json()["data"]["result"]["result"] if n.get("state") == "ALIVE"]
        if alive or time.time() >= end:
            return alive
        time.sleep(2)


def describe_cluster(nodes: list[dict[str, Any]]) -> str:
    parts = []
    for n in nodes:
        res = n.get("resources_total") or {}
        tag = " (head)" if n.get("is_head_node") else ""
        parts.append(f"{int(res.get('CPU', 0))} CPU/{int(res.get('GPU', 0))} GPU{tag}")
    return f"{len(nodes)} node(s): " + ", ".join(parts)


def plan_workers(nodes: list[dict[str, Any]], n: int, cpu: bool,
                 gpus_per_node: int | None) -> tuple[int, int, int]:
    """(workers, gpus per node, CPUs per worker) for N nodes on this cluster, or JobsError
    saying what the cluster has. GPU workers get the CPUs of their node shared out (one left
    for Ray's own processes): data decoding and checkpoint I/O are not meant to run on one
    thread of a 192-vCPU node."""
    have = describe_cluster(nodes)
    gpu_nodes = [nd for nd in nodes if (nd.get("resources_total") or {}).get("GPU", 0) >= 1]
    if cpu:
        cpu_nodes = [nd for nd in nodes if (nd.get("resources_total") or {}).get("CPU", 0) >= 1
                     and not (nd.get("resources_total") or {}).get("GPU")]
        if len(cpu_nodes) < n:
            raise JobsError(f"NODES={n} CPU workers (one per node) need {n} node(s) with CPUs; "
                            f"the cluster has {have}")
        cpus = min(int(nd["resources_total"]["CPU"]) for nd in cpu_nodes)
        return n, 1, cpus
    if not gpu_nodes:
        raise JobsError(f"NODES={n} asks for {n} GPU node(s); the cluster has no GPU ({have}). "
                        "Train on its CPUs with CPU=1 (one worker per node), or bring GPU nodes "
                        "up (make cluster-up)")
    per = gpus_per_node or min(int(nd["resources_total"]["GPU"]) for nd in gpu_nodes)
    fit = [nd for nd in gpu_nodes if nd["resources_total"]["GPU"] >= per]
    if len(fit) < n:
        raise JobsError(f"NODES={n} x {per} GPUs = {n * per} GPU workers; the cluster has "
                        f"{have}")
    cpus = min(int(nd["resources_total"].get("CPU", 1)) for nd in fit)
    return n * per, per, max(1, cpus // per - 1) if cpus > per else 1


def train_argv(preset: str, workers: int, per_node: int, cpus: int, cpu: bool, run_dir: str,
               extra: list[str]) -> list[str]:
    argv = ["train", "--ray", "--address", "auto", "--preset", preset, "--workers",
            str(workers), "--run-dir", run_dir, "--cpus-per-worker", str(cpus)]
    if not cpu:
        argv += ["--gpu", "--gpus-per-node", str(per_node)]
    return argv + extra


def submit(preset: str, nodes: int, extra: list[str], *, gpus_per_node: int | None = None,
           cpu: bool = False, storage: str | None = None, run_id: str | None = None,
           addr: str | None = None, force: bool = False, faults: str | None = None) -> str:
    """Validate here (nothing is sent if the config or the cluster refuses it), then submit.
    Returns the run id."""
    from launcher.jobs.options import run_config_from  # the same resolution `train` does

    if nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {nodes}")
    # what needs no cluster first: the config (as for the cluster's usual nodes), STORAGE
    per0 = 1 if cpu else (gpus_per_node or 8)
    from launcher.engine.config import check_inputs

    check_inputs(run_config_from(preset, extra, nodes * per0, per0))  # tokenizer, data there?
    root = storage_url(storage)
    c = client(addr)
    try:
        workers, per, cpus = plan_workers(cluster_nodes(c), nodes, cpu, gpus_per_node)
    except JobsError:
        if not force:
            raise
        per = 1 if cpu else (gpus_per_node or 8)
        workers, cpus = nodes * per, 1
    run_config_from(preset, extra, workers, per)  # again, for this cluster's nodes
    run_id = run_id or f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = f"{root}/{run_id}"
    argv = train_argv(preset, workers, per, cpus, cpu, run_dir, extra)
    if os.environ.get("WANDB_API_KEY"):
        print("note: WANDB_API_KEY is not sent with the job (Ray would log it); the nodes read "
              "it from the file `make cluster-up` mounted", file=sys.stderr)
    send(c, run_id, run_id, argv, {"preset": preset, "world": workers, "extra": extra,
                                   "run_dir": run_dir, "gpus_per_node": per},
         {"TRMGPT_FAULTS": faults} if faults else {})
    print(f"submitted run {run_id} ({workers} worker(s), {cpus} CPU(s) each) to "
          f"{addr or address()}\n  run folder {run_dir}\n"
          f"  make status | make logs RUN={run_id} | make stop RUN={run_id} | "
          f"make resume RUN={run_id}")
    return run_id


def runs(c) -> dict[str, list[Any]]:
    """run id -> its jobs, oldest first."""
    out: dict[str, list[Any]] = {}
    for j in c.list_jobs():
        rid = (j.metadata or {}).get("trmgpt_run")
        if rid:
            out.setdefault(rid, []).append(j)
    for jobs in out.values():
        jobs.sort(key=lambda j: j.start_time or 0)
    return out


def latest_job(c, run_id: str):
    jobs = runs(c).get(run_id)
    if not jobs:
        known = ", ".join(sorted(runs(c))) or "none"
        raise JobsError(f"no run {run_id!r} on this cluster (runs: {known})")
    return jobs[-1]


def last_row(run_dir: str | None) -> dict[str, Any]:
    """The newest progress row of a run's metrics.jsonl in the bucket: its last few KB only, one
    ranged read (`make status` costs one request per run, never a whole log)."""
    if not run_dir:
        return {}
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(f"{run_dir}/metrics.jsonl")
        size = fs.size(path)
        tail = fs.cat_file(path, start=max(0, size - 8192), end=size).decode(errors="replace")
    except Exception:  # not written yet, or this machine can't read the bucket: no figures
        return {}
    for line in reversed(tail.splitlines()):
        try:
            row = json.loads(line)
        except ValueError:  # the first, cut line
            continue
        if "loss" in row:
            return {"step": row["step"], "loss": row["loss"],
                    "tokens_per_s": row.get("tokens_per_s", 0.0)}
    return {}


def meta_of(job) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in (job.metadata or {}).items() if k != "trmgpt_run"}


def status(addr: str | None = None) -> list[dict[str, Any]]:
    c = client(addr)
    rows = []
    for rid, jobs in sorted(runs(c).items()):
        j = jobs[-1]
        rows.append({"run": rid, "state": str(j.status.value if hasattr(j.status, "value")
                                              else j.status),
                     "job": j.submission_id, "jobs": len(jobs),
                     **last_row(meta_of(j).get("run_dir"))})
    return rows


def format_status(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no runs on this cluster"
    lines = [f"{'run':<28} {'state':<10} {'step':>7} {'loss':>8} {'tok/s':>10}  job"]
    for r in rows:
        loss = f"{r['loss']:.4f}" if "loss" in r else "-"
        toks = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "-"
        lines.append(f"{r['run']:<28} {r['state']:<10} {r.get('step', '-'):>7} {loss:>8} "
                     f"{toks:>10}  {r['job']} ({r['jobs']} job(s))")
    return "\n".join(lines)


def logs(run_id: str, follow: bool = False, addr: str | None = None) -> None:
    """The run's job logs from the cluster; once the cluster is gone (or forgot the run), the
    copies each job's driver left in $STORAGE/<id>/logs/."""
    try:
        c = client(addr)
        j = latest_job(c, run_id)
    except JobsError as e:
        if not bucket_logs(run_id):
            raise JobsError(f"{e}; and no logs of {run_id} in $TRMGPT_STORAGE/{run_id}/logs "
                            "(set STORAGE to read them from the bucket)") from None
        return
    if not follow:
        sys.stdout.write(c.get_job_logs(j.submission_id))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in c.tail_job_logs(j.submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def bucket_logs(run_id: str) -> bool:
    storage = os.environ.get("TRMGPT_STORAGE")
    if not storage:
        return False
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{storage.rstrip('/')}/{run_id}/logs")
    if not fs.exists(path):
        return False
    for f in sorted(fs.ls(path, detail=False)):
        sys.stdout.write(fs.cat_file(f).decode(errors="replace"))
    return True


def stop(run_id: str, addr: str | None = None, wait: float = 600, poll: float = 2) -> str:
    """Save, then stop: ask the run (through its bucket, $RUN/control/stop) to checkpoint and
    leave at its next control step; wait for the job to end; stop the job only if it hasn't
    within `wait` seconds (or has no run folder: an old job)."""
    c = client(addr)
    j = latest_job(c, run_id)
    if j.status.is_terminal():
        return f"run {run_id}: job {j.submission_id} already {j.status.value}"
    run_dir = meta_of(j).get("run_dir")
    if run_dir:
        import fsspec

        fs, path = fsspec.core.url_to_fs(f"{run_dir}/control/stop")
        fs.pipe_file(path, f"asked at {time.time()}".encode())
        print(f"run {run_id}: asked it to checkpoint and stop (waiting up to {wait:.0f} s)",
              flush=True)
        end = time.time() + wait
        while time.time() < end:
            st = c.get_job_status(j.submission_id)
            if st.is_terminal():
                return (f"run {run_id}: checkpointed and stopped (job {j.submission_id} "
                        f"{st.value}); continue with `make resume RUN={run_id}`")
            time.sleep(poll)
    c.stop_job(j.submission_id)
    return f"run {run_id}: stopping job {j.submission_id}" + (
        " (it did not checkpoint in time: it resumes from its last checkpoint)" if run_dir
        else "")


def send(c, run_id: str, submission_id: str, argv: list[str], meta: dict[str, Any],
         env: dict[str, str] | None = None) -> None:
    c.submit_job(entrypoint=entrypoint(argv), submission_id=submission_id,
                 runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES,
                              "env_vars": {**job_env(), **(env or {})}},
                 metadata={"trmgpt_run": run_id, "argv": json.dumps(argv),
                           **{k: json.dumps(v) for k, v in meta.items()}})


def resume(run_id: str, extra: list[str], addr: str | None = None) -> str:
    """Resubmit the run's command with --resume latest (extra flags, e.g. a larger --max-steps,
    come after the original ones and win)."""
    from launcher.jobs.options import run_config_from

    c = client(addr)
    jobs = runs(c).get(run_id)
    if not jobs:
        raise JobsError(f"no run {run_id!r} on this cluster (runs: "
                        f"{', '.join(sorted(runs(c))) or 'none'})")
    last = jobs[-1]
    if not last.status.is_terminal():
        raise JobsError(f"run {run_id} is still {last.status.value} (job "
                        f"{last.submission_id}); stop it first with `make stop RUN={run_id}`")
    meta = meta_of(last)
    run_config_from(meta["preset"], meta["extra"] + extra, meta["world"],
                    meta.get("gpus_per_node", 8))  # refused here
    argv = strip_resume(meta.pop("argv")) + ["--resume", "latest", *extra]
    meta["extra"] = meta["extra"] + extra
    sub = f"{run_id}-r{len(jobs)}"
    send(c, run_id, sub, argv, meta)
    return f"resubmitted run {run_id} as job {sub} (--resume latest)"


def strip_resume(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--resume":
            skip = True
            continue
        if a.startswith("--resume="):
            continue
        out.append(a)
    return out


