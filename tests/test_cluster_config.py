"""cluster/: every cluster-launcher YAML passes the schema Ray ships (ray-schema.json)
and Ray's own config checks; the security settings the issue asks for are in each of them; the
KubeRay manifests keep the job API on loopback and take secrets from a Secret; `python -m cluster`
renders the worker count and refuses bad input before anything runs."""

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
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        assert "RAY_AUTH_MODE=token" in " ".join(cmds)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "WANDB_API_KEY" not in text  # the key is a mounted file, never in the YAML
    setup = " ".join(cfg["setup_commands"])
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu" in setup
    assert "[gpu]" in setup
    (gpu_type,) = [k for k in cfg["available_node_types"] if k != cfg["head_node_type"]]
    node = cfg["available_node_types"][gpu_type]["node_config"]
    machine = node.get("InstanceType") or node.get("machineType")
    assert machine == {"aws-a100": "p4d.24xlarge", "aws-h100": "p5.48xlarge",
                       "gcp-a100": "a2-highgpu-8g", "gcp-h100": "a3-highgpu-8g"}[path.stem]
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "NCCL_" in workers
    if path.stem.startswith("aws"):
        assert "FI_PROVIDER=efa" in workers
        assert node["NetworkInterfaces"][0]["InterfaceType"] == "efa"


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_kuberay_manifests(name):
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / f"{name}.yaml").read_text()))
    (doc,) = docs
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]["rayClusterSpec"] if name == "rayjob" else doc["spec"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert head["serviceType"] == "ClusterIP"
    env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    for secret in ("WANDB_API_KEY", "RAY_AUTH_TOKEN"):
        assert "secretKeyRef" in env[secret]["valueFrom"]
    workers = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == 8
    if name == "rayjob":
        assert doc["spec"]["submissionMode"] == "SidecarMode"  # reaches the loopback job API
        assert "launcher train --ray --address auto --gpu" in doc["spec"]["entrypoint"]


def cluster_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    for k in ("STORAGE", "SECURITY_GROUP", "GCP_PROJECT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "cluster", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_render_pins_workers_and_group():
    from cluster.__main__ import render

    cfg = render("aws", "h100", 4, "s3://bucket/runs", "sg-0123abcd", None)
    node = cfg["available_node_types"]["gpu_h100"]
    assert node["min_workers"] == node["max_workers"] == 4
    assert node["node_config"]["NetworkInterfaces"][0]["Groups"] == ["sg-0123abcd"]
    assert cfg["available_node_types"]["head"]["node_config"]["SecurityGroupIds"] == [
        "sg-0123abcd"]
    cfg = render("gcp", "a100", 2, "gs://bucket/runs", None, "my-project")
    assert cfg["provider"]["project_id"] == "my-project"


def test_cluster_up_dry_run_prints_ray_up(tmp_path):
    res = cluster_cli("up", "--cloud", "aws", "--gpu", "a100", "--nodes", "1", "--dry-run",
                      home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "+ ray up -y" in res.stdout and "--max-workers 1" in res.stdout
    assert not (tmp_path / ".trmgpt").exists()  # a dry run writes nothing


@pytest.mark.parametrize("args,message", [
    (["up", "--cloud", "azure"], "cloud must be one of"),
    (["up", "--gpu", "v100"], "gpu must be one of"),
    (["up", "--nodes", "0"], "nodes must be >= 1"),
    (["up", "--nodes", "2"], "shared checkpoint storage"),
    (["up", "--cloud", "gcp"], "GCP needs a project"),
    (["up", "--security-group", "open-to-all"], "SECURITY_GROUP must be"),
    (["down"], "no cluster started from this machine"),
    (["dashboard", "--gpu", "h100"], "no cluster started from this machine"),
])
def test_cluster_cli_refuses_bad_input(tmp_path, args, message):
    res = cluster_cli(*args, home=tmp_path)
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr
    assert "+ ray" not in res.stdout  # nothing was run
