"""python -m launcher {train,describe,eval,sample,export,plot,submit,resume,status,logs,stop}"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from launcher.config import RunConfig, parse_overrides, resolve

ENV_DEFAULTS = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache/trmgpt/torch_extensions")}


def engine_env() -> None:
    """Environment of every command that may import deepspeed: DeepSpeed's accelerator from the
    machine (cuda on a GPU machine, cpu otherwise) unless DS_ACCELERATOR is set, offline hubs."""
    from launcher.dist import choose_accelerator

    choose_accelerator()
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny, A, B, C or D (configs/presets)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any model or train key; repeatable")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--data", help="data spec (name, path/glob/URL, spec file, tokenized dir)")
    p.add_argument("--workers", type=int, default=1, help="ranks to start on this machine")


def run_config(args, extra: list[str], world_size: int) -> RunConfig:
    over = parse_overrides(args.set, extra)
    if args.zero is not None:
        over["zero_stage"] = str(args.zero)
    if args.max_steps is not None:
        over["max_steps"] = str(args.max_steps)
    if args.data:
        over["data"] = args.data
    return resolve(args.preset, over, world_size=world_size)


def cmd_train(args, extra: list[str]) -> None:
    engine_env()
    in_group = "RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", args.workers))
    run = run_config(args, extra, world)  # refused here, before any rank starts
    if not args.resume:  # refused here too, before any rank starts
        from launcher.dist import DistInfo
        from launcher.train import earlier_run, run_checkpointer

        conflict = earlier_run(Path(args.run_dir),
                               run_checkpointer(run, Path(args.run_dir), DistInfo(0, 1, 0)))
        if conflict:
            raise ValueError(conflict)
    if args.workers > 1 and not in_group:
        # start the ranks with torch's elastic launcher; each one re-enters here
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.workers}", "-m", "launcher", *sys.argv[1:]]
        sys.exit(subprocess.call(cmd))
    from launcher.train import main_train

    main_train(run, args.run_dir, args.resume, args.stop_after)


def cmd_describe(args, extra: list[str]) -> None:
    from launcher.describe import describe

    world = args.workers if args.nodes is None else args.nodes * args.gpus_per_node
    print(describe(run_config(args, extra, world), world))


def cmd_eval(args, extra: list[str]) -> None:
    engine_env()
    from launcher.evaluate import eval_run

    print(json.dumps(eval_run(args.run_dir, args.weights, args.batches), indent=2))


def cmd_sample(args, extra: list[str]) -> None:
    engine_env()
    from launcher.evaluate import sample

    print(sample(args.run_dir, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                 args.weights))


def cmd_export(args, extra: list[str]) -> None:
    engine_env()
    from launcher.export import export

    print(f"wrote {export(args.run_dir, args.out, args.weights)}")


def cmd_plot(args, extra: list[str]) -> None:
    from launcher.plot import plot

    for p in plot(args.run_dir):
        print(f"wrote {p}")


def cmd_cluster(args, extra: list[str]) -> None:
    raise SystemExit(f"launcher {args.cmd}: the Ray cluster launcher (Ray Jobs + Ray Train) is "
                     "not built yet; train on this machine with `launcher train --workers N`.")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="launcher", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train a preset (nanochat-style flags accepted)")
    add_config_args(p)
    p.add_argument("--run-dir", required=True,
                   help="the run's folder; a new run needs one without checkpoints or metrics "
                        "(an earlier run there is refused, never overwritten)")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue the run in --run-dir from its newest complete checkpoint "
                        "('latest') or from a checkpoint folder (checkpoints/step_N); stops "
                        "with an error when there is none")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="checkpoint and exit at this step (a job segment); resume goes on")
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
    for name in ("submit", "resume", "status", "logs", "stop"):
        p = sub.add_parser(name, help="against a Ray cluster")
        p.set_defaults(fn=cmd_cluster)
    args, extra = ap.parse_known_args(argv)
    if extra and args.cmd not in ("train", "describe", "submit", "resume", "status", "logs",
                                  "stop"):
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.fn(args, extra)
    except ValueError as e:  # a refused config or input: say what and why, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
