"""Real Ray clusters on loopback started with `ray start`: two nodes of one CPU each,
with one training worker per node, so ranks, shard assignment and checkpoint storage
cross nodes; and a head node that takes the same plan through the Ray Jobs API
(`ray job submit`), as users submit it."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict) -> None:
    out = subprocess.run([RAY, *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, f"ray {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


def _kill_cluster(temp_dir: Path) -> None:
    """Stop only this cluster's processes (`ray stop` would stop every Ray on the machine)."""
    marker = str(temp_dir).encode()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if marker in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), sig)
            except (OSError, ProcessLookupError):
                pass
        time.sleep(1)


@contextlib.contextmanager
def ray_cluster_on_loopback(name: str, nodes: list[dict]):
    """`ray start --head` plus one `ray start --address` per further node, all on
    127.0.0.1, sharing one generated auth token (Ray 2.60 turns token authentication
    on). Each node gets its own temp dir, as on separate machines: nodes sharing one
    would share, and garbage-collect under each other, the unpacked job working_dir.
    The venv is on PATH, as for a user who activated it: job entrypoints run `python`."""
    # Short temp dirs: Ray's socket paths must stay under 107 characters.
    temp_dir = Path(f"/tmp/rt{os.getpid()}{name}-")
    dirs = [Path(f"{temp_dir}{i}") for i in range(len(nodes))]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    port, dash = free_port(), free_port()
    env = dict(os.environ, RAY_ADDRESS="", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        for i, (d, node) in enumerate(zip(dirs, nodes)):
            role = (["--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash)]
                    if i == 0 else ["--address", f"127.0.0.1:{port}"])
            _ray("start", *role, "--node-ip-address", "127.0.0.1", "--temp-dir", str(d),
                 "--num-cpus", str(node["cpus"]), "--resources", json.dumps(node["resources"]),
                 "--disable-usage-stats", env=env)
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        _kill_cluster(temp_dir)  # the marker is a prefix of every node's temp dir
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def two_nodes():
    with ray_cluster_on_loopback("two", [{"cpus": 1, "resources": {"head": 1}},
                                  {"cpus": 1, "resources": {"second": 1}}]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def head_only():
    with ray_cluster_on_loopback("head", [{"cpus": 2, "resources": {"head": 1}}]) as cluster:
        yield cluster


def write_plan(tmp_path: Path, shards: Path) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(textwrap.dedent(f"""
        name: twonode
        experiment: twonode-test
        data: {{root: {shards}, reader_threads: 1, shuffle_buffer: 64}}
        storage: {tmp_path / 'runs'}
        recipe:
          epochs: 2
          max_iterations: null
          batch_size: 16
          crop: 32
          width_mult: 0.125
          init: kaiming
          normalize_std: true
          optim: {{lr: 0.1}}
        resources: {{num_workers: 2, cpus_per_worker: 1, max_failures: 0}}
        stages:
          A: {{arch: A, scale: 36}}
    """))
    return path


def _stage_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'stage'")
    return client, runs


def test_one_worker_per_node_trains_and_checkpoints(tmp_path, shards, two_nodes, mlflow_uri):
    plan = write_plan(tmp_path, shards)
    env = dict(two_nodes["env"], MLFLOW_TRACKING_URI=mlflow_uri)
    out = subprocess.run([sys.executable, "-m", "pipeline", "train", "--plan", str(plan), "--address",
                          two_nodes["address"]], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, runs = _stage_run(mlflow_uri, "twonode-test")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert client.get_metric_history(runs[0].info.run_id, "val_images")[-1].value == 48  # once each, 2 ranks
    assert list((tmp_path / "runs").glob("twonode-*-A/checkpoint_*"))
    # the two workers ran on two different nodes
    nodes = subprocess.run([RAY, "list", "actors", "--address", two_nodes["address"], "--format", "json",
                            "--filter", "class_name=RayTrainWorker", "--detail", "--limit", "100"],
                           capture_output=True, text=True, env=two_nodes["env"])
    actors = json.loads(nodes.stdout or "[]")
    assert len({a["node_id"] for a in actors}) == 2, nodes.stdout[-2000:] + nodes.stderr[-2000:]


def test_ray_job_submit_runs_the_plan(tmp_path, shards, head_only, mlflow_uri):
    plan = write_plan(tmp_path, shards)
    runtime_env = {"excludes": [".venv", "data", "runs", "mlflow.db", ".git", "tests"],
                   "env_vars": {"MLFLOW_TRACKING_URI": mlflow_uri}}
    cmd = [RAY, "job", "submit", "--address", head_only["dashboard"], "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "pipeline", "train", "--plan", str(plan), "--run-name", "submitted"]
    for _ in range(60):  # the head's job agent may still be starting ("try again later")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=head_only["env"])
        if "No available agent to submit job" not in out.stderr:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout.lower()
    assert "| A " in out.stdout  # the results table reached the job's logs
    _, runs = _stage_run(mlflow_uri, "twonode-test")
    assert any(r.data.tags["plan_run"] == "submitted" and r.info.status == "FINISHED" for r in runs)
