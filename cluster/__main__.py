"""python -m cluster {up,down,dashboard}: a thin wrapper over `ray up`, `ray down`, `ray dashboard`.

`up` renders cluster/<cloud>-<gpu>.yaml (GPU worker count, the image, on AWS the subnet and what
cluster/aws.py gets or creates, on GCP the project and the GPU nodes' service account) into
~/.trmgpt/clusters/, prepares what the nodes get by file_mounts — the Ray auth token
(`ray get-auth-token --generate`), ~/.trmgpt/node/env (TRMGPT_STORAGE) and the wandb key from
your environment, all mode 600 — then runs the project's own `ray up` (.venv/bin/ray). Every
command is printed before it runs; `--dry-run` prints and stops. Credentials for AWS/GCP are the
cloud SDK's own (env, profile); the SDKs come with the `cloud` extra (`make cluster-up` adds it).
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

from cluster.aws import AwsResources

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


PLACEHOLDER = re.compile(r"\b(IMAGE|HEAD_PROFILE|WORKER_PROFILE|PLACEMENT_GROUP|PROJECT|"
                         r"WORKER_SERVICE_ACCOUNT|SUBNETWORK)\b")
IMAGE_RE = re.compile(r"[a-z0-9][\w.\-/:@]*[:@][\w.\-]+")


def _fill(value, table: dict[str, str]):
    """Replace the YAML's placeholder words (IMAGE, WORKER_PROFILE, ...) everywhere."""
    if isinstance(value, dict):
        return {k: _fill(v, table) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, table) for v in value]
    if isinstance(value, str) and value in table:
        return table[value]
    return value


def render(cloud: str, gpu: str, nodes: int, storage: str | None, *, image: str | None,
           project: str | None = None, subnet: str | None = None,
           aws: AwsResources | None = None, service_account: str | None = None,
           gcp_subnet: str = "default", head_subnet: str | None = None) -> dict:
    """The cluster config for `ray up`: the GPU node type pinned to `nodes` workers, every
    placeholder of the YAML filled in (for AWS from the resources cluster/aws.py made)."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    scheme = {"aws": "s3://", "gcp": "gs://"}[cloud]
    if not (storage and storage.startswith(scheme) and len(storage) > len(scheme)):
        # Nodes share no filesystem: checkpoints, the run folder and Ray's own state live in
        # the bucket, even with one GPU node (the head is another machine).
        raise ValueError(f"a cluster needs object storage every node can write: "
                         f"STORAGE={scheme}bucket/prefix")
    if not (image and IMAGE_RE.fullmatch(image)):
        raise ValueError("the nodes run the project's image: IMAGE=<registry>/trmgpt:<tag> "
                         "(build and push cluster/kuberay/Dockerfile first), got "
                         f"{image!r}")
    cfg = yaml.safe_load(cluster_yaml(cloud, gpu).read_text())
    (gpu_type,) = [k for k in cfg["available_node_types"] if k != cfg["head_node_type"]]
    node = cfg["available_node_types"][gpu_type]
    node["min_workers"] = node["max_workers"] = nodes
    cfg["max_workers"] = max(cfg["max_workers"], nodes)
    table = {"IMAGE": image}
    if cloud == "aws":
        if aws is None or not subnet:
            raise ValueError("AWS needs a subnet (one availability zone): SUBNET=subnet-...")
        table.update(HEAD_PROFILE=aws.head_profile_arn, WORKER_PROFILE=aws.worker_profile_arn,
                     PLACEMENT_GROUP=aws.placement_group)
        for name, t in cfg["available_node_types"].items():
            for nic in t["node_config"]["NetworkInterfaces"]:
                nic["SubnetId"] = (head_subnet or subnet) if name == cfg["head_node_type"] \
                    else subnet
                nic["Groups"] = [aws.security_group]
    else:
        if not project:
            raise ValueError("GCP needs a project: GCP_PROJECT=<project id>")
        cfg["provider"]["project_id"] = project
        region = cfg["provider"]["region"]
        table.update(
            PROJECT=project,
            WORKER_SERVICE_ACCOUNT=service_account
            or f"trmgpt-worker@{project}.iam.gserviceaccount.com",
            SUBNETWORK=f"projects/{project}/regions/{region}/subnetworks/{gcp_subnet}")
    cfg = _fill(cfg, table)
    left = PLACEHOLDER.findall(yaml.safe_dump(cfg))
    if left:
        raise AssertionError(f"unfilled placeholders in the rendered config: {left}")
    return cfg


def ray_bin() -> str:
    """The project's own `ray` (the one installed beside this Python, i.e. .venv/bin/ray), not
    whatever `ray` is on PATH: a different Ray on the laptop than on the nodes breaks `ray up`."""
    path = Path(sys.executable).with_name("ray")
    if not path.exists():
        raise ValueError(f"{path} is missing: install the project first (`make setup`)")
    return str(path)


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
    subprocess.run([ray_bin(), "get-auth-token", "--generate"], check=True,
                   stdout=subprocess.DEVNULL)


def rendered_path(cloud: str, gpu: str) -> Path:
    return STATE / "clusters" / f"{cloud}-{gpu}.yaml"


def aws_resources(args, cluster_name: str, region: str) -> AwsResources:
    """Get or create the security group, placement group and instance profiles (cluster/aws.py);
    a dry run only names them."""
    if not args.subnet:
        raise ValueError("AWS needs a subnet (one availability zone): SUBNET=subnet-...")
    if not args.ssh_cidr:
        raise ValueError("AWS needs the network SSH is admitted from: SSH_CIDR=a.b.c.d/32 "
                         "(your address; `curl https://checkip.amazonaws.com`)")
    named = AwsResources("vpc-?", "?", "sg-<dry-run>", f"{cluster_name}-pg",
                         f"arn:aws:iam::<account>:instance-profile/{cluster_name}-head",
                         f"arn:aws:iam::<account>:instance-profile/{cluster_name}-worker")
    # every other input is checked (a render with these names) before anything is created
    render(args.cloud, args.gpu, args.nodes, args.storage, image=args.image,
           subnet=args.subnet, aws=named, head_subnet=args.head_subnet)
    if args.dry_run:
        return named
    from cluster.aws import ensure

    res, notes = ensure(cluster_name, region, args.subnet, args.ssh_cidr, args.storage or "",
                        head_subnet=args.head_subnet)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"aws: subnet {args.subnet} ({res.availability_zone}), security group "
          f"{res.security_group}, placement group {res.placement_group}, worker profile "
          f"{res.worker_profile_arn}", file=sys.stderr)
    return res


def up(args) -> int:
    raw = yaml.safe_load(cluster_yaml(args.cloud, args.gpu).read_text())
    res = None
    if args.cloud == "aws":
        if not (args.storage or "").startswith("s3://"):
            raise ValueError("a cluster needs object storage every node can write: "
                             "STORAGE=s3://bucket/prefix")
        res = aws_resources(args, raw["cluster_name"], raw["provider"]["region"])
    cfg = render(args.cloud, args.gpu, args.nodes, args.storage, image=args.image,
                 project=args.project, subnet=args.subnet, aws=res,
                 service_account=args.service_account,
                 head_subnet=getattr(args, "head_subnet", None))
    ray = ray_bin()
    out = rendered_path(args.cloud, args.gpu)
    if not args.dry_run:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    prepare_node_files(args.storage, args.dry_run)
    code = run([ray, "up", "-y", str(out), "--min-workers", str(args.nodes), "--max-workers",
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
    return run([ray_bin(), "down", "-y", str(out)], args.dry_run)


def dashboard(args) -> int:
    out = rendered_path(args.cloud, args.gpu) if args.dry_run else existing(args.cloud, args.gpu)
    print("dashboard and job API on http://127.0.0.1:8265 while this runs (Ctrl-C closes it)")
    return run([ray_bin(), "dashboard", "-p", "8265", str(out)],
               args.dry_run)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    env = os.environ.get
    for name, fn in (("up", up), ("down", down), ("dashboard", dashboard)):
        p = sub.add_parser(name)
        p.add_argument("--cloud", default="aws")
        p.add_argument("--gpu", default="a100")
        p.add_argument("--dry-run", action="store_true", help="print the commands only")
        if name == "up":
            p.add_argument("--nodes", type=int, default=1, help="8-GPU worker nodes")
            p.add_argument("--storage", default=env("STORAGE") or None,
                           help="the run's object storage (s3://... or gs://...), required")
            p.add_argument("--image", default=env("IMAGE") or None,
                           help="the image built from cluster/kuberay/Dockerfile, required")
            p.add_argument("--subnet", default=env("SUBNET") or None,
                           help="AWS: the subnet (= availability zone) of every node")
            p.add_argument("--head-subnet", default=env("HEAD_SUBNET") or None,
                           help="AWS: a public subnet of the same VPC for the head (default: "
                                "SUBNET)")
            p.add_argument("--ssh-cidr", default=env("SSH_CIDR") or None,
                           help="AWS: the only network SSH is admitted from")
            p.add_argument("--project", default=env("GCP_PROJECT") or None)
            p.add_argument("--service-account", default=env("GCP_SERVICE_ACCOUNT") or None,
                           help="GCP: the GPU nodes' service account (bucket rights); default "
                                "trmgpt-worker@<project>.iam.gserviceaccount.com")
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
