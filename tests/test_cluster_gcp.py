"""The GCP YAMLs, as far as Ray's GCP bootstrap can go offline.

Run for real here: Ray's own `_configure_subnet` (the last stage of bootstrap_gcp) on the
rendered config: it must keep our network interfaces (no external address for GPU nodes) rather
than inject its default ONE_TO_ONE_NAT one; Ray's node-type detection; the instance body Ray's
GCPCompute.create_instance would send (its own URL expansion and labels), checked field by field
against Compute Engine's v1 API schema (the discovery document google-api-python-client ships,
so an unknown field or a wrong type fails, e.g. `scheduling` written as a list, as Ray's own
examples do); and the request google-api-python-client builds from it.

Not verified here (each needs Google's APIs): bootstrap_gcp's project lookup, its service account
and IAM bindings for the head (`_configure_project`, `_configure_iam_role`), the SSH key upload
(`_configure_key_pair`); that the worker service account exists and holds the bucket role; that
the DLVM image family exists; that Compute Engine accepts the insert (quotas, a3 in the zone).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from cluster.__main__ import render

PROJECT = "trmgpt-test-project"
IMAGE = "us-central1-docker.pkg.dev/trmgpt-test-project/trmgpt/trmgpt:0.1.0-cu128"


@pytest.fixture(scope="module")
def compute_schemas() -> dict:
    import googleapiclient

    doc = Path(googleapiclient.__file__).parent / "discovery_cache/documents/compute.v1.json"
    return json.loads(doc.read_text())["schemas"]


def check(value, schema: dict, schemas: dict, path: str = "") -> None:
    """Does `value` fit the discovery-document schema? Raises AssertionError naming the path."""
    if "$ref" in schema:
        schema = schemas[schema["$ref"]]
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{path}: expected an object, got {value!r}"
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            if props is not None and k in props:
                check(v, props[k], schemas, f"{path}.{k}")
            elif extra is not None:
                check(v, extra, schemas, f"{path}.{k}")
            else:
                raise AssertionError(f"{path}: unknown field {k!r}")
    elif kind == "array":
        assert isinstance(value, list), f"{path}: expected a list, got {value!r}"
        for i, v in enumerate(value):
            check(v, schema["items"], schemas, f"{path}[{i}]")
    elif kind == "string":
        # int64 fields travel as strings in Google's JSON, numbers are accepted too
        ok = isinstance(value, str) or (schema.get("format") in ("int64", "uint64")
                                        and isinstance(value, int))
        assert ok, f"{path}: expected a string, got {value!r}"
        if "enum" in schema:
            assert value in schema["enum"], f"{path}: {value!r} not in {schema['enum']}"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: {value!r}"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{path}: expected a boolean, got {value!r}"


@pytest.mark.parametrize("gpu", ["a100", "h100"])
def test_rays_gcp_bootstrap_offline_stages_and_instance_bodies(gpu, compute_schemas):
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.gcp.config import _configure_subnet, get_node_type
    from ray.autoscaler._private.gcp.node import GCPCompute, GCPNodeType
    from ray.autoscaler._private.util import validate_config

    cfg = prepare_config(render("gcp", gpu, 2, "gs://trmgpt-ckpt/runs", image=IMAGE,
                                project=PROJECT))
    validate_config(cfg)
    # compute=None: with every node's interfaces given, Ray must not call the API at all
    out = _configure_subnet(copy.deepcopy(cfg), compute=None)
    assert out["available_node_types"] == cfg["available_node_types"]
    subnet = f"projects/{PROJECT}/regions/us-central1/subnetworks/default"
    compute = GCPCompute(None, PROJECT, cfg["provider"]["availability_zone"],
                         cfg["cluster_name"])
    for name, node_type in out["available_node_types"].items():
        nc = node_type["node_config"]
        assert get_node_type(nc) == GCPNodeType.COMPUTE
        (nic,) = nc["networkInterfaces"]
        assert nic["subnetwork"] == subnet and nic["nicType"] == "GVNIC"
        if name == "head":
            assert nic["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT"
            assert "serviceAccounts" not in nc  # Ray's bootstrap gives the head its own
        else:
            assert "accessConfigs" not in nic  # GPU nodes: internal address only
            (sa,) = nc["serviceAccounts"]
            assert sa["email"] == f"trmgpt-worker@{PROJECT}.iam.gserviceaccount.com"
            assert nc["scheduling"]["onHostMaintenance"] == "TERMINATE"
        # the body GCPCompute.create_instance sends (minus the API call)
        body = compute._convert_resources_to_urls(nc)
        body.update(labels={"ray-cluster-name": cfg["cluster_name"]}, name=f"ray-{name}")
        check(body, {"$ref": "Instance"}, compute_schemas, "Instance")
        assert body["machineType"].startswith("zones/us-central1-a/machineTypes/")

    assert out["provider"]["use_internal_ips"] and out["provider"]["use_external_head_ip"]
    assert out["provider"]["project_id"] == PROJECT


def test_insert_request_builds_from_the_shipped_discovery_document():
    from google.auth.credentials import AnonymousCredentials
    from googleapiclient import discovery

    cfg = render("gcp", "h100", 1, "gs://trmgpt-ckpt/runs", image=IMAGE, project=PROJECT)
    nc = cfg["available_node_types"]["gpu_h100"]["node_config"]
    api = discovery.build("compute", "v1", credentials=AnonymousCredentials(),
                          static_discovery=True)
    req = api.instances().insert(project=PROJECT, zone="us-central1-a", body=nc)
    assert req.method == "POST" and f"/projects/{PROJECT}/zones/us-central1-a/instances" in req.uri
    assert json.loads(req.body)["serviceAccounts"][0]["email"].startswith("trmgpt-worker@")


def test_schema_check_catches_planted_defects(compute_schemas):
    cfg = render("gcp", "a100", 1, "gs://b/p", image=IMAGE, project=PROJECT)
    good = cfg["available_node_types"]["gpu_a100"]["node_config"]
    for mutate, needle in [
        (lambda nc: nc.update(scheduling=[{"onHostMaintenance": "TERMINATE"}]), "scheduling"),
        (lambda nc: nc["networkInterfaces"][0].update(nicTyp="GVNIC"), "nicTyp"),
        (lambda nc: nc["networkInterfaces"][0].update(nicType="EFA"), "EFA"),
        (lambda nc: nc.update(serviceAccount={"email": "x"}), "serviceAccount"),
    ]:
        nc = copy.deepcopy(good)
        mutate(nc)
        with pytest.raises(AssertionError, match=needle):
            check(nc, {"$ref": "Instance"}, compute_schemas, "Instance")
