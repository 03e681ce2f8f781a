"""ray_cluster.yaml through Ray's own AWS code, against moto's EC2 and IAM server on
loopback, as far as `ray up` goes before SSH: Ray's bootstrap (key pair, subnets, the
security group and the one authorize_ingress call with its rules, the instance
profiles, the AMI check), the instance types' resources Ray reads from EC2, and the
node provider launching a head and a GPU worker with them. moto answers as EC2 and IAM
do (it refuses a duplicate ingress rule, as AWS does); it does not resolve the images'
`resolve:ssm:` names, which EC2 does at launch."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from services import free_port

pytestmark = pytest.mark.slow  # a moto server and ~30 s of Ray's bootstrap on this machine
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def aws(tmp_path, monkeypatch):
    """moto_server on a free loopback port; boto3 (Ray's too) pointed at it, with dummy
    keys and a home of its own (Ray writes the new key pair's .pem under ~/.ssh)."""
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    (tmp_path / ".ssh").mkdir()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _instance_profiles(names):
    """What the README asks of the user before `ray up`: the two instance profiles."""
    import json

    import boto3

    iam = boto3.client("iam")
    trust = {"Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                            "Action": "sts:AssumeRole"}]}
    for name in names:
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))
        iam.create_instance_profile(InstanceProfileName=name)
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)


def test_ray_bootstraps_and_launches_the_cluster_on_moto(aws):
    import boto3
    from botocore.exceptions import ClientError
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.util import prepare_config
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    types = config["available_node_types"]
    _instance_profiles({t["node_config"]["IamInstanceProfile"]["Name"] for t in types.values()})

    # a copy with the SSH rule the file used to add: AWS (and moto) refuse Ray's one call
    broken = copy.deepcopy(config)
    broken["provider"]["security_group"] = {"GroupName": "vgg-duplicate-ssh", "IpPermissions": [
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}
    with pytest.raises(ClientError, match="InvalidPermission.Duplicate"):
        bootstrap_aws(prepare_config(broken))

    boot = bootstrap_aws(prepare_config(config))
    ec2 = boto3.client("ec2")
    [sg] = ec2.describe_security_groups(Filters=[{"Name": "group-name",
                                                  "Values": [config["provider"]["security_group"]["GroupName"]]}])[
        "SecurityGroups"]
    world = [p for p in sg["IpPermissions"] if any(r["CidrIp"] == "0.0.0.0/0" for r in p["IpRanges"])]
    assert [(p["FromPort"], p["ToPort"], p["IpProtocol"]) for p in world] == [(22, 22, "tcp")]
    assert any(pair["GroupId"] == sg["GroupId"] for p in sg["IpPermissions"] for pair in p["UserIdGroupPairs"])
    assert boot["head_node"] == {}  # Ray made no role of its own: the head's profile is the one given
    for name, node_type in boot["available_node_types"].items():
        node = node_type["node_config"]
        assert node["SecurityGroupIds"] == [sg["GroupId"]] and node["KeyName"] and node["SubnetIds"]
        assert node["ImageId"] == types[name]["node_config"]["ImageId"]  # not Ray's Ubuntu 18.04 DLAMI
    assert (Path(os.environ["HOME"]) / ".ssh" / f"{boot['available_node_types']['head']['node_config']['KeyName']}"
            ".pem").exists()

    # the resources Ray's autoscaler plans with, read from EC2's instance types
    filled = AWSNodeProvider.fillout_available_node_types_resources(boot)["available_node_types"]
    assert filled["gpu_worker"]["resources"]["GPU"] == 8 and filled["gpu_worker"]["resources"]["CPU"] == 192
    assert filled["gpu_worker"]["resources"]["accelerator_type:H100"] == 1
    assert filled["head"]["resources"]["CPU"] == 0  # the file's own figure wins: no training on the head
    assert filled["cpu_worker"]["resources"]["data_prep"] == 1 and filled["cpu_worker"]["resources"]["CPU"] == 64

    # the node provider launches a head and a GPU worker as `ray up` and the autoscaler would
    provider = AWSNodeProvider(boot["provider"], boot["cluster_name"])
    for kind, name in (("head", "head"), ("worker", "gpu_worker")):
        provider.create_node(boot["available_node_types"][name]["node_config"],
                             {TAG_RAY_NODE_KIND: kind, TAG_RAY_USER_NODE_TYPE: name}, 1)
    nodes = provider.non_terminated_nodes({TAG_RAY_CLUSTER_NAME: boot["cluster_name"]})
    assert len(nodes) == 2
    described = {i["InstanceId"]: i for r in ec2.describe_instances(InstanceIds=nodes)["Reservations"]
                 for i in r["Instances"]}
    by_type = {provider.node_tags(n)[TAG_RAY_USER_NODE_TYPE]: described[n] for n in nodes}
    for name, instance in by_type.items():
        node = types[name]["node_config"]
        assert instance["InstanceType"] == node["InstanceType"]
        assert instance["IamInstanceProfile"]["Arn"].endswith(f"instance-profile/{node['IamInstanceProfile']['Name']}")
        assert [g["GroupId"] for g in instance["SecurityGroups"]] == [sg["GroupId"]]
        assert instance["Placement"]["AvailabilityZone"] in config["provider"]["availability_zone"].split(",")
    provider.terminate_nodes(nodes)
