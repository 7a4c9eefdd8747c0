"""Ray's own AWS bootstrap (ray.autoscaler._private.aws.config.bootstrap_aws, what `ray up` runs
before it launches anything) passes on both rendered AWS YAMLs, against moto's EC2/IAM server on
127.0.0.1 (tests/s3server.py starts it; one server answers every AWS service). The test first
makes what a user has (a VPC; a public subnet with an internet gateway for the head, a private
one behind a NAT gateway for the GPU nodes, one AZ), then runs cluster/aws.py (security group,
instance profiles), renders, bootstraps, and launches the GPU and head nodes through Ray's AWS node
provider (RunInstances with all the EFA interfaces), as the head's autoscaler would.

Not verified here: moto 5.2.5 implements no placement-group API (create_placement_group is
NotImplemented; RunInstances ignores Placement), so the placement group's creation is skipped in
the test and its use is only on paper; moto does not enforce IAM, so whether the policies are
sufficient (PassRole for the head, the bucket for the workers) is only on paper too; and EC2's
own rules for EFA (instance types, card/device layout, efa-only on p5) are AWS's, not moto's.
"""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from cluster.__main__ import cluster_yaml, render
from tests.s3server import s3_server

CIDR = "203.0.113.7/32"
IMAGE = "111122223333.dkr.ecr.us-east-1.amazonaws.com/trmgpt:0.1.0-cu128"
STORAGE = "s3://trmgpt-ckpt/runs"


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """moto on 127.0.0.1 with a user's VPC and subnet; HOME in a temp dir (Ray writes its SSH
    key to ~/.ssh); Ray's boto3 caches emptied so they reach this server."""
    import boto3
    from ray.autoscaler._private.aws import config as aws_config
    from ray.autoscaler._private.aws import utils as aws_utils

    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("HOME", str(home))
    with s3_server() as server:
        for fn in (aws_utils.resource_cache, aws_utils.client_cache,
                   aws_config._get_subnets_or_die):
            fn.cache_clear()
        ec2 = boto3.client("ec2", region_name="us-east-1")
        # the usual layout: a public subnet (internet gateway) for the head, a private one
        # behind a NAT gateway for the GPU nodes, one AZ
        vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]

        def subnet_in(cidr: str, az: str = "us-east-1b") -> str:
            return ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=az)[
                "Subnet"]["SubnetId"]

        public, private = subnet_in("10.20.0.0/24"), subnet_in("10.20.16.0/20")
        subnet_in("10.20.32.0/20", "us-east-1c")  # another AZ the nodes must NOT spread into
        igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
        ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
        nat = ec2.create_nat_gateway(SubnetId=public, AllocationId=ec2.allocate_address(
            Domain="vpc")["AllocationId"])["NatGateway"]["NatGatewayId"]
        for sub, route in ((public, {"GatewayId": igw}), (private, {"NatGatewayId": nat})):
            table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
            ec2.create_route(RouteTableId=table, DestinationCidrBlock="0.0.0.0/0", **route)
            ec2.associate_route_table(RouteTableId=table, SubnetId=sub)
        yield {"server": server, "ec2": ec2, "iam": boto3.client("iam", region_name="us-east-1"),
               "vpc": vpc, "subnet": private, "head_subnet": public}
        for fn in (aws_utils.resource_cache, aws_utils.client_cache,
                   aws_config._get_subnets_or_die):
            fn.cache_clear()
    mp.undo()


def ensure(aws, gpu: str, head_subnet: str | None = "public"):
    from cluster.aws import ensure

    res, notes = ensure(f"trmgpt-aws-{gpu}", "us-east-1", aws["subnet"], CIDR, STORAGE,
                        placement_group=False,
                        head_subnet=aws["head_subnet"] if head_subnet else None)
    return res, notes


def rendered(aws, gpu: str, nodes: int = 2) -> dict:
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    cfg = render("aws", gpu, nodes, STORAGE, image=IMAGE, subnet=aws["subnet"],
                 aws=ensure(aws, gpu)[0], head_subnet=aws["head_subnet"])
    cfg = prepare_config(cfg)
    validate_config(cfg)
    return cfg


@pytest.mark.parametrize("gpu,itype,cards", [("a100", "p4d.24xlarge", 4),
                                              ("h100", "p5.48xlarge", 32)])
def test_rays_aws_bootstrap_passes_and_nodes_launch(aws, gpu, itype, cards):
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    res, notes = ensure(aws, gpu)
    assert res.vpc_id == aws["vpc"] and res.availability_zone == "us-east-1b"
    assert notes == []  # public head subnet, GPU subnet behind NAT
    assert ensure(aws, gpu) == (res, [])  # a second cluster-up finds the same resources

    out = bootstrap_aws(rendered(aws, gpu))
    gpu_type = f"gpu_{gpu}"
    head = out["available_node_types"]["head"]["node_config"]
    worker = out["available_node_types"][gpu_type]["node_config"]
    # one subnet (= one AZ) for every interface of every GPU node, the head in the public one;
    # our group everywhere
    assert set(worker["SubnetIds"]) == {aws["subnet"]}
    assert head["SubnetIds"] == [aws["head_subnet"]]
    assert set(worker["SecurityGroupIds"]) == set(head["SecurityGroupIds"]) == {
        res.security_group}
    # every network card carries one EFA interface, in AWS's card/device layout
    nics = worker["NetworkInterfaces"]
    assert sorted(n["NetworkCardIndex"] for n in nics) == list(range(cards))
    for n in nics:
        assert n["DeviceIndex"] == (0 if n["NetworkCardIndex"] == 0 else 1)
        assert n["InterfaceType"] in (("efa",) if n["NetworkCardIndex"] == 0
                                      else ("efa", "efa-only"))
    # profiles: the head's own (not Ray's default) and the workers' (Ray gives none)
    assert head["IamInstanceProfile"]["Arn"] == res.head_profile_arn
    assert worker["IamInstanceProfile"]["Arn"] == res.worker_profile_arn
    assert worker["Placement"] == {"GroupName": f"trmgpt-aws-{gpu}-pg"}
    assert out["provider"]["use_internal_ips"] and out["provider"]["use_external_head_ip"]

    # the security group Ray would use: all traffic from itself, SSH only from CIDR
    (sg,) = aws["ec2"].describe_security_groups(GroupIds=[res.security_group])[
        "SecurityGroups"]
    ingress = sg["IpPermissions"]
    assert any(p["IpProtocol"] == "-1" and p["UserIdGroupPairs"][0]["GroupId"] == sg["GroupId"]
               for p in ingress)
    cidrs = [r["CidrIp"] for p in ingress for r in p.get("IpRanges", [])]
    assert cidrs == [CIDR]

    # launch as Ray's autoscaler (workers) and `ray up` (head) would: RunInstances with every
    # interface, the profile, the placement, against the EC2 endpoint
    provider = AWSNodeProvider(out["provider"], out["cluster_name"])
    before = {i["InstanceId"] for r in aws["ec2"].describe_instances()["Reservations"]
              for i in r["Instances"]}
    provider.create_node(copy.deepcopy(worker), {"ray-node-type": "worker",
                                                 "ray-user-node-type": gpu_type}, 1)
    provider.create_node(copy.deepcopy(head), {"ray-node-type": "head",
                                               "ray-user-node-type": "head"}, 1)
    launched = [i for r in aws["ec2"].describe_instances()["Reservations"]
                for i in r["Instances"] if i["InstanceId"] not in before]
    by_type = {i["InstanceType"]: i for i in launched}
    assert set(by_type) == {itype, "m6i.2xlarge"}
    for i in launched:
        assert i["Placement"]["AvailabilityZone"] == "us-east-1b"
    assert by_type[itype]["SubnetId"] == aws["subnet"]
    assert by_type["m6i.2xlarge"]["SubnetId"] == aws["head_subnet"]
    assert by_type[itype]["IamInstanceProfile"]["Arn"] == res.worker_profile_arn
    assert by_type["m6i.2xlarge"]["IamInstanceProfile"]["Arn"] == res.head_profile_arn


def test_route_notes_say_what_a_single_public_subnet_means(aws):
    """One public subnet for everything: the GPU nodes (no public address) would have no way
    out; cluster-up says so."""
    from cluster.aws import ensure as ensure_

    _, notes = ensure_("trmgpt-aws-h100", "us-east-1", aws["head_subnet"], CIDR, STORAGE,
                       placement_group=False)
    assert len(notes) == 1 and "no route through a NAT gateway" in notes[0]
    _, notes = ensure_("trmgpt-aws-h100", "us-east-1", aws["subnet"], CIDR, STORAGE,
                       placement_group=False)
    assert len(notes) == 1 and "no route to an internet gateway" in notes[0]


def test_instance_profiles_grant_the_bucket_and_pass_role(aws):
    res, _ = ensure(aws, "h100")
    iam = aws["iam"]
    worker = json.loads(json.dumps(iam.get_role_policy(
        RoleName="trmgpt-aws-h100-worker", PolicyName="trmgpt-aws-h100-worker")[
        "PolicyDocument"]))
    actions = {a for s in worker["Statement"] for a in s["Action"]}
    resources = {s["Resource"] for s in worker["Statement"]}
    assert {"s3:PutObject", "s3:GetObject", "s3:ListBucket"} <= actions
    assert resources == {"arn:aws:s3:::trmgpt-ckpt", "arn:aws:s3:::trmgpt-ckpt/runs/*"}
    assert not any(a.startswith(("ec2:", "iam:")) for a in actions)  # workers launch nothing
    head = iam.get_role_policy(RoleName="trmgpt-aws-h100-head",
                               PolicyName="trmgpt-aws-h100-head")["PolicyDocument"]
    pass_role = [s for s in head["Statement"] if "iam:PassRole" in s["Action"]]
    worker_role = iam.get_role(RoleName="trmgpt-aws-h100-worker")["Role"]["Arn"]
    assert pass_role and pass_role[0]["Resource"] == [worker_role]
    profile = iam.get_instance_profile(InstanceProfileName="trmgpt-aws-h100-worker")
    assert profile["InstanceProfile"]["Arn"] == res.worker_profile_arn
    assert [r["RoleName"] for r in profile["InstanceProfile"]["Roles"]] == [
        "trmgpt-aws-h100-worker"]


@pytest.mark.parametrize("gpu", ["a100", "h100"])
def test_unrendered_yaml_is_refused_by_rays_bootstrap(aws, gpu):
    """The planted defect, i.e. the YAML as it shipped before: EFA interfaces without SubnetId
    (and Groups). Ray's bootstrap refuses it before touching EC2, and so does a render that
    loses the subnet of one interface."""
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.commands import prepare_config

    raw = prepare_config(yaml.safe_load(cluster_yaml("aws", gpu).read_text()))
    with pytest.raises(ValueError, match="missing a subnet"):
        bootstrap_aws(raw)
    cfg = rendered(aws, gpu)
    del cfg["available_node_types"][f"gpu_{gpu}"]["node_config"]["NetworkInterfaces"][-1][
        "SubnetId"]
    with pytest.raises(ValueError, match="missing a subnet"):
        bootstrap_aws(cfg)


def test_ensure_refuses_bad_input(aws):
    from cluster.aws import ensure

    for args, message in [
        (("subnet-nope", CIDR, STORAGE), "SUBNET must be"),
        ((aws["subnet"], "0.0.0.0/0", STORAGE), "SSH_CIDR must be"),
        ((aws["subnet"], CIDR, "gs://bucket/x"), "STORAGE=s3://"),
        (("subnet-0123456789abcdef0", CIDR, STORAGE), "not found"),
    ]:
        with pytest.raises(ValueError, match=message):
            ensure("trmgpt-aws-h100", "us-east-1", *args, placement_group=False)
    other = aws["ec2"].create_vpc(CidrBlock="10.30.0.0/16")["Vpc"]["VpcId"]
    elsewhere = aws["ec2"].create_subnet(VpcId=other, CidrBlock="10.30.0.0/24")["Subnet"][
        "SubnetId"]
    with pytest.raises(ValueError, match="different VPCs"):
        ensure("trmgpt-aws-h100", "us-east-1", aws["subnet"], CIDR, STORAGE,
               placement_group=False, head_subnet=elsewhere)
