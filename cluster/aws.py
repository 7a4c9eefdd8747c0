"""What an AWS cluster needs before `ray up`, made once (get-or-create, like Ray's own bootstrap):

- a security group in the subnet's VPC that admits ALL traffic from itself (EFA's OS-bypass
  traffic and Ray's/NCCL's ports between nodes; AWS's EFA guide asks for all traffic in and out
  within the group) and SSH (22) from the user's CIDR only. Egress stays AWS's default (all out).
- a cluster placement group (EFA needs the nodes close, in one AZ; the subnet pins the AZ),
- two IAM roles with instance profiles: the head's (launch/terminate instances, pass the worker
  role, read/write the bucket) and the workers' (read/write the bucket prefix, nothing else).
  Ray gives its own default profile only to the head node, so without the worker profile every
  GPU node fails on the first checkpoint with "Unable to locate credentials".

Everything is named after the cluster (trmgpt-aws-h100-...), so a second `make cluster-up`
finds and reuses it. The calls go through boto3 (the `cloud` extra); tests point them at moto's
EC2/IAM server on 127.0.0.1 through AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

SUBNET_RE = re.compile(r"subnet-[0-9a-f]{8,17}")
CIDR_RE = re.compile(r"\d{1,3}(\.\d{1,3}){3}/\d{1,2}")

EC2_TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
    "Action": "sts:AssumeRole"}]}


@dataclass(frozen=True)
class AwsResources:
    vpc_id: str
    availability_zone: str
    security_group: str
    placement_group: str
    head_profile_arn: str
    worker_profile_arn: str


def bucket_of(storage: str) -> tuple[str, str]:
    """s3://bucket/prefix -> (bucket, prefix)."""
    if not storage.startswith("s3://") or len(storage) <= 5:
        raise ValueError(f"AWS needs STORAGE=s3://bucket/prefix, got {storage!r}")
    bucket, _, prefix = storage[5:].partition("/")
    return bucket, prefix.strip("/")


def bucket_policy(storage: str) -> dict:
    """Read/write on the run prefix of the bucket, list on the bucket: what the checkpointer,
    Ray's storage and the run folder need; nothing else in the account."""
    bucket, prefix = bucket_of(storage)
    objects = f"arn:aws:s3:::{bucket}/{prefix + '/' if prefix else ''}*"
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetBucketLocation"],
         "Resource": f"arn:aws:s3:::{bucket}"},
        {"Effect": "Allow", "Resource": objects,
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                    "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"]}]}


def head_policy(storage: str, worker_role_arn: str) -> dict:
    """The head runs Ray's autoscaler: it launches and terminates the GPU nodes (EC2), hands them
    the worker role (iam:PassRole on that role only: without it RunInstances with an instance
    profile is refused) and, as a Ray node, reads and writes the bucket too."""
    pol = bucket_policy(storage)
    pol["Statement"] += [
        {"Effect": "Allow", "Action": ["ec2:*"], "Resource": "*"},
        {"Effect": "Allow", "Action": ["iam:PassRole"],
         "Resource": [worker_role_arn]},
    ]
    return pol


def _session(region: str):
    import boto3  # the `cloud` extra; imported here so rendering needs no SDK

    return boto3.session.Session(region_name=region)


def _duplicate(e: Exception, code: str) -> bool:
    return getattr(e, "response", {}).get("Error", {}).get("Code") == code


def _ensure_security_group(ec2, name: str, vpc_id: str, ssh_cidr: str) -> str:
    found = ec2.describe_security_groups(Filters=[
        {"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "group-name", "Values": [name]}]
    )["SecurityGroups"]
    if found:
        sg = found[0]["GroupId"]
    else:
        sg = ec2.create_security_group(
            GroupName=name, VpcId=vpc_id,
            Description="trmgpt cluster: all traffic within the group (EFA, Ray, NCCL), "
                        "SSH from one CIDR")["GroupId"]
    rules = [
        {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]},
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
         "IpRanges": [{"CidrIp": ssh_cidr, "Description": "SSH for ray up / make dashboard"}]},
    ]
    for rule in rules:
        try:
            ec2.authorize_security_group_ingress(GroupId=sg, IpPermissions=[rule])
        except ec2.exceptions.ClientError as e:
            if not _duplicate(e, "InvalidPermission.Duplicate"):
                raise
    # EFA also needs all outbound traffic to the group itself; the default egress rule (all
    # traffic to 0.0.0.0/0) covers it. Someone who removed it gets the self rule back.
    try:
        ec2.authorize_security_group_egress(
            GroupId=sg, IpPermissions=[{"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": sg}]}])
    except ec2.exceptions.ClientError as e:
        if not _duplicate(e, "InvalidPermission.Duplicate"):
            raise
    return sg


def _ensure_placement_group(ec2, name: str) -> str:
    try:
        ec2.create_placement_group(GroupName=name, Strategy="cluster")
    except ec2.exceptions.ClientError as e:
        if not _duplicate(e, "InvalidPlacementGroup.Duplicate"):
            raise
    return name


def _ensure_role_and_profile(iam, name: str, policy: dict) -> tuple[str, str]:
    """(role arn, instance profile arn), the inline policy set to `policy` every time (so a
    changed bucket takes effect)."""
    try:
        role = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(EC2_TRUST),
                               Description="trmgpt cluster nodes")["Role"]
    except iam.exceptions.EntityAlreadyExistsException:
        role = iam.get_role(RoleName=name)["Role"]
    iam.put_role_policy(RoleName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
    try:
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except iam.exceptions.EntityAlreadyExistsException:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    if not any(r["RoleName"] == name for r in profile.get("Roles", [])):
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return role["Arn"], profile["Arn"]


def _default_route(ec2, subnet: dict) -> str:
    """Where the subnet's 0.0.0.0/0 goes: 'igw-...', 'nat-...', or '' (none)."""
    tables = ec2.describe_route_tables(Filters=[
        {"Name": "association.subnet-id", "Values": [subnet["SubnetId"]]}])["RouteTables"]
    if not tables:  # no explicit association: the VPC's main table
        tables = ec2.describe_route_tables(Filters=[
            {"Name": "vpc-id", "Values": [subnet["VpcId"]]},
            {"Name": "association.main", "Values": ["true"]}])["RouteTables"]
    for table in tables:
        for route in table.get("Routes", []):
            if route.get("DestinationCidrBlock") == "0.0.0.0/0":
                return route.get("GatewayId") or route.get("NatGatewayId") or ""
    return ""


def network_notes(ec2, head: dict, gpu: dict) -> list[str]:
    """What the subnets' routes mean for the nodes, in words (empty when all is well)."""
    notes = []
    if not _default_route(ec2, head).startswith("igw-"):
        notes.append(f"HEAD_SUBNET {head['SubnetId']} has no route to an internet gateway: "
                     "`ray up` and `make dashboard` reach the head on its public address, "
                     "so use a public subnet for it")
    if not _default_route(ec2, gpu).startswith("nat-"):
        notes.append(f"SUBNET {gpu['SubnetId']} has no route through a NAT gateway: the GPU "
                     "nodes get no public address (EC2 gives none to instances with several "
                     "network interfaces), so they reach the image registry, the bucket and "
                     "the Hugging Face hub only through VPC endpoints (S3 gateway; ECR api "
                     "and dkr) or a NAT gateway")
    return notes


def ensure(cluster_name: str, region: str, subnet: str, ssh_cidr: str, storage: str,
           placement_group: bool = True, head_subnet: str | None = None,
           ) -> tuple[AwsResources, list[str]]:
    """Get or create the security group, placement group and the two instance profiles; also
    return notes on the subnets' routes. `placement_group=False` names the group without
    creating it (the tests: moto implements no placement-group API). The GPU nodes share
    `subnet` (EFA does not cross subnets); the head may sit in a public `head_subnet` of the
    same VPC (the usual layout: GPU nodes private behind NAT, the head reachable by SSH)."""
    head_subnet = head_subnet or subnet
    for name, value in (("SUBNET", subnet), ("HEAD_SUBNET", head_subnet)):
        if not SUBNET_RE.fullmatch(value):
            raise ValueError(f"{name} must be an AWS subnet id subnet-..., got {value!r}")
    if not CIDR_RE.fullmatch(ssh_cidr) or ssh_cidr.endswith("/0"):
        raise ValueError(f"SSH_CIDR must be your network as a.b.c.d/n (not /0), got "
                         f"{ssh_cidr!r}")
    bucket_of(storage)
    session = _session(region)
    ec2 = session.client("ec2")
    iam = session.client("iam")
    subnets = {}
    for value in {subnet, head_subnet}:
        try:
            (subnets[value],) = ec2.describe_subnets(SubnetIds=[value])["Subnets"]
        except ec2.exceptions.ClientError as e:
            raise ValueError(f"subnet {value} not found in {region}: {e}") from None
    sub, head = subnets[subnet], subnets[head_subnet]
    if head["VpcId"] != sub["VpcId"]:
        raise ValueError(f"HEAD_SUBNET {head_subnet} and SUBNET {subnet} are in different "
                         "VPCs; the nodes must share one (and one security group)")
    sg = _ensure_security_group(ec2, f"{cluster_name}-nodes", sub["VpcId"], ssh_cidr)
    pg = f"{cluster_name}-pg"
    if placement_group:
        _ensure_placement_group(ec2, pg)
    worker_role, worker_profile = _ensure_role_and_profile(
        iam, f"{cluster_name}-worker", bucket_policy(storage))
    _, head_profile = _ensure_role_and_profile(
        iam, f"{cluster_name}-head", head_policy(storage, worker_role))
    res = AwsResources(sub["VpcId"], sub["AvailabilityZone"], sg, pg, head_profile,
                       worker_profile)
    return res, network_notes(ec2, head, sub)
