"""Ray Train: the one launch path, on a laptop and on a cluster.

A `TorchTrainer` starts the worker group (gloo on CPU, NCCL with one GPU per worker), sets
RANK/WORLD_SIZE/MASTER_ADDR, and each worker calls `launcher.engine.train.train` — the engine does
not
know it runs under Ray. What Ray adds:

- `FailureConfig(max_failures)`: a lost worker or node restarts the *whole* group; the restarted
  group resumes from the latest complete checkpoint (`get_checkpoint()`, or a COMPLETE tag in the
  run's storage) with the same data order.
- Checkpoints are written once, by the project's checkpointer, straight into the run's storage
  (Ray's experiment dir = the parent of `checkpoints/`). Each complete tag is then only
  *registered* with `ray.train.report(..., checkpoint_upload_mode=NO_UPLOAD)`: no shard is
  copied a second time. A new driver with the same (storage_path, name) finds the old run's.
- `ScalingConfig(num_workers=(min, max))`: elastic. The global batch is pinned to max workers'
  worth, so fewer workers accumulate more; the engine converts the checkpoint to the new world
  size (DeepSpeed universal checkpoint). Needs the pre-tokenized data path (global order).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.engine.config import REPO, RunConfig


def secret_file() -> Path:
    """Where a node finds the wandb key: ~/.trmgpt/node/wandb_api_key (mounted by the cluster
    YAML, mode 600), or $TRMGPT_WANDB_KEY_FILE. Secrets never travel in a job's runtime_env:
    Ray returns its env_vars to every client and logs them."""
    default = Path.home() / ".trmgpt" / "node" / "wandb_api_key"
    return Path(os.environ.get("TRMGPT_WANDB_KEY_FILE") or default)


@dataclass
class Launch:
    """What the driver hands every worker (plain data: it crosses process boundaries)."""

    run: dict[str, Any]
    run_dir: str
    resume: str | None = None
    stop_after: int | None = None
    env: dict[str, str] = field(default_factory=dict)


def checkpoint_root(run: RunConfig, run_dir: str) -> str:
    return (run.train.checkpoint_dir or str(Path(run_dir) / "checkpoints")).rstrip("/")


def experiment_path(run: RunConfig, run_dir: str) -> tuple[str, str]:
    """(storage_path, name) for Ray's RunConfig: the folder that holds `checkpoints/`, so the
    registered checkpoints lie inside Ray's experiment dir, as NO_UPLOAD requires."""
    parent = checkpoint_root(run, run_dir).rsplit("/", 1)[0]
    storage, name = parent.rsplit("/", 1)
    return storage, name


def complete_tags(root: str) -> list[str]:
    """Complete checkpoints of a run (its COMPLETE markers), without a process group."""
    import fsspec

    from launcher.engine.checkpoint import MARKER, TAG_RE

    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if TAG_RE.match(n) and fs.exists(f"{path}/{n}/{MARKER}"))


def worker_setup(env: dict[str, str]) -> None:
    """Before the engine is imported: the accelerator, offline hubs, the node's secrets."""
    import torch

    os.chdir(REPO)  # the presets' relative paths (tokenizer, data) are relative to the repo
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    key = secret_file()
    if "WANDB_API_KEY" not in os.environ and key.exists():
        os.environ["WANDB_API_KEY"] = key.read_text().strip()  # in memory only


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: decide where to start, train, register checkpoints."""
    launch = Launch(**cfg)
    worker_setup(launch.env)
    import ray.train
    from ray.train import CheckpointUploadMode

    from launcher.engine.train import train

    run = RunConfig.from_dict(launch.run)
    root = checkpoint_root(run, launch.run_dir)
    resume = launch.resume
    ctx = ray.train.get_context()
    if ray.train.get_checkpoint() is not None or complete_tags(root):
        # A restarted group, or a new driver for the same run: the newest complete checkpoint
        # (the driver refused a fresh start into a run dir that already held one).
        resume = "latest"
    elif resume is None and ctx.get_world_rank() == 0:
        # A group restarted before its first checkpoint: the lost attempt's metrics describe
        # steps that will be trained again; keep them aside, not mixed into the new ones.
        metrics = Path(launch.run_dir) / "metrics.jsonl"
        if metrics.exists():
            metrics.rename(metrics.with_name("metrics.lost-attempt.jsonl"))

    def register(step: int, path: str) -> None:
        # every rank reaches this (report is a barrier); the shards are already in storage
        ray.train.report({"step": step}, checkpoint=ray.train.Checkpoint(path),
                         checkpoint_dir_name=path.rsplit("/", 1)[-1],
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    code = train(run, launch.run_dir, resume, launch.stop_after, on_checkpoint=register)
    if code != 0:
        raise RuntimeError(f"training stopped with exit code {code} (non-finite losses); the "
                           "last good checkpoint is kept")


def elastic_batch(run: RunConfig, workers: int | tuple[int, int], per_node: int) -> None:
    """Pin the global batch to the largest group and check every group size Ray may pick
    (whole nodes) divides it; the stream path cannot change world size, so refuse that here."""
    if isinstance(workers, int):
        return
    lo, hi = workers
    t = run.train
    if not t.global_batch_size:
        t.global_batch_size = t.device_batch_size * hi
    from data_pipeline import DataSpec

    if t.data_path == "stream" or (t.data_path == "auto" and
                                   not DataSpec.parse(t.data).is_pretokenized):
        raise ValueError("elastic workers need the pre-tokenized data path (one global sample "
                         "order for any world size); this run streams. Tokenize it with "
                         "`python -m data_pipeline tokenize` and pass --data DIR, or give a fixed "
                         "worker count")
    for w in range(lo, hi + 1):
        if w % per_node == 0 or w == lo:
            t.grad_accum(w)  # ValueError naming the rule


def preflight(run: RunConfig) -> None:
    """What every worker would fail on, checked once here: Ray Train restarts a failed group
    (max_failures times) whatever the error, so a missing data source or tokenizer must stop the
    run before a group starts. Raises ValueError/FileNotFoundError naming the input."""
    from data_pipeline import DataSpec, load_tokenizer

    tok = load_tokenizer(run.train.tokenizer)
    if tok.vocab_size > run.model.vocab_size:
        raise ValueError(f"vocab_size ({run.model.vocab_size}) is smaller than the tokenizer's "
                         f"vocabulary ({tok.vocab_size}); set vocab_size={tok.padded_vocab_size}")
    spec = DataSpec.parse(run.train.data)
    if not spec.is_pretokenized:
        from data_pipeline.sources import plan_split, probe

        probe(plan_split(spec, "train"))


def ray_init(address: str | None, cpus: int | None = None) -> None:
    """Attach to a cluster (address 'auto', 'ray://...', host:port) or start a private local
    one on loopback with no dashboard."""
    import ray

    if ray.is_initialized():
        return
    # one line per print (Ray Train's print patch would echo every line a second time)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    quiet = {"log_to_driver": True, "configure_logging": True, "logging_level": "WARNING"}
    if address:
        try:
            ray.init(address=address, **quiet)
        except Exception as e:
            raise RunFailed(f"cannot join the Ray cluster at {address}: {e}") from None
    else:
        from launcher.engine.dist import free_port

        # on a busy machine the node's agents can take longer than Ray's 30 s to register; the
        # raylet then dies and ray.init never returns. Give them two minutes.
        os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")

        # Ray Train's placement-group cleaner asks the state API (served by the dashboard
        # process) whether the controller lives: without it, it warns every few seconds. So the
        # dashboard runs, on loopback and a free port, reachable from this machine only.
        for attempt in (1, 2):  # a node that timed out starting on a busy machine: once more
            try:
                ray.init(address="local", num_cpus=cpus or os.cpu_count(),
                         include_dashboard=True, dashboard_host="127.0.0.1",
                         dashboard_port=free_port(), _node_ip_address="127.0.0.1", **quiet)
                return
            except Exception as e:
                ray.shutdown()
                if attempt == 2:
                    raise RunFailed(f"the local Ray did not start: {e}") from None
                print(f"the local Ray did not start ({e}); trying once more", flush=True)


def fit(run: RunConfig, run_dir: str, workers: int | tuple[int, int], *,
        resume: str | None = None, stop_after: int | None = None, use_gpu: bool | None = None,
        max_failures: int = 3, address: str | None = None, gpus_per_node: int = 8) -> int:
    """Train `run` on a Ray worker group; returns the step reached. Raises RunFailed with one
    readable line when the group fails for good."""
    import torch

    local = not address
    if use_gpu is None:
        use_gpu = torch.cuda.is_available() if local else False  # a cluster job says --gpu
    elastic_batch(run, workers, gpus_per_node if use_gpu else 1)
    cpus = os.cpu_count() or 1
    hi = workers if isinstance(workers, int) else workers[1]
    ray_init(address, cpus)
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if use_gpu:
        resources = {"GPU": 1, "CPU": 1}
    else:  # share this machine's cores: OMP_NUM_THREADS follows the CPUs Ray gives a worker
        resources = {"CPU": max(1, cpus // hi) if local else 1}
    storage, name = experiment_path(run, run_dir)
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE",
                                      "TORCH_EXTENSIONS_DIR", "TRMGPT_FAULTS", "TRMGPT_CACHE")
           if k in os.environ}
    launch = Launch(run=run.to_dict(), run_dir=run_dir, resume=resume, stop_after=stop_after,
                    env=env)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=launch.__dict__,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            # the project's checkpointer prunes (keep_last); Ray only keeps the pointers
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        cause = root_cause(e)
        ray.shutdown()  # stops the streamed worker logs: the error is the last line printed
        sys.stdout.flush()
        raise RunFailed(cause) from None
    ray.shutdown()
    return int((result.metrics or {}).get("step", 0))


class RunFailed(Exception):
    """The worker group failed for good (retries spent): one line for the terminal."""


def root_cause(e: BaseException) -> str:
    """The first worker's own error message, not Ray's pages of tracebacks around it."""
    failures = getattr(e, "worker_failures", None) or {}
    err: BaseException | None = failures[min(failures)] if failures else getattr(
        e, "controller_failure", e)
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or err.__cause__
        if inner is None or inner is err:
            break
        err = inner
    if err is None:
        return str(e).splitlines()[0]
    text = str(err).strip().splitlines()
    last = next((ln for ln in reversed(text) if ln.strip()), type(err).__name__)
    name = type(err).__name__
    return last if last.startswith(name) or ":" in last[:40] else f"{name}: {last}"


def print_next_steps(run_dir: str, step: int) -> None:
    run = Path(run_dir)
    rid = run.name
    print(f"\nrun {rid}: step {step}\n"
          f"  run dir      {run}\n"
          f"  metrics      {run / 'metrics.jsonl'}\n"
          f"  plots        make plot RUN={rid}   (-> {run / 'plots'})\n"
          f"  checkpoints  {run / 'checkpoints'}\n"
          f"  resume       make train RUN={rid} ARGS=\"--resume latest --max-steps N\"\n"
          f"  evaluate     make eval RUN={rid}\n"
          f"  sample       make sample RUN={rid} PROMPT=\"ROMEO:\"", file=sys.stdout, flush=True)
