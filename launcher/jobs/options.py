"""What every launcher command shares: the config flags, their resolution into a RunConfig (the
same refusals `train`, `submit` and `resume` give) and the engine's environment."""

from __future__ import annotations

import argparse

from launcher.engine.config import RunConfig, parse_overrides, resolve
from launcher.engine.dist import engine_env  # noqa: F401  (re-exported for the CLI)


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


def run_config_from(preset: str, argv: list[str], world_size: int,
                    gpus_per_node: int = 8) -> RunConfig:
    """Resolve a preset plus `launcher train`-style flags, as the job will (refusals here)."""
    p = argparse.ArgumentParser(prog="launcher", add_help=False)
    add_config_args(p)
    for flag in ("--resume", "--run-dir", "--stop-after", "--address", "--max-failures"):
        p.add_argument(flag)
    p.add_argument("--min-workers", type=int)
    p.add_argument("--gpu", action="store_true")
    args, extra = p.parse_known_args(argv)
    run = run_config(argparse.Namespace(**{**vars(args), "preset": preset}), extra, world_size)
    if args.min_workers is not None:  # elastic: what the job would refuse, refused now
        from launcher.jobs.ray_train import elastic_batch

        if not 1 <= args.min_workers <= world_size:
            raise ValueError(f"--min-workers must be in [1, {world_size}]")
        elastic_batch(run, (args.min_workers, world_size), gpus_per_node)
    return run
