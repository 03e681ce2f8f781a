"""ray_cluster.yaml against the schema inside the installed Ray wheel, plus the
security points: only SSH open to the world, services on loopback, no credentials."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
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


def test_only_ssh_is_open_to_the_world_and_no_rule_is_sent_twice():
    """The rules Ray sends in its one authorize_ingress call, built by Ray's own code from
    this file: AWS refuses the whole call if two are the same."""
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    extra = load()["provider"].get("security_group", {}).get("IpPermissions", [])
    rules = _create_default_inbound_rules({"sg-head", "sg-workers"}, extra)
    world = [r for r in rules if any(x.get("CidrIp") == "0.0.0.0/0" for x in r.get("IpRanges", []))]
    assert [(r["FromPort"], r["ToPort"]) for r in world] == [(22, 22)]
    assert len({json.dumps(r, sort_keys=True) for r in rules}) == len(rules), rules


def test_dashboard_and_mlflow_listen_on_loopback():
    commands = " ".join(load()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in commands
    mlflow = [c for c in load()["head_start_ray_commands"] if "cluster.tracking_server" in c]
    assert mlflow and all("--host 127.0.0.1" in c for c in mlflow)
    # the store is an external PostgreSQL and the artifacts are in the bucket: nothing on the head's disk
    assert all('--backend-store-uri "$MLFLOW_BACKEND_STORE_URI"' in c and "sqlite" not in c for c in mlflow)
    assert all('--artifacts-destination "s3://$VGG_BUCKET/mlflow"' in c and "--password-secret " in c for c in mlflow)
    assert "0.0.0.0" not in commands


def test_no_credentials_in_the_file():
    """Names of secret files and of the token mode, never a secret's value."""
    text = json.dumps(load())  # every key and value, no comments
    for allowed in ("--password-secret", "auth_token", "RAY_AUTH_MODE=token"):
        text = text.replace(allowed, "")
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)  # AWS access key ids
    for word in ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "password", "token"):
        assert word not in text, word
    assert all(t["node_config"].get("IamInstanceProfile") for t in load()["available_node_types"].values())


def test_head_and_workers_have_their_own_instance_profiles():
    """Given a head profile, Ray creates no role of its own: the head's must launch
    instances (and pass the workers' role), the workers' needs only the bucket."""
    c = load()
    types = c["available_node_types"]
    head = types[c["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    workers = {t["node_config"]["IamInstanceProfile"]["Name"] for k, t in types.items() if k != c["head_node_type"]}
    assert head not in workers and len(workers) == 1


def test_images_are_ubuntu_24_04_with_a_cuda_13_driver_on_gpu_nodes():
    """`latest_dlami` is Ray's DLAMI V71 (Ubuntu 18.04, CUDA 11.2). EC2 resolves
    `resolve:ssm:NAME` at launch from the public parameters AWS and Canonical keep
    current: the DLAMI Base OSS Nvidia Driver GPU AMI (driver 595, CUDA 13, NVMe at
    /opt/dlami/nvme; AWS's release notes) on GPU nodes, Ubuntu 24.04 elsewhere."""
    from ray.autoscaler._private.aws.config import DEFAULT_AMI_NAME

    assert "18.04" in DEFAULT_AMI_NAME  # what latest_dlami would have given
    c = load()
    images = {k: t["node_config"]["ImageId"] for k, t in c["available_node_types"].items()}
    for gpu in ("gpu_worker", "gpu_spot_worker"):
        assert images[gpu] == ("resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
                               "base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id")
    for name, image in images.items():
        if name not in ("gpu_worker", "gpu_spot_worker"):
            assert image == "resolve:ssm:/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
    assert "/mnt/nvme" not in CONFIG.read_text() and "/opt/dlami/nvme" in " ".join(c["worker_setup_commands"])


def _setting_check(config: dict) -> str:
    [check] = [c for c in config["setup_commands"] if "cluster.env" in c and "for v in" in c]
    return check


def test_settings_reach_every_node_and_a_missing_one_stops_ray_up(tmp_path):
    """~/.vgg/cluster.env and the Ray token go to every node; ~/.bashrc exports the
    settings to every later command (and through `ray start` to every Ray process and
    job); the setup check, run here in bash as Ray runs it, fails naming what is missing."""
    import subprocess

    c = load()
    assert c["file_mounts"]["/home/ubuntu/.vgg/cluster.env"] == "~/.vgg/cluster.env"
    assert c["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert any(". ~/.vgg/cluster.env" in cmd and ">> ~/.bashrc" in cmd and "RAY_AUTH_MODE=token" in cmd
               for cmd in c["setup_commands"])
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("RAY_AUTH_MODE=token ray start" in cmd for cmd in c[key]), key
    check = _setting_check(c)
    (tmp_path / ".vgg").mkdir()
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for missing in ("VGG_BUCKET", "MLFLOW_BACKEND_STORE_URI"):
        settings = {"VGG_BUCKET": "b", "MLFLOW_BACKEND_STORE_URI": "postgresql://u@h:5432/d"}
        del settings[missing]
        (tmp_path / ".vgg" / "cluster.env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        out = subprocess.run(["bash", "-c", check], env=env, capture_output=True, text=True)
        assert out.returncode != 0 and f"{missing} is not set in ~/.vgg/cluster.env" in out.stderr, out
    (tmp_path / ".vgg" / "cluster.env").write_text("VGG_BUCKET=b\nMLFLOW_BACKEND_STORE_URI=postgresql://u@h/d\n")
    assert subprocess.run(["bash", "-c", check], env=env).returncode == 0
    (tmp_path / ".ray" / "auth_token").unlink()
    assert subprocess.run(["bash", "-c", check], env=env).returncode != 0  # no token, no cluster


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "cluster" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_every_node_and_the_image_install_pinned_versions():
    """cluster/constraints.txt pins every dependency in pyproject.toml, at the versions
    installed here (torch aside: the nodes take the CUDA 13 build); every pip install on
    a node and in the image goes through it."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement

    pins = _pins()
    for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(dep)
        assert req.name.lower() in pins, f"{req.name} is not pinned in cluster/constraints.txt"
        assert req.specifier.contains(pins[req.name.lower()]), (req, pins[req.name.lower()])
    for name, version in pins.items():
        if name != "torch":
            assert importlib.metadata.version(name) == version, name
    installs = [c for c in _commands(load()) if "pip install" in c]
    assert installs and all("-c ~/vgg-pipeline/cluster/constraints.txt" in c for c in installs), installs
    dockerfile = (REPO / "Dockerfile").read_text()
    runs = [r for r in re.findall(r"^RUN (.+?)(?<!\\)$", dockerfile, re.M | re.S) if "pip install" in r]
    assert runs and all("-c cluster/constraints.txt" in r for r in runs if "--no-deps" not in r), runs


def test_shared_storage_and_shards_in_every_documented_run():
    """Every documented submit, RayJob and scheduled retrain checkpoints to the bucket (a
    path on one node is not multi-node storage) and names the shards each node has."""
    readme = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    submits = re.findall(r"python -m cluster\.submit(?:[^\n]*\\\n)*[^\n]*", readme)
    cluster_submits = [s for s in submits if "paper.yaml" in s]
    assert cluster_submits and all("storage=s3://" in s and "data.root=" in s for s in cluster_submits)
    assert "/mnt/nvme" not in readme and "/mnt/checkpoints" not in readme
    schedule = REPO / "cluster" / "schedule"
    for text in [(schedule / "crontab.example").read_text(), (schedule / "vgg-retrain.service").read_text()]:
        line = [x for x in text.splitlines() if "cluster.retrain" in x and not x.startswith("#")][0]
        assert "--set data.root=" in line and "--set storage=s3://" in line, line
    job = _k8s("rayjob.yaml")["spec"]["entrypoint"]
    cron = _k8s("retrain-cronjob.yaml")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert "--set storage=$VGG_STORAGE" in job and "storage=$(VGG_STORAGE)" in cron["command"]
    settings = {d["kind"]: d for d in yaml.safe_load_all((REPO / "cluster" / "k8s" / "settings.yaml").read_text())}
    assert settings["ConfigMap"]["data"]["VGG_STORAGE"].startswith("s3://")


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
    # a key named like a secret with a literal value (a path ~/..., /..., or $VAR is a reference, not a secret)
    secret = re.compile(r"(AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET|(password|token)\s*[:=]\s*(?![~/$\s]))", re.I)
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


def _commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in config.get(k) or []]


def test_no_command_can_kill_itself():
    """Ray runs each command as `bash -c '<command>'`, so a `pkill -f PATTERN` whose
    pattern occurs in its own command kills that shell (and whatever it was about to
    start). The tracking server is restarted through its pid file instead, and started
    detached so that a server that does not come up fails `ray up`."""
    for command in _commands(load()):
        for pattern in re.findall(r"pkill\s+(?:-\w+\s+)*[\"']?([^\"'\s)]+)", command):
            assert not re.search(pattern, command.replace(f"pkill -f {pattern}", "", 1)) and \
                not re.search(pattern, f"bash -c '{command}'"), command
    mlflow = [c for c in load()["head_start_ray_commands"] if "cluster.tracking_server" in c]
    assert mlflow and all("--pid-file ~/mlflow/server.pid" in c and "--detach " in c for c in mlflow)
    assert not any(c.rstrip().endswith("&") for c in mlflow)  # its exit status reaches ray up


def test_kuberay_auth_probes_volumes_requests_and_one_pinned_image():
    """What the reading of cluster/k8s/ found, each checked: token authentication on the
    RayCluster, with the CronJob holding the same Secret; MLflow in a container of its own
    with probes (a postStart hook is never restarted); the shards volume that the head and
    the CronJob mount from different nodes is ReadWriteMany; the CronJob asks for the CPUs
    its champion re-evaluation uses; one image, pinned to the project's version."""
    import tomllib

    cluster, cron = _k8s("raycluster.yaml"), _k8s("retrain-cronjob.yaml")
    settings = {d["kind"]: d for d in yaml.safe_load_all((REPO / "cluster" / "k8s" / "settings.yaml").read_text())}
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}

    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    [mlflow] = [c for c in head["containers"] if "cluster.tracking_server" in " ".join(c.get("command", []))]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert mlflow[probe]["httpGet"] == {"path": "/health", "port": 5000}, probe
    assert not any("lifecycle" in c for c in head["containers"])

    claim = settings["PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "imagenet-shards"
    assert set(claim["spec"]["accessModes"]) & {"ReadWriteMany", "ReadOnlyMany"}
    for spec in (head, pod):
        assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "imagenet-shards" for v in spec["volumes"])

    requests = pod["containers"][0]["resources"]["requests"]
    assert float(requests["cpu"]) >= 1 and requests["memory"].endswith("Gi")

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = set()
    for path in (REPO / "cluster" / "k8s").glob("*.yaml"):
        images |= set(re.findall(r"image: (\S+)", path.read_text()))
    assert images == {f"ghcr.io/your-org/vgg-pipeline:{version}"}, images
    # the MLflow container's network policy lets in the CronJob's pods by the label they carry
    labels = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    allowed = [rule for rule in settings["NetworkPolicy"]["spec"]["ingress"]
               if {"port": 5000} in rule.get("ports", [])]
    assert any(src["podSelector"].get("matchLabels") == labels for rule in allowed for src in rule["from"])


def test_submit_and_retrain_refuse_storage_on_one_machine():
    """paper.yaml's own storage is a local path: without shared storage a multi-node run
    would checkpoint to each node's own disk. Both tools refuse it, naming the key and
    the fix, before contacting anything."""
    import subprocess
    import sys

    for module in ("cluster.submit", "cluster.retrain"):
        out = subprocess.run([sys.executable, "-m", module, "--plan", "pipeline/plans/paper.yaml", "--address",
                              "http://127.0.0.1:9"], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={"PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
        assert out.returncode == 2, out.stdout + out.stderr
        assert "plan error: plan storage '/mnt/checkpoints' is a path on one machine" in out.stderr, out.stderr
        assert "--set storage=s3://$VGG_BUCKET/checkpoints" in out.stderr


def test_the_database_password_is_in_no_file_on_any_node(monkeypatch):
    """file_mounts go to every node: the password is not among them. The head's server
    reads it from AWS Secrets Manager with the head's own profile (here: moto's server),
    and a secret that cannot be read is named in the error."""
    from services import s3_server

    from cluster.tracking_server import read_secret

    c = load()
    assert not any("secret" in k or "secret" in str(v) for k, v in c["file_mounts"].items())
    [line] = [x for x in c["head_start_ray_commands"] if "cluster.tracking_server" in x]
    name = re.search(r"--password-secret (\S+)", line).group(1)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with s3_server():
        import boto3

        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        try:
            read_secret(name)
        except RuntimeError as exc:  # no region anywhere: said, not a botocore traceback
            assert "no AWS region" in str(exc)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        boto3.client("secretsmanager").create_secret(Name=name, SecretString="s3cr3t-value\n")
        assert read_secret(name) == "s3cr3t-value"
        try:
            read_secret("no/such-secret")
        except RuntimeError as exc:
            assert "'no/such-secret'" in str(exc)
        else:
            raise AssertionError("a missing secret was read")


def test_spot_gpu_workers_drain_on_the_interruption_notice():
    """The spot type is the on-demand GPU node on spot capacity, with its own setup: the
    GPU nodes' shard staging and the watcher that turns EC2's notice into a Ray drain
    with the notice's deadline; the head stays on demand."""
    import sys

    c = load()
    types = c["available_node_types"]
    spot, gpu = types["gpu_spot_worker"], types["gpu_worker"]
    assert spot["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert spot["node_config"]["InstanceType"] == gpu["node_config"]["InstanceType"]
    assert "InstanceMarketOptions" not in types[c["head_node_type"]]["node_config"]
    setup = " ".join(spot["worker_setup_commands"])
    assert "--stage-in" in setup and "cluster/spot_notice.py" in setup
    sys.path.insert(0, str(CONFIG.parent / "cluster"))
    from spot_notice import deadline_seconds

    notice = {"action": "terminate", "time": "2026-12-02T13:20:00Z"}
    assert deadline_seconds(notice, 1796217480.0) == 120  # 13:18:00 UTC: two minutes left
    assert deadline_seconds(notice, 1796217700.0) == 1


def test_make_install_hands_pips_package_sources_to_uv_and_a_gpu_torch_index_to_torch_only(tmp_path):
    """uv reads no pip.conf: the Makefile passes pip's find-links on (a space-separated
    list for pip, comma-separated for uv), from PIP_FIND_LINKS or else pip's config; a
    user's own UV_FIND_LINKS wins; TORCH_INDEX reaches the torch step and no other."""
    import os
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make")
    show = ["make", "-s", "--no-print-directory", "--eval", 'show: ; @echo "[$$UV_FIND_LINKS]"', "show"]
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}

    def links(**env) -> str:
        return subprocess.run(show, cwd=REPO, env=dict(base, **env), capture_output=True, text=True,
                              check=True).stdout.strip()

    assert links(PIP_FIND_LINKS="/a /b") == "[/a,/b]"
    assert links(PIP_FIND_LINKS="/a", UV_FIND_LINKS="/u") == "[/u]"
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nfind-links = /from/conf\n")
    assert links(PIP_CONFIG_FILE=str(conf)) == "[/from/conf]"
    assert links(PIP_CONFIG_FILE=os.devnull) == "[]"

    dry = subprocess.run(["make", "-n", "-W", "pyproject.toml", ".venv/.installed",
                          "TORCH_INDEX=https://example.invalid/whl/cu130"], cwd=REPO, env=base,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    indexed = [line for line in dry if "--index-url" in line]
    assert len(indexed) == 1 and '"torch==' in indexed[0] and "https://example.invalid/whl/cu130" in indexed[0], dry
