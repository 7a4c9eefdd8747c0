"""Ray Jobs: submit, status, logs, stop and resume runs on a Ray cluster.

A run is a series of Ray jobs that share one run id and one run directory: `submit` starts it
(submission id = run id), `resume` resubmits the same command with `--resume latest` (submission
id `<run>-r<n>`). The job's entrypoint is `python -m launcher train --ray --address auto ...`:
the driver runs on the head node and its TorchTrainer spreads the workers over the GPU nodes.

The cluster is found as Ray's own CLI finds it: `RAY_API_SERVER_ADDRESS` or `RAY_ADDRESS`, else
http://127.0.0.1:8265 (the head's dashboard port, which `make dashboard` tunnels here). Token
auth: the client reads the cluster's token as Ray does (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH).

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
RUNS_ROOT = "~/trmgpt-runs"
"""Run directories on the nodes (config, metrics, wandb). Checkpoints go to $TRMGPT_STORAGE
(s3://, gs://, a shared mount) when the cluster sets it, else beside the metrics."""
# settings (never secrets) the job carries to the head and the workers
JOB_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
PASS_ENV = ("WANDB_MODE", "WANDB_PROJECT", "TRMGPT_FAULTS")
SECRET_NAMES = re.compile(r"(_KEY|_TOKEN|_SECRET|PASSWORD|CREDENTIALS?)$", re.I)
EXCLUDES = ["runs", "**/__pycache__", ".pytest_cache", "bench/REPORT.md",
            "tests"]
PROGRESS = re.compile(r"step\s+(\d+) \| loss ([0-9.]+|nan|inf) .*?\| ([0-9,]+) tok/s")


class JobsError(Exception):
    """A Jobs request that cannot be done (no cluster, unknown run): one line for the user."""


def address() -> str:
    """As `ray job`: RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, then the tunnel's local port."""
    return (os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or DEFAULT_ADDRESS)


def client(addr: str | None = None):
    from ray.job_submission import JobSubmissionClient

    addr = addr or address()
    if not addr.startswith(("http://", "https://")):
        raise JobsError(f"RAY_ADDRESS={addr!r}: the job API needs the dashboard's http address, "
                        f"e.g. {DEFAULT_ADDRESS} (what `make dashboard` forwards)")
    try:
        return JobSubmissionClient(addr)
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
    return " ".join(shlex.quote(a) for a in ["python", "-m", "launcher", *argv])


def train_argv(preset: str, nodes: int, gpus_per_node: int, cpu: bool, run_dir: str,
               extra: list[str]) -> list[str]:
    workers = nodes if cpu else nodes * gpus_per_node
    argv = ["train", "--ray", "--address", "auto", "--preset", preset, "--workers",
            str(workers), "--run-dir", run_dir]
    if not cpu:
        argv += ["--gpu", "--gpus-per-node", str(gpus_per_node)]
    return argv + extra


def submit(preset: str, nodes: int, extra: list[str], *, gpus_per_node: int = 8,
           cpu: bool = False, runs_root: str = RUNS_ROOT, run_id: str | None = None,
           addr: str | None = None) -> str:
    """Validate here (nothing is sent if the config is refused), then submit. Returns the id."""
    from launcher.jobs.options import run_config_from  # the same resolution `train` does

    if nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {nodes}")
    world = nodes if cpu else nodes * gpus_per_node
    from launcher.engine.config import check_inputs

    # refusals name the rule; a preset's missing tokenizer or data names the make target
    check_inputs(run_config_from(preset, extra, world, 1 if cpu else gpus_per_node))
    run_id = run_id or f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = f"{runs_root.rstrip('/')}/{run_id}"
    argv = train_argv(preset, nodes, gpus_per_node, cpu, run_dir, extra)
    c = client(addr)
    if os.environ.get("WANDB_API_KEY"):
        print("note: WANDB_API_KEY is not sent with the job (Ray would log it); the nodes read "
              "it from the file `make cluster-up` mounted", file=sys.stderr)
    send(c, run_id, run_id, argv, {"preset": preset, "world": world, "extra": extra})
    print(f"submitted run {run_id} ({world} worker(s)) to {addr or address()}\n"
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


def progress(logs: str) -> dict[str, Any]:
    """The last progress line of a job's logs: step, loss, tokens/s."""
    found = PROGRESS.findall(logs)
    if not found:
        return {}
    step, loss, toks = found[-1]
    return {"step": int(step), "loss": float(loss), "tokens_per_s": float(toks.replace(",", ""))}


def status(addr: str | None = None) -> list[dict[str, Any]]:
    c = client(addr)
    rows = []
    for rid, jobs in sorted(runs(c).items()):
        j = jobs[-1]
        rows.append({"run": rid, "state": str(j.status.value if hasattr(j.status, "value")
                                              else j.status),
                     "job": j.submission_id, "jobs": len(jobs),
                     **progress(c.get_job_logs(j.submission_id))})
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
    c = client(addr)
    j = latest_job(c, run_id)
    if not follow:
        sys.stdout.write(c.get_job_logs(j.submission_id))
        return
    import asyncio

    async def tail() -> None:
        async for chunk in c.tail_job_logs(j.submission_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def stop(run_id: str, addr: str | None = None) -> str:
    c = client(addr)
    j = latest_job(c, run_id)
    if j.status.is_terminal():
        return f"run {run_id}: job {j.submission_id} already {j.status.value}"
    c.stop_job(j.submission_id)
    return f"run {run_id}: stopping job {j.submission_id}"


def send(c, run_id: str, submission_id: str, argv: list[str], meta: dict[str, Any]) -> None:
    c.submit_job(entrypoint=entrypoint(argv), submission_id=submission_id,
                 runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES,
                              "env_vars": job_env()},
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
    meta = {k: json.loads(v) for k, v in last.metadata.items() if k != "trmgpt_run"}
    run_config_from(meta["preset"], meta["extra"] + extra, meta["world"])  # refused here
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


def expand(path: str) -> str:
    return str(Path(path).expanduser()) if "://" not in path else path
