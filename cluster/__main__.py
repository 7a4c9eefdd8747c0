"""python -m cluster {up,down,dashboard}: a thin wrapper over `ray up`, `ray down`, `ray dashboard`.

`up` renders cluster/<cloud>-<gpu>.yaml (GPU worker count, optional SSH security group or GCP
project) into ~/.trmgpt/clusters/, prepares what the nodes get by file_mounts — the Ray auth token
(`ray get-auth-token --generate`), ~/.trmgpt/node/env (TRMGPT_STORAGE) and the wandb key from
your environment, all mode 600 — then runs `ray up`. Every command is printed before it runs;
`--dry-run` prints and stops. Credentials for AWS/GCP are the cloud SDK's own (env, profile).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STATE = Path.home() / ".trmgpt"
CLOUDS = ("aws", "gcp")
GPUS = ("a100", "h100")


def cluster_yaml(cloud: str, gpu: str) -> Path:
    if cloud not in CLOUDS:
        raise ValueError(f"cloud must be one of {CLOUDS}, got {cloud!r}")
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {GPUS}, got {gpu!r}")
    return HERE / f"{cloud}-{gpu}.yaml"


def render(cloud: str, gpu: str, nodes: int, storage: str | None,
           security_group: str | None, project: str | None) -> dict:
    """The cluster config for `ray up`: the GPU node type pinned to `nodes` workers."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    cfg = yaml.safe_load(cluster_yaml(cloud, gpu).read_text())
    (gpu_type,) = [k for k in cfg["available_node_types"] if k != cfg["head_node_type"]]
    node = cfg["available_node_types"][gpu_type]
    node["min_workers"] = node["max_workers"] = nodes
    cfg["max_workers"] = max(cfg["max_workers"], nodes)
    if security_group:
        if cloud != "aws" or not re.fullmatch(r"sg-[0-9a-f]+", security_group):
            raise ValueError(f"SECURITY_GROUP must be an AWS group id sg-..., got "
                             f"{security_group!r}")
        for t in cfg["available_node_types"].values():
            nics = t["node_config"].get("NetworkInterfaces")
            if nics:
                for nic in nics:
                    nic["Groups"] = [security_group]
            else:
                t["node_config"]["SecurityGroupIds"] = [security_group]
    if cloud == "gcp":
        if not project:
            raise ValueError("GCP needs a project: GCP_PROJECT=<project id>")
        cfg["provider"]["project_id"] = project
    if nodes > 1 and not (storage and "://" in storage):
        raise ValueError("more than one node needs shared checkpoint storage every node can "
                         "write: STORAGE=s3://bucket/prefix (aws) or gs://bucket/prefix (gcp)")
    return cfg


def run(cmd: list[str], dry: bool) -> int:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    return 0 if dry else subprocess.call(cmd, cwd=REPO)


def prepare_node_files(storage: str | None, dry: bool) -> None:
    """What the YAML mounts: the token, ~/.trmgpt/node/{env,wandb_api_key} (mode 600)."""
    node = STATE / "node"
    if dry:
        return
    node.mkdir(parents=True, exist_ok=True)
    os.chmod(STATE, 0o700)
    os.chmod(node, 0o700)
    env = node / "env"
    env.write_text(f"TRMGPT_STORAGE={storage}\n" if storage else "")
    key = os.environ.get("WANDB_API_KEY")
    dest = node / "wandb_api_key"
    if key:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key)
    elif dest.exists():
        dest.unlink()
    os.chmod(env, 0o600)
    subprocess.run(["ray", "get-auth-token", "--generate"], check=True, stdout=subprocess.DEVNULL)


def rendered_path(cloud: str, gpu: str) -> Path:
    return STATE / "clusters" / f"{cloud}-{gpu}.yaml"


def up(args) -> int:
    cfg = render(args.cloud, args.gpu, args.nodes, args.storage, args.security_group,
                 args.project)
    out = rendered_path(args.cloud, args.gpu)
    if not args.dry_run:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    prepare_node_files(args.storage, args.dry_run)
    if args.cloud == "aws" and not args.security_group:
        print("note: Ray's security group admits SSH from anywhere (nothing else); pass "
              "SECURITY_GROUP=sg-... to admit only your network", file=sys.stderr)
    code = run(["ray", "up", "-y", str(out), "--min-workers", str(args.nodes), "--max-workers",
                str(args.nodes), "--disable-usage-stats"], args.dry_run)
    if code == 0:
        print(f"cluster up. Next: `make dashboard CLOUD={args.cloud} GPU={args.gpu}` (keep it "
              f"open), then `make submit PRESET=B NODES={args.nodes}`")
    return code


def existing(cloud: str, gpu: str) -> Path:
    out = rendered_path(cloud, gpu)
    if not out.exists():
        raise ValueError(f"no cluster started from this machine for {cloud}/{gpu} ({out} is "
                         "missing); start one with `make cluster-up`")
    return out


def down(args) -> int:
    out = rendered_path(args.cloud, args.gpu) if args.dry_run else existing(args.cloud, args.gpu)
    return run(["ray", "down", "-y", str(out)], args.dry_run)


def dashboard(args) -> int:
    out = rendered_path(args.cloud, args.gpu) if args.dry_run else existing(args.cloud, args.gpu)
    print("dashboard and job API on http://127.0.0.1:8265 while this runs (Ctrl-C closes it)")
    return run(["ray", "dashboard", "-p", "8265", str(out)], args.dry_run)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn in (("up", up), ("down", down), ("dashboard", dashboard)):
        p = sub.add_parser(name)
        p.add_argument("--cloud", default="aws")
        p.add_argument("--gpu", default="a100")
        p.add_argument("--dry-run", action="store_true", help="print the commands only")
        if name == "up":
            p.add_argument("--nodes", type=int, default=1, help="8-GPU worker nodes")
            p.add_argument("--storage", default=os.environ.get("STORAGE") or None,
                           help="shared checkpoint storage (s3://... or gs://...)")
            p.add_argument("--security-group", default=os.environ.get("SECURITY_GROUP") or None)
            p.add_argument("--project", default=os.environ.get("GCP_PROJECT") or None)
        p.set_defaults(fn=fn)
    args = ap.parse_args(argv)
    try:
        cluster_yaml(args.cloud, args.gpu)
        code = args.fn(args)
    except (ValueError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"error: {e}") from None
    sys.exit(code)


if __name__ == "__main__":
    main()
