"""python -m launcher {train,describe,eval,sample,export,plot,submit,resume,status,logs,stop}"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from launcher.engine.config import REPO, RunConfig
from launcher.jobs.options import add_config_args, engine_env, run_config


def default_run_dir(preset: str) -> str:
    return f"runs/{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir(run: RunConfig, run_dir: str, resume: str | None) -> None:
    """Refuse, before any rank or Ray starts, a fresh run into a used folder (its pruning would
    delete the earlier run's checkpoints and mix its metrics) and a resume of nothing. A URL
    run folder ($STORAGE/<id>) is judged by what the bucket holds. A preset recipe whose
    tokenizer or data is missing is refused too, naming the make target that makes it."""
    from launcher.engine.checkpoint import earlier_run, run_checkpointer
    from launcher.engine.config import check_inputs
    from launcher.engine.dist import DistInfo
    from launcher.engine.metrics import RunFolder
    from launcher.jobs.ray_train import checkpoint_root, complete_tags

    check_inputs(run)

    if resume is None:
        local = RunFolder(run_dir).pull() if "://" in run_dir else Path(run_dir)
        conflict = earlier_run(local, run_checkpointer(run, run_dir, DistInfo(0, 1, 0)))
        if conflict:
            raise ValueError(conflict)
    elif resume == "latest" and not complete_tags(checkpoint_root(run, run_dir)):
        raise ValueError(f"--resume latest: {checkpoint_root(run, run_dir)} holds no complete "
                         "checkpoint")


def lr_note(run, run_dir: str) -> str | None:
    """What the schedule does when a resumed run's horizon changes (extending a run)."""
    from launcher.engine.metrics import RunFolder

    folder = RunFolder(run_dir)
    if not folder.exists("config.json"):
        return None
    old = json.loads(folder.read_text("config.json"))["train"]["max_steps"]
    new = run.train.max_steps
    if old == new:
        return None
    t = run.train
    return (f"note: max_steps {old} -> {new}. The data continues where it stopped; the lr "
            f"schedule is recomputed for the new horizon: warm-up ({t.warmup_steps} steps) is "
            f"unchanged, the {t.warmdown} warm-down now covers the last "
            f"{t.warmdown_frac:.0%} of {new} steps (from step "
            f"{new - int(t.warmdown_frac * new)}), so a run that was already decaying goes "
            "back up to the lr of its new point on the schedule.")


def cmd_train_ray(args, extra: list[str]) -> None:
    """`launcher train --ray`: the TorchTrainer path (local Ray unless --address)."""
    from launcher.jobs import ray_train

    workers = args.workers
    if args.min_workers is not None:
        if not 1 <= args.min_workers <= args.workers:
            raise ValueError(f"--min-workers must be in [1, --workers={args.workers}]")
        workers = (args.min_workers, args.workers)
    hi = args.workers
    run = run_config(args, extra, hi)
    run_dir = (os.path.abspath(os.path.expanduser(args.run_dir)) if "://" not in args.run_dir
               else args.run_dir.rstrip("/"))
    if "://" in run_dir:
        from launcher.engine.metrics import RunFolder

        # the saved config names where the checkpoints are: eval/sample/export from a laptop
        # read it from the bucket and find them there
        if not run.train.checkpoint_dir:
            run.train.checkpoint_dir = f"{run_dir}/checkpoints"
        folder = RunFolder(run_dir)
        if folder.exists("control/stop"):  # a `make stop` of an earlier job of this run
            folder.fs.rm(f"{folder.root}/control/stop")
    check_run_dir(run, run_dir, args.resume)
    if args.resume and (note := lr_note(run, run_dir)):
        print(note, flush=True)
    cwd = os.getcwd()
    os.chdir(REPO)  # where the workers resolve the presets' relative paths
    try:
        ray_train.preflight(run)
    finally:
        os.chdir(cwd)
    log = ray_train.DriverLog(run_dir) if args.address and "://" in run_dir else None
    print(f"launching {run.preset} on Ray: {workers} worker(s), run dir {run_dir}", flush=True)
    try:
        step = ray_train.fit(run, run_dir, workers, resume=args.resume,
                             stop_after=args.stop_after, address=args.address,
                             max_failures=args.max_failures,
                             use_gpu=True if args.gpu else None,
                             gpus_per_node=args.gpus_per_node,
                             cpus_per_worker=args.cpus_per_worker)
    except ray_train.RunFailed as e:
        print(f"error: the run failed: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if log is not None:
            log.close()
    if args.address:  # a cluster job: its logs end with what the user does next
        rid = run_dir.rstrip("/").rsplit("/", 1)[-1]
        print(f"run {rid}: step {step}; checkpoints in {ray_train.checkpoint_root(run, run_dir)}"
              f"; extend or continue with `make resume RUN={rid} ARGS=\"--max-steps N\"`")
    else:
        ray_train.print_next_steps(run_dir, step)


def cmd_submit(args, extra: list[str]) -> None:
    from launcher.jobs import ray_jobs as jobs

    jobs.submit(args.preset, args.nodes, extra, gpus_per_node=args.gpus_per_node, cpu=args.cpu,
                storage=args.storage, force=args.force, faults=args.faults)


def cmd_jobs(args, extra: list[str]) -> None:
    from launcher.jobs import ray_jobs as jobs

    if args.cmd == "status":
        print(jobs.format_status(jobs.status()))
    elif args.cmd == "logs":
        jobs.logs(args.run, args.follow)
    elif args.cmd == "stop":
        print(jobs.stop(args.run, wait=args.wait))
    elif args.cmd == "resume":
        print(jobs.resume(args.run, extra))


def cmd_train(args, extra: list[str]) -> None:
    engine_env()
    in_group = "RANK" in os.environ
    if args.run_dir is None:
        args.run_dir = default_run_dir(args.preset)
    if args.ray and not in_group:
        return cmd_train_ray(args, extra)
    if args.resume and not in_group and (note := lr_note(run_config(args, extra, args.workers),
                                                         args.run_dir)):
        print(note, flush=True)
    world = int(os.environ.get("WORLD_SIZE", args.workers))
    run = run_config(args, extra, world)  # refused here, before any rank starts
    if not in_group:
        check_run_dir(run, args.run_dir, args.resume)  # before any rank starts
    if args.workers > 1 and not in_group:
        # start the ranks with torch's elastic launcher; each one re-enters here
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.workers}", "-m", "launcher", *sys.argv[1:]]
        sys.exit(subprocess.call(cmd))
    from launcher.engine.train import main_train

    main_train(run, args.run_dir, args.resume, args.stop_after)


def cmd_describe(args, extra: list[str]) -> None:
    from launcher.engine.describe import describe

    world = args.workers if args.nodes is None else args.nodes * args.gpus_per_node
    run = run_config(args, extra, world)
    print(describe(run, world))
    if args.nodes is not None:
        t = run.train
        gbs = t.global_batch_size or t.device_batch_size * world
        print(f"`make submit PRESET={run.preset} NODES={args.nodes}` would ask Ray for "
              f"{args.nodes} node(s) x {args.gpus_per_node} GPUs = {world} Ray Train workers "
              f"(1 GPU each, NCCL), global batch {gbs}"
              f" sequences = {t.device_batch_size} per GPU x grad accum {t.grad_accum(world)} x "
              f"{world}; checkpoints every {t.checkpoint_every} steps; a lost worker restarts the "
              "group from the latest complete one")


def read_run_dir(run_dir: str) -> str:
    """A local folder holding the run's config.json and metrics.jsonl. A run that is not in
    runs/ on this machine is looked for in $TRMGPT_STORAGE/<id> (a cluster run lives only
    there): its config and metrics are staged in this machine's cache; its config names the
    checkpoints in the bucket, fetched from there."""
    from launcher.engine.metrics import RunFolder, join

    url = run_dir if "://" in run_dir else None
    if url is None:
        if (Path(run_dir) / "config.json").exists():
            return run_dir  # a run on this machine
        storage = os.environ.get("TRMGPT_STORAGE")
        if not storage:
            if not Path(run_dir).exists():
                raise FileNotFoundError(f"no run folder {run_dir} here; a cluster run is read "
                                        "from its bucket: set STORAGE=s3://... (or gs://)")
            return run_dir
        url = join(storage, Path(run_dir).name)
    folder = RunFolder(url)
    if not folder.exists("config.json"):
        raise FileNotFoundError(f"no run at {url} (no config.json)")
    print(f"reading run {folder.name} from {url}", file=sys.stderr)
    return str(folder.pull())


def cmd_eval(args, extra: list[str]) -> None:
    engine_env()
    from launcher.engine.offline import eval_run

    print(json.dumps(eval_run(read_run_dir(args.run_dir), args.weights, args.batches),
                     indent=2))


def cmd_sample(args, extra: list[str]) -> None:
    engine_env()
    from launcher.engine.offline import sample

    print(sample(read_run_dir(args.run_dir), args.prompt, args.max_new_tokens,
                 args.temperature, args.top_k, args.weights))


def cmd_export(args, extra: list[str]) -> None:
    engine_env()
    from launcher.engine.export import export

    print(f"wrote {export(read_run_dir(args.run_dir), args.out, args.weights)}")


def cmd_plot(args, extra: list[str]) -> None:
    import shutil

    from launcher.engine.plot import plot

    src = read_run_dir(args.run_dir)
    for p in plot(src):
        if Path(src) != Path(args.run_dir):  # a bucket's run: the plots land in runs/<id>/
            dst = Path(args.run_dir) / "plots" / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst)
            p = dst
        print(f"wrote {p}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="launcher", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train a preset (nanochat-style flags accepted)")
    add_config_args(p)
    p.add_argument("--run-dir",
                   help="the run's folder (default runs/<preset>-<date>-<time>); a new run "
                        "needs one without checkpoints or metrics (an earlier run there is "
                        "refused, never overwritten)")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue the run in --run-dir from its newest complete checkpoint "
                        "('latest') or from a checkpoint folder (checkpoints/step_N); stops "
                        "with an error when there is none")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="checkpoint and exit at this step (a job segment); resume goes on")
    p.add_argument("--ray", action="store_true",
                   help="run the workers as a Ray Train TorchTrainer (what `make train` does); "
                   "without it, --workers N starts torchrun")
    p.add_argument("--address", help="with --ray: the Ray cluster ('auto' inside a job); "
                   "default: a private local Ray on 127.0.0.1")
    p.add_argument("--min-workers", type=int, help="with --ray: elastic, between this and "
                   "--workers (needs pre-tokenized data)")
    p.add_argument("--max-failures", type=int,
                   help="with --ray: worker-group restarts before the run fails (default 3 "
                   "locally, 20 on a cluster; -1: never give up; preemptions don't count)")
    p.add_argument("--gpu", action="store_true", help="with --ray: one GPU per worker")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="with --ray --min-workers: GPUs per node (elastic sizes)")
    p.add_argument("--cpus-per-worker", type=int,
                   help="with --ray: CPUs Ray reserves per worker (its OMP threads, data "
                   "decoding, checkpoint I/O); `submit` sets it from the cluster's nodes")
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("describe", help="dry run: config, params, depths, FLOPs, memory")
    add_config_args(p)
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.set_defaults(fn=cmd_describe)
    for name, fn in (("eval", cmd_eval), ("sample", cmd_sample), ("export", cmd_export)):
        p = sub.add_parser(name)
        p.add_argument("--run-dir", required=True)
        p.add_argument("--weights", choices=["ema", "raw"], default="ema")
        p.set_defaults(fn=fn)
        if name == "eval":
            p.add_argument("--batches", type=int, default=8)
        if name == "sample":
            p.add_argument("--prompt", required=True)
            p.add_argument("--max-new-tokens", type=int, default=200)
            p.add_argument("--temperature", type=float, default=0.8)
            p.add_argument("--top-k", type=int, default=50)
        if name == "export":
            p.add_argument("--out", required=True)
    p = sub.add_parser("plot")
    p.add_argument("--run-dir", required=True)
    p.set_defaults(fn=cmd_plot)
    p = sub.add_parser("submit", help="submit a run to the Ray cluster as a Ray job")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--nodes", type=int, default=1, help="nodes (workers = nodes x GPUs)")
    p.add_argument("--gpus-per-node", type=int,
                   help="GPUs per node (default: what the cluster's GPU nodes have)")
    p.add_argument("--cpu", action="store_true",
                   help="train on CPUs, one worker per node taking the node's CPUs (a cluster "
                   "without GPUs, a loopback test cluster); without it the cluster must have "
                   "the GPUs the run asks for")
    p.add_argument("--storage", default=os.environ.get("TRMGPT_STORAGE"),
                   help="where the run lives: $STORAGE/<run id> (s3://, gs://); required "
                   "(default $TRMGPT_STORAGE)")
    p.add_argument("--faults", help=argparse.SUPPRESS)  # tests: TRMGPT_FAULTS for this job only
    p.add_argument("--force", action="store_true",
                   help="send even if the cluster lacks the resources now (nodes still "
                   "starting, an autoscaler that will add them)")
    p.set_defaults(fn=cmd_submit)
    for name in ("resume", "logs", "stop"):
        p = sub.add_parser(name, help="against a Ray cluster")
        p.add_argument("--run", required=True, help="the run id `submit` printed")
        if name == "logs":
            p.add_argument("--follow", action="store_true")
        if name == "stop":
            p.add_argument("--wait", type=float, default=600,
                           help="seconds to wait for the run's checkpoint before stopping "
                           "the job anyway")
        p.set_defaults(fn=cmd_jobs)
    p = sub.add_parser("status", help="every run on the Ray cluster")
    p.set_defaults(fn=cmd_jobs)
    args, extra = ap.parse_known_args(argv)
    if extra and args.cmd not in ("train", "describe", "submit", "resume"):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    from launcher.jobs.ray_jobs import JobsError

    try:
        args.fn(args, extra)
    except (ValueError, FileNotFoundError, JobsError) as e:
        # a refused config or input, an unreachable cluster: what and why, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
