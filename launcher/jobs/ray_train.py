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

import json
import os
import sys
import time
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
    workers: tuple[int, int] = (1, 1)
    use_gpu: bool = False
    cluster: bool = False


def checkpoint_root(run: RunConfig, run_dir: str) -> str:
    from launcher.engine.checkpoint import checkpoint_root as root

    return root(run, run_dir)


def experiment_path(run_dir: str) -> tuple[str, str]:
    """(storage_path, name) for Ray's RunConfig: the run folder's parent and the run id, so
    Ray's experiment dir *is* the run folder. Two runs under one prefix never share Ray's
    state, and s3://bucket/run gives ("s3://bucket", "run"), never "s3:/"."""
    run_dir = str(run_dir).rstrip("/")
    parent, _, name = run_dir.rpartition("/")
    if not name or not parent or parent.endswith(":/") or parent.endswith(":"):
        raise ValueError(f"the run folder {run_dir!r} needs a parent folder (Ray keeps its "
                         "state in <parent>/<run id>): e.g. s3://bucket/runs/<id>")
    return parent, name


def complete_tags(root: str) -> list[str]:
    """Complete checkpoints of a run (its COMPLETE markers), without a process group."""
    import fsspec

    from launcher.engine.checkpoint import MARKER, TAG_RE

    fs, path = fsspec.core.url_to_fs(root)
    if not fs.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if TAG_RE.match(n) and fs.exists(f"{path}/{n}/{MARKER}"))


def worker_setup(env: dict[str, str], use_gpu: bool = False) -> None:
    """Before the engine is imported: the accelerator, the job's settings, the node's secrets,
    and NCCL's log of the transport it picks (read by the preflight)."""
    import tempfile

    import torch

    os.chdir(REPO)  # the presets' relative paths (tokenizer, data) are relative to the repo
    for k, v in env.items():
        os.environ.setdefault(k, v)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if use_gpu and "NCCL_DEBUG" not in os.environ:
        # INIT/NET lines only, into a file of this process: NCCL reads these when it first
        # starts, at the preflight's all-reduce (nothing has used NCCL before it)
        os.environ.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT,NET",
                          NCCL_DEBUG_FILE=f"{tempfile.gettempdir()}/trmgpt-nccl.%h.%p.log")
    key = secret_file()
    if "WANDB_API_KEY" not in os.environ and key.exists():
        os.environ["WANDB_API_KEY"] = key.read_text().strip()  # in memory only
        # the path, never the key: the Jobs test checks a worker really read the node's file
        print(f"wandb: the key comes from this node's {key}", flush=True)


def nccl_transport() -> str | None:
    """The network NCCL chose, from this process's NCCL log ('Socket', 'IB', 'AWS Libfabric'
    for EFA...), or None when there is no log."""
    import glob
    import re
    import socket
    import tempfile

    pattern = f"{tempfile.gettempdir()}/trmgpt-nccl.{socket.gethostname()}.{os.getpid()}.log"
    for f in glob.glob(pattern):
        text = Path(f).read_text(errors="replace")
        m = re.findall(r"Using network (.+)", text) or re.findall(r"NET/(\w+)", text)
        if m:
            return m[-1].strip()
    return None


def node_preflight(launch: Launch) -> None:
    """Before the first step, on every worker: can this node write the run's bucket (read back,
    delete), does it see its GPU and which transport did NCCL pick, and is the group the size
    asked for. Rank 0 writes every rank's answers to $RUN/preflight.json and prints one line.
    A failure stops the group here, naming the node, not at the first checkpoint hours later."""
    import socket

    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from launcher.engine.metrics import RunFolder

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    rec: dict[str, Any] = {"rank": rank, "local_rank": ctx.get_local_rank(),
                           "node": ray.get_runtime_context().get_node_id(),
                           "ip": ray.util.get_node_ip_address(),
                           "host": socket.gethostname(), "pid": os.getpid(), "errors": []}
    folder = RunFolder(launch.run_dir)
    probe = f"preflight/rank_{rank:05d}-{os.getpid()}"
    try:
        if folder.remote:
            token = os.urandom(8).hex().encode()
            folder.fs.pipe_file(f"{folder.root}/{probe}", token)
            if folder.fs.cat_file(f"{folder.root}/{probe}") != token:
                raise OSError("read back something else")
            folder.fs.rm(f"{folder.root}/{probe}")
        else:
            folder.local.mkdir(parents=True, exist_ok=True)
        rec["bucket_write"] = "ok"
    except Exception as e:
        rec["errors"].append(f"cannot write {folder.url}: {type(e).__name__}: {e}")
    if launch.use_gpu:
        rec["gpus_visible"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not rec["gpus_visible"]:
            rec["errors"].append("a GPU worker sees no GPU (driver, CUDA_VISIBLE_DEVICES?)")
    device = torch.device("cuda", torch.cuda.current_device()) if (
        launch.use_gpu and rec.get("gpus_visible")) else torch.device("cpu")
    if dist.is_initialized():
        t = torch.ones(1, device=device)
        dist.all_reduce(t)  # the group's first collective: NCCL starts (and logs) here
        if launch.use_gpu:
            rec["nccl_transport"] = nccl_transport() or "unknown (no NCCL log)"
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, rec)
    else:
        every = [rec]
    lo, hi = launch.workers
    bad = [f"rank {r['rank']} on {r['host']}: {e}" for r in every for e in r["errors"]]
    if not lo <= len(every) <= hi:
        bad.append(f"{len(every)} workers, asked for {lo}..{hi}")
    if rank == 0:
        nodes = sorted({r["node"] for r in every})
        summary = {"workers": len(every), "nodes": len(nodes), "ranks": every,
                   "time": time.time()}
        try:
            text = json.dumps(summary, indent=1)
            if folder.remote:
                folder.fs.pipe_file(f"{folder.root}/preflight.json", text.encode())
            else:
                (folder.local / "preflight.json").write_text(text)
        except Exception as e:  # already reported above when the bucket is the cause
            bad.append(f"rank 0 cannot write preflight.json: {e}")
        nets = sorted({r.get("nccl_transport", "") for r in every} - {""})
        print(f"preflight: {len(every)} worker(s) on {len(nodes)} node(s); bucket write ok "
              f"on every node" if not bad else f"preflight FAILED: {'; '.join(bad)}",
              (f"; NCCL transport: {', '.join(nets)}" if nets else ""), flush=True)
    if bad:
        raise RuntimeError(f"preflight failed: {'; '.join(bad)}")


def restarted_cleanup(launch: Launch, root: str) -> bool:
    """A group that starts with no complete checkpoint and no --resume is either the run's
    first attempt (the driver refused a used folder) or a restart after a loss before the first
    checkpoint completed. A restart finds what the lost attempt left (an incomplete tag, metrics
    rows): rank 0 deletes the tags without COMPLETE and keeps the rows aside, then the group
    starts over. Returns whether this was a restart. A barrier follows (no rank checks the
    folder while rank 0 cleans it)."""
    import ray.train
    import torch.distributed as dist

    from launcher.engine.checkpoint import Checkpointer
    from launcher.engine.dist import DistInfo
    from launcher.engine.metrics import RunFolder, cache_root

    folder = RunFolder(launch.run_dir)
    ckpt = Checkpointer(root, DistInfo(0, 1, 0), 1, cache_root())
    leftovers = bool(ckpt.tags()) or folder.exists("metrics.jsonl")
    if dist.is_initialized():
        dist.barrier()  # everyone has looked before rank 0 changes anything
    if leftovers and ray.train.get_context().get_world_rank() == 0:
        gone = ckpt.drop_incomplete()
        rows = folder.exists("metrics.jsonl")
        if rows:
            folder.move_aside("metrics.jsonl", "metrics.lost-attempt.jsonl")
        print(f"restart before the first complete checkpoint: dropped {gone or 'no'} "
              "incomplete checkpoint(s)" + ("; the lost attempt's metrics kept in "
                                            "metrics.lost-attempt.jsonl" if rows else "")
              + "; starting over", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return leftovers


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: preflight, decide where to start, train, register
    checkpoints, answer preemption notices and `make stop`."""
    cfg = {**cfg, "workers": tuple(cfg.get("workers", (1, 1)))}
    launch = Launch(**cfg)
    worker_setup(launch.env, launch.use_gpu)
    import ray.train
    from ray.train import CheckpointUploadMode

    from launcher.engine.dist import any_rank
    from launcher.engine.metrics import RunFolder
    from launcher.engine.train import train

    node_preflight(launch)
    run = RunConfig.from_dict(launch.run)
    root = checkpoint_root(run, launch.run_dir)
    resume = launch.resume
    if ray.train.get_checkpoint() is not None or complete_tags(root):
        # A restarted group, or a new driver for the same run: the newest complete checkpoint
        # (the driver refused a fresh start into a run dir that already held one).
        resume = "latest"
        restarted = True
    elif resume is None:
        restarted = restarted_cleanup(launch, root)
    else:
        restarted = False
    if restarted:  # fault injection (tests) fires in the first attempt only
        faults = [f for f in os.environ.get("TRMGPT_FAULTS", "").split(",")
                  if f and not f.startswith("kill_")]
        os.environ["TRMGPT_FAULTS"] = ",".join(faults)

    storage = ray.train.get_context().get_storage()

    def register(step: int, path: str) -> None:
        # every rank reaches this (report is a barrier); the shards are already in storage
        ckpt = ray_checkpoint(path, storage)
        if ckpt is None:  # outside Ray's run folder: recovery reads its COMPLETE markers
            ray.train.report({"step": step})
            return
        ray.train.report({"step": step}, checkpoint=ckpt,
                         checkpoint_dir_name=path.rsplit("/", 1)[-1],
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    folder = RunFolder(launch.run_dir)
    rank0 = ray.train.get_context().get_world_rank() == 0
    seen = {"checked": 0.0, "preempt": False}

    def control(step: int) -> str | None:
        # get_preemption_info is a barrier over the group: every rank calls it at the same
        # steps. Ray 2.60 announces a spot/maintenance reclaim through it (the node's drain
        # notice); a checkpoint now loses nothing when the node goes.
        info = ray.train.get_preemption_info()
        stop = False
        if rank0 and time.time() - seen["checked"] > 10:  # an S3 HEAD at most every 10 s
            seen["checked"] = time.time()
            stop = folder.exists("control/stop")
        if any_rank(stop):
            return "stop"
        if info is not None and not seen["preempt"]:
            seen["preempt"] = True
            print(f"step {step}: preemption notice ({info}); checkpointing now", flush=True)
            return "save"
        return None

    code = train(run, launch.run_dir, resume, launch.stop_after, on_checkpoint=register,
                 control=control if launch.cluster else None)
    if code != 0:
        raise RuntimeError(f"training stopped with exit code {code} (non-finite losses); the "
                           "last good checkpoint is kept")


def elastic_batch(run: RunConfig, workers: int | tuple[int, int], per_node: int) -> None:
    """Pin the global batch to the largest group and check that *every* group size Ray may pick
    in [min, max] divides it (Ray Train V2 starts any size in the range: a lost GPU, not only a
    lost node, gives max-1). The stream path cannot change world size, so refuse that here."""
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
    bad = []
    for w in range(lo, hi + 1):
        try:
            t.grad_accum(w)
        except ValueError:
            bad.append(w)
    if bad:
        import math

        good = t.device_batch_size * math.lcm(*range(lo, hi + 1))
        raise ValueError(
            f"elastic {lo}..{hi} workers: Ray may start any size in that range, and the global "
            f"batch {t.global_batch_size} does not split over {bad} worker(s) x "
            f"device_batch_size {t.device_batch_size}. Narrow the range (e.g. --min-workers "
            f"{hi}), or set global_batch_size={good} (divisible by every size)")


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


CLUSTER_MAX_FAILURES = 20
"""Group restarts a cluster run survives (real failures; preemptions have their own, unlimited
budget: FailureConfig.max_preemption_failures=-1). A 64-GPU run sees a hardware or network
fault (Xid, NCCL timeout, EFA flap) every day or two, so a week-long run needs more than a few;
a deterministic bug, on the other hand, should not loop forever: 20 restarts of a few minutes
each cost well under an hour of cluster before the run fails and says why. --max-failures -1
means never give up."""


def storage_filesystem(run_dir: str):
    """Ray's storage for a URL run folder: the same fsspec filesystem (and so the same
    credentials chain and endpoint, e.g. AWS_ENDPOINT_URL) the checkpointer uses, wrapped for
    pyarrow; with the path without its scheme. None for a local folder."""
    from launcher.engine.metrics import is_url

    if not is_url(run_dir):
        return None, run_dir
    import fsspec
    import pyarrow.fs as pafs

    fs, path = fsspec.core.url_to_fs(run_dir)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def ray_checkpoint(path: str, storage) -> Any:
    """A checkpoint folder as Ray Train V2 accepts it with NO_UPLOAD: on the *same* filesystem
    object as the run's storage (Ray compares them: `ray.train.Checkpoint("s3://...")` gets
    pyarrow's own S3 filesystem, unequal to the fsspec one the storage uses, and the report
    raises, which restarts the group at every checkpoint) and under Ray's experiment folder.
    None for a checkpoint_dir outside the run folder (registered as metrics only)."""
    import ray.train

    from launcher.engine.metrics import is_url

    fs_path = str(path).rstrip("/")
    if is_url(fs_path):
        import fsspec

        fs_path = fsspec.core.url_to_fs(fs_path)[1]
    else:
        fs_path = str(Path(fs_path).resolve())
    exp = str(storage.experiment_fs_path).rstrip("/")
    if not is_url(str(path)) and Path(exp).is_absolute():
        exp = str(Path(exp).resolve())
    if not fs_path.startswith(exp + "/"):
        return None
    return ray.train.Checkpoint(fs_path, filesystem=storage.storage_filesystem)


def fit(run: RunConfig, run_dir: str, workers: int | tuple[int, int], *,
        resume: str | None = None, stop_after: int | None = None, use_gpu: bool | None = None,
        max_failures: int | None = None, address: str | None = None, gpus_per_node: int = 8,
        cpus_per_worker: int | None = None) -> int:
    """Train `run` on a Ray worker group; returns the step reached. Raises RunFailed with one
    readable line when the group fails for good. cpus_per_worker: the CPUs Ray reserves for each
    worker (its data decoding, checkpoint I/O and resharding threads: Ray sets OMP_NUM_THREADS
    to it); default: this machine's cores shared out locally, 1 on a cluster."""
    import torch

    local = not address
    if use_gpu is None:
        use_gpu = torch.cuda.is_available() if local else False  # a cluster job says --gpu
    elastic_batch(run, workers, gpus_per_node if use_gpu else 1)
    cpus = os.cpu_count() or 1
    hi = workers if isinstance(workers, int) else workers[1]
    lo = workers if isinstance(workers, int) else workers[0]
    if max_failures is None:
        max_failures = 3 if local else CLUSTER_MAX_FAILURES
    ray_init(address, cpus)
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if cpus_per_worker is None:
        cpus_per_worker = max(1, cpus // hi) if local else 1
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    parent, name = experiment_path(run_dir)
    pa_fs, storage = storage_filesystem(parent)
    env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE",
                                      "TORCH_EXTENSIONS_DIR", "TRMGPT_FAULTS", "TRMGPT_CACHE")
           if k in os.environ}
    launch = Launch(run=run.to_dict(), run_dir=run_dir, resume=resume, stop_after=stop_after,
                    env=env, workers=(lo, hi), use_gpu=use_gpu, cluster=not local)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=launch.__dict__,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(
            name=name, storage_path=storage, storage_filesystem=pa_fs,
            failure_config=FailureConfig(max_failures=max_failures,
                                         max_preemption_failures=-1),
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


class DriverLog:
    """A cluster job's driver output (its own lines and the workers' Ray streams to it) copied
    into $RUN/logs/<start>.log, every `every` seconds and at the end: the head's job logs go
    with `ray down`, the bucket's stay for `make logs` with no cluster."""

    def __init__(self, run_dir: str, every: float = 30.0) -> None:
        import threading

        from launcher.engine.metrics import RunFolder

        self.folder = RunFolder(run_dir)
        self.name = f"logs/{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        self.local = self.folder.local / self.name
        self.local.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.local, "a", buffering=1)
        self.streams = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, args=(every,), daemon=True)
        self.thread.start()

    def _loop(self, every: float) -> None:
        while not self.done.wait(every):
            self.upload()

    def upload(self) -> None:
        try:
            self.file.flush()
            self.folder.fs.put_file(str(self.local), f"{self.folder.root}/{self.name}")
        except Exception as e:  # the run goes on without its log copy
            self.streams[1].write(f"(could not copy the driver log to the bucket: {e})\n")

    def close(self) -> None:
        self.done.set()
        sys.stdout, sys.stderr = self.streams
        self.upload()
        self.file.close()


class _Tee:
    def __init__(self, stream, file) -> None:
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)
