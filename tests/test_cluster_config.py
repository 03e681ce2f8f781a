"""ray_cluster.yaml against the schema inside the installed Ray wheel, plus the
security points: only SSH open to the world, services on loopback, no credentials."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import ray
import yaml

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "ray_cluster.yaml"


def load():
    return yaml.safe_load(CONFIG.read_text())


def test_validates_against_rays_own_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load()
    jsonschema.validate(config, schema)
    # and the same validator rejects a broken copy, so the check has teeth
    broken = dict(config, available_node_types={"head": {"node_config": {}}})  # no resources
    try:
        jsonschema.validate(broken, schema)
    except jsonschema.ValidationError:
        pass
    else:
        raise AssertionError("schema accepted a node type without resources")


def test_node_types_head_gpu_workers_and_data_prep():
    c = load()
    types = c["available_node_types"]
    assert c["head_node_type"] in types
    gpu = types["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith("p5.")  # 8 x H100
    assert types["cpu_worker"]["resources"].get("data_prep") == 1
    assert ".venv" in c["rsync_exclude"] and "data" in c["rsync_exclude"]


def test_only_ssh_is_open_to_the_world():
    perms = load()["provider"]["security_group"]["IpPermissions"]
    world = [p for p in perms if any(r.get("CidrIp") == "0.0.0.0/0" for r in p.get("IpRanges", []))]
    assert [(p["FromPort"], p["ToPort"]) for p in world] == [(22, 22)]


def test_dashboard_and_mlflow_listen_on_loopback():
    commands = " ".join(load()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in commands
    mlflow = [c for c in load()["head_start_ray_commands"] if "mlflow server" in c]
    assert mlflow and all("--host 127.0.0.1" in c for c in mlflow)
    assert "0.0.0.0" not in commands


def test_no_credentials_in_the_file():
    text = CONFIG.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # AWS access key ids
    for word in ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "password", "token"):
        assert word not in text
    assert all(t["node_config"].get("IamInstanceProfile") for t in load()["available_node_types"].values())
