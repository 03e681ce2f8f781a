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
    mlflow = [c for c in load()["head_start_ray_commands"] if "cluster.tracking_server" in c]
    assert mlflow and all("--host 127.0.0.1" in c for c in mlflow)
    # the store is an external PostgreSQL and the artifacts are in the bucket: nothing on the head's disk
    assert all("--backend-store-uri \"${MLFLOW_BACKEND_STORE_URI" in c and "sqlite" not in c for c in mlflow)
    assert all("--artifacts-destination \"s3://" in c and "--password-file" in c for c in mlflow)
    assert "0.0.0.0" not in commands


def test_no_credentials_in_the_file():
    text = CONFIG.read_text().replace("--password-file", "")  # the flag that names a secret's file, not a secret
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # AWS access key ids
    for word in ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "password", "token"):
        assert word not in text
    assert all(t["node_config"].get("IamInstanceProfile") for t in load()["available_node_types"].values())


def _k8s(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / "k8s" / name).read_text())


def test_kuberay_manifests_fit_together():
    cluster, job, cron = _k8s("raycluster.yaml"), _k8s("rayjob.yaml"), _k8s("retrain-cronjob.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert (cron["apiVersion"], cron["kind"]) == ("batch/v1", "CronJob")
    name = cluster["metadata"]["name"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == name
    assert job["spec"]["entrypoint"].startswith("python -m pipeline train --plan pipeline/plans/")
    gpu = cluster["spec"]["workerGroupSpecs"][0]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    # the head's Service is cluster-internal; the CronJob reaches it by that Service's name
    assert cluster["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    args = spec["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert args[:3] == ["python", "-m", "cluster.retrain"]
    assert f"http://{name}-head-svc:8265" in args
    # every plan an entrypoint names exists in the repository
    for plan in [a for a in args if a.endswith(".yaml")] + [job["spec"]["entrypoint"].split("--plan ")[1].split()[0]]:
        assert (REPO / plan).is_file(), plan


def test_no_credentials_in_cluster_files():
    secret = re.compile(r"(AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET|password\s*[:=]|token\s*[:=])", re.I)
    for path in [CONFIG, *(REPO / "cluster").rglob("*.yaml"), *(REPO / "cluster" / "schedule").iterdir()]:
        assert not secret.search(path.read_text().replace("--password-file", "")), path


def test_submit_and_retrain_refuse_a_bad_plan_before_contacting_anything(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "plan.yaml"
    bad.write_text((REPO / "pipeline" / "plans" / "demo.yaml").read_text().replace("epochs:", "epoch:", 1))
    for module in ("cluster.submit", "cluster.retrain"):
        # port 9 (discard): were either to contact a cluster, it would fail differently
        out = subprocess.run([sys.executable, "-m", module, "--plan", str(bad), "--address", "http://127.0.0.1:9"],
                             cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
        assert out.returncode == 2, out.stdout + out.stderr
        assert "plan error: recipe.epoch: unknown key" in out.stderr, out.stderr
