"""cluster/: every cluster-launcher YAML passes the schema Ray ships (ray-schema.json)
and Ray's own config checks; the security settings the issue asks for are in each of them; the
nodes run the project's image; `python -m cluster` renders the worker count and every
placeholder, uses the project's own `ray`, and refuses bad input before anything runs.
Ray's AWS bootstrap: tests/test_cluster_aws.py; GCP: test_cluster_gcp.py; KubeRay:
test_cluster_kuberay.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
YAMLS = sorted((REPO / "cluster").glob("*.yaml"))


def test_every_cloud_and_gpu_has_a_yaml():
    assert {p.stem for p in YAMLS} == {"aws-a100", "aws-h100", "gcp-a100", "gcp-h100"}


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_yaml_validates_against_rays_schema(path):
    import ray.autoscaler
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cfg = yaml.safe_load(path.read_text())
    jsonschema.validate(cfg, schema)            # the file as written
    validate_config(prepare_config(cfg))        # and as `ray up` fills and checks it


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_yaml_security_and_setup(path):
    cfg = yaml.safe_load(path.read_text())
    text = path.read_text()
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in text
    assert "--num-cpus=0" in head
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(cmds)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "WANDB_API_KEY" not in text  # the key is a mounted file, never in the YAML
    # nodes run the project's image; nothing is downloaded or pip-installed at boot
    assert cfg["docker"]["image"] == "IMAGE" and cfg["docker"]["pull_before_run"]
    assert "--gpus all" in cfg["docker"]["worker_run_options"]
    boot = " ".join(cfg["setup_commands"] + cfg.get("initialization_commands", []))
    for word in ("pip install", "uv ", "curl", "wget"):
        assert word not in boot
    assert "ray.__version__ == '2.60.0'" in boot
    assert "~/trmgpt" not in cfg["file_mounts"]  # the code comes with the image and the job
    (gpu_type,) = [k for k in cfg["available_node_types"] if k != cfg["head_node_type"]]
    node = cfg["available_node_types"][gpu_type]["node_config"]
    machine = node.get("InstanceType") or node.get("machineType")
    assert machine == {"aws-a100": "p4d.24xlarge", "aws-h100": "p5.48xlarge",
                       "gcp-a100": "a2-highgpu-8g", "gcp-h100": "a3-highgpu-8g"}[path.stem]
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "NCCL_" in workers
    # GPU nodes: internal addresses only; the laptop reaches the head's external one
    assert cfg["provider"]["use_internal_ips"] and cfg["provider"]["use_external_head_ip"]
    if path.stem.startswith("aws"):
        assert "FI_PROVIDER=efa" in workers
        assert "--device=/dev/infiniband" in cfg["docker"]["worker_run_options"]
        assert "availability_zone" not in cfg["provider"]  # the one subnet decides it
        nics = node["NetworkInterfaces"]
        assert len(nics) == {"aws-a100": 4, "aws-h100": 32}[path.stem]
        assert nics[0] == {"NetworkCardIndex": 0, "DeviceIndex": 0, "InterfaceType": "efa",
                           "DeleteOnTermination": True}
        assert node["IamInstanceProfile"] == {"Arn": "WORKER_PROFILE"}
        assert node["Placement"] == {"GroupName": "PLACEMENT_GROUP"}
    else:
        assert node["serviceAccounts"][0]["email"] == "WORKER_SERVICE_ACCOUNT"
        assert node["networkInterfaces"][0]["nicType"] == "GVNIC"


def cluster_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    for k in ("STORAGE", "SECURITY_GROUP", "GCP_PROJECT", "IMAGE", "SUBNET", "SSH_CIDR",
              "GCP_SERVICE_ACCOUNT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


IMAGE = "111122223333.dkr.ecr.us-east-1.amazonaws.com/trmgpt:0.1.0-cu128"
AWS_OK = ["--subnet", "subnet-0123456789abcdef0", "--ssh-cidr", "203.0.113.7/32",
          "--storage", "s3://bucket/runs", "--image", IMAGE]


def test_render_pins_workers_and_fills_every_placeholder():
    from cluster.__main__ import render
    from cluster.aws import AwsResources

    res = AwsResources("vpc-1", "us-east-1b", "sg-0123abcd", "trmgpt-aws-h100-pg",
                       "arn:aws:iam::1:instance-profile/h", "arn:aws:iam::1:instance-profile/w")
    cfg = render("aws", "h100", 4, "s3://bucket/runs", image=IMAGE,
                 subnet="subnet-0123456789abcdef0", aws=res)
    node = cfg["available_node_types"]["gpu_h100"]
    assert node["min_workers"] == node["max_workers"] == 4
    for t in cfg["available_node_types"].values():
        for nic in t["node_config"]["NetworkInterfaces"]:
            assert nic["SubnetId"] == "subnet-0123456789abcdef0"
            assert nic["Groups"] == ["sg-0123abcd"]
    assert node["node_config"]["IamInstanceProfile"] == {"Arn": res.worker_profile_arn}
    assert node["node_config"]["Placement"] == {"GroupName": "trmgpt-aws-h100-pg"}
    assert cfg["docker"]["image"] == IMAGE
    cfg = render("gcp", "a100", 2, "gs://bucket/runs", image=IMAGE, project="my-project")
    assert cfg["provider"]["project_id"] == "my-project"
    nc = cfg["available_node_types"]["gpu_a100"]["node_config"]
    assert nc["serviceAccounts"][0]["email"] == "trmgpt-worker@my-project.iam.gserviceaccount.com"
    assert nc["networkInterfaces"][0]["subnetwork"] == (
        "projects/my-project/regions/us-central1/subnetworks/default")


def test_cluster_up_dry_run_prints_ray_up(tmp_path):
    res = cluster_cli("up", "--cloud", "aws", "--gpu", "a100", "--nodes", "1", "--dry-run",
                      *AWS_OK, home=tmp_path)
    assert res.returncode == 0, res.stderr
    # the project's own ray, not the one on PATH
    assert f"+ {Path(sys.executable).with_name('ray')} up -y" in res.stdout
    assert "--max-workers 1" in res.stdout
    assert not (tmp_path / ".trmgpt").exists()  # a dry run writes nothing


def test_the_projects_own_ray_is_used():
    from cluster.__main__ import ray_bin

    assert Path(ray_bin()) == Path(sys.executable).with_name("ray")
    assert Path(ray_bin()).exists()


def _without(flag: str) -> list[str]:
    i = AWS_OK.index(flag)
    return AWS_OK[:i] + AWS_OK[i + 2:]


@pytest.mark.parametrize("args,message", [
    (["up", "--cloud", "azure"], "cloud must be one of"),
    (["up", "--gpu", "v100"], "gpu must be one of"),
    (["up", "--nodes", "0", "--dry-run", *AWS_OK], "nodes must be >= 1"),
    (["up", "--nodes", "1", *_without("--storage")], "STORAGE=s3://"),   # even one node
    (["up", *_without("--subnet")], "SUBNET=subnet-"),
    (["up", *_without("--ssh-cidr")], "SSH_CIDR="),
    (["up", *_without("--image"), "--dry-run"], "IMAGE=<registry>"),
    (["up", *AWS_OK[:2], "--ssh-cidr", "0.0.0.0/0", *AWS_OK[4:]], "SSH_CIDR must be"),
    (["up", "--cloud", "gcp", "--storage", "gs://b/p", "--image", IMAGE], "GCP needs a project"),
    (["up", "--cloud", "gcp", "--project", "p", "--storage", "s3://b/p", "--image", IMAGE],
     "STORAGE=gs://"),
    (["down"], "no cluster started from this machine"),
    (["dashboard", "--gpu", "h100"], "no cluster started from this machine"),
])
def test_cluster_cli_refuses_bad_input(tmp_path, args, message):
    res = cluster_cli(*args, home=tmp_path)
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr
    assert "ray up" not in res.stdout  # nothing was run
