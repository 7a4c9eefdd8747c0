"""cluster/kuberay/: the RayCluster and RayJob manifests validate against KubeRay v1.5.1's own CRD
schemas (the first release with `spec.authOptions`), kept as fixtures in tests/assets/
(kuberay-v1.5.1-{rayclusters,rayjobs}.json: the CRDs' openAPIV3Schema from ray-project/kuberay
v1.5.1, helm-chart/kuberay-operator/crds/, with the documentation strings removed; each file
names its source commit and the sha256 of the YAML it came from).

Validation is as strict as `kubectl apply` (strict field validation, kubectl's default since
1.27): an unknown field is an error, not silently pruned. That is added here by closing every
object schema that lists its properties (additionalProperties: false) unless the CRD marks it
x-kubernetes-preserve-unknown-fields. What the API server would also check and this does not:
the CRDs' CEL rules (x-kubernetes-validations; they concern managedBy and deletion rules, fields
these manifests do not set), object metadata, and the operator's own webhook-free validation
(ray-operator/controllers/ray/utils/validation.go; the Ray version >= 2.52.0 that token auth
needs is asserted below instead).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "tests" / "assets"
KUBERAY = REPO / "cluster" / "kuberay"


def _strict(schema):
    """Close every object schema with listed properties, as strict field validation does."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        if "properties" in schema:
            out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def crd_schema(plural: str) -> dict:
    fixture = json.loads((ASSETS / f"kuberay-v1.5.1-{plural}.json").read_text())
    assert "ray-project/kuberay v1.5.1" in fixture["source"]
    return _strict(fixture["openAPIV3Schema"])


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict]:
    return {"RayCluster": crd_schema("rayclusters"), "RayJob": crd_schema("rayjobs")}


def manifest(name: str) -> dict:
    (doc,) = list(yaml.safe_load_all((KUBERAY / f"{name}.yaml").read_text()))
    return doc


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.mark.parametrize("name,kind", [("raycluster", "RayCluster"), ("rayjob", "RayJob")])
def test_manifest_validates_against_kuberay_crd(schemas, name, kind):
    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    jsonschema.validate(doc, schemas[kind])


@pytest.mark.parametrize("name", ["raycluster", "rayjob"])
def test_token_auth_service_account_and_reachable_dashboard(name):
    spec = cluster_spec(manifest(name))
    # authOptions: the operator puts the token into every Ray container, the autoscaler, the
    # submitter, and uses it to poll the dashboard (KubeRay >= 1.5.1, Ray >= 2.52.0)
    assert spec["authOptions"] == {"mode": "token"}
    major, minor, _ = (int(x) for x in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    # the operator polls job status through the head Service: a loopback-only dashboard
    # would leave RayJob status stuck (and shutdownAfterJobFinishes never firing)
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert head["rayStartParams"]["num-cpus"] == "0"
    templates = [head["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for t in templates:
        assert t["spec"]["serviceAccountName"] == "trmgpt-ray"   # the bucket identity
        for c in t["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            # the operator injects these; a hand-set copy would shadow or duplicate its own
            assert "RAY_AUTH_TOKEN" not in env and "RAY_AUTH_MODE" not in env
            assert "secretKeyRef" in env["WANDB_API_KEY"]["valueFrom"]
            assert env["TRMGPT_STORAGE"]["value"].startswith(("s3://", "gs://"))
            assert c["image"] == templates[0]["spec"]["containers"][0]["image"]
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8
    # fits a2-highgpu-8g (~680 GB), the smallest 8-GPU node in cluster/
    assert int(worker["resources"]["limits"]["memory"].removesuffix("Gi")) <= 620


def test_rayjob_submits_through_the_operator():
    doc = manifest("rayjob")
    assert doc["spec"]["submissionMode"] == "SidecarMode"
    assert doc["spec"]["shutdownAfterJobFinishes"] is True
    assert "launcher train --ray --address auto --gpu" in doc["spec"]["entrypoint"]


def test_access_manifest_binds_cloud_identity_and_fences_the_dashboard():
    sa, policy = yaml.safe_load_all((KUBERAY / "access.yaml").read_text())
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["name"] == "trmgpt-ray"
    ann = sa["metadata"]["annotations"]
    assert ann["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")       # IRSA
    assert ann["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")  # GKE WI
    assert policy["kind"] == "NetworkPolicy"
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    dashboard = [r for r in policy["spec"]["ingress"] if r.get("ports")]
    assert [p["port"] for r in dashboard for p in r["ports"]] == [8265]
    for rule in policy["spec"]["ingress"]:
        assert rule["from"], "an ingress rule without `from` admits everyone"
        for peer in rule["from"]:
            assert "ipBlock" not in peer


@pytest.mark.parametrize("mutate,needle", [
    (lambda s: s.update(authOption={"mode": "token"}), "authOption"),      # a typo'd field
    (lambda s: s.update(authOptions={"mode": "tokens"}), "tokens"),        # not in the enum
    (lambda s: s["headGroupSpec"]["template"]["spec"].update(serviceAccount=1), "serviceAccount"),
    (lambda s: s["workerGroupSpecs"][0].update(replicas="4"), "'4'"),      # a string count
])
def test_schema_rejects_planted_defects(schemas, mutate, needle):
    """The validation is real: each planted defect is refused (and would be by kubectl)."""
    doc = copy.deepcopy(manifest("raycluster"))
    mutate(doc["spec"])
    with pytest.raises(jsonschema.ValidationError) as e:
        jsonschema.validate(doc, schemas["RayCluster"])
    assert needle in str(e.value.message) or needle in str(e.value)


def test_dockerfile_is_the_image_every_path_runs():
    text = (KUBERAY / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-cu128" in text
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" in text
    assert 'pip install --no-cache-dir -e ".[gpu,cloud]"' in text  # the head's autoscaler
    assert "EFA_INSTALLER_VERSION=" in text  # libfabric + aws-ofi-nccl for the AWS nodes
    image = cluster_spec(manifest("raycluster"))["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"]
    assert image.endswith(":0.1.0-cu128")
