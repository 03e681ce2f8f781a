"""`ray up` for real, on this machine: Ray's `local` provider over SSH to two nodes made
by tests/sshnode.py (namespaces: own address, processes, /tmp; one home path), driving
ray_cluster.yaml's own command lists, unchanged: its setup, head setup (the verified
shard stage-in from the bucket, here moto's S3) and head start commands (`ray start
--head` with token authentication, the tracking server with its password from Secrets
Manager and its artifacts in the bucket). Then, as docs/cluster.md has users do: the
dashboard tunnel (`ray dashboard`), the MLflow tunnel (`ssh -N -L`), a plan submitted
with `cluster.submit` through the one, its runs read back through the other, and `ray
down`. The head's autoscaler meanwhile launches the worker node (the provider's
`worker_ips`) over SSH with the worker setup and start commands, and it joins.

What differs from AWS is only what a cluster definition gets from its cloud: the provider
(`local`: a head and a worker address; one node type, Ray's on-premise one) and auth
(root, a throwaway key), the settings file (this test's bucket and moto's endpoint; a
SQLite tracking store on the head instead of PostgreSQL), and the nodes' image: a venv
with the pinned packages already installed, and torch pinned to this machine's CPU build
(the nodes' CUDA 13 build cannot be fetched here)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import sshnode
import yaml
from services import RAY, free_port, s3_server, wait_for

REPO = Path(__file__).resolve().parent.parent
COMMANDS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")

MISSING = sshnode.missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=f"cannot make SSH nodes: {MISSING}")]


def local_config(name: str, key: Path, head: str, workers: list[str], home: Path, mounts: dict[str, Path]) -> dict:
    """ray_cluster.yaml as a `local` provider cluster: its command lists and rsync
    excludes as they are; its file mounts to the same places under the nodes' home, from
    this test's files; provider and auth for the nodes at `head` and `workers`."""
    aws = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    config = {k: aws[k] for k in (*COMMANDS, "rsync_exclude")}
    files = {target.replace("/home/ubuntu", str(home)): str(mounts[source])
             for target, source in aws["file_mounts"].items()}
    config.update(cluster_name=name, max_workers=len(workers), file_mounts=files,
                  provider={"type": "local", "head_ip": head, "worker_ips": workers},
                  auth={"ssh_user": "root", "ssh_private_key": str(key)})
    return config


def _wait_port(host: str, port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        assert proc.poll() is None and time.monotonic() < deadline, f"{what} did not open port {port}"
        time.sleep(0.2)


def _run(args: list[str], env: dict, timeout: int = 600) -> str:
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert out.returncode == 0, f"{' '.join(args[:4])} failed:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def _alive_nodes(port: int, token: str) -> list[str]:
    """The addresses of the cluster's live nodes, from Ray's state API on the dashboard
    (one HTTP request: a `ray exec` with a driver on the head costs seconds of CPU). A
    refused token fails here and now, not as a join that never comes."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v0/nodes",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            nodes = json.load(r)["data"]["result"]["result"]
    except urllib.error.HTTPError as exc:
        assert exc.code not in (401, 403), f"the dashboard refused the cluster's token: {exc}"
        return []  # e.g. the state API's module still starting
    except (OSError, http.client.HTTPException, ValueError, KeyError):  # the tunnel or the dashboard still starting
        return []
    return sorted(n["node_ip"] for n in nodes if n["state"] == "ALIVE")


ALIVE = ("python -c 'import ray; ray.init(log_to_driver=False); "
         "print(\"alive:\", sorted(n[\"NodeManagerAddress\"] for n in ray.nodes() if n[\"Alive\"]))'")


def test_ray_up_submit_track_autoscale_and_down(tmp_path, shards):
    import boto3
    import torch

    key = sshnode.keypair(tmp_path)
    token = secrets.token_hex(16)
    (tmp_path / "auth_token").write_text(token)
    # the nodes' image has this machine's CPU torch: the same pins otherwise
    pins = (REPO / "cluster" / "constraints.txt").read_text()
    (tmp_path / "constraints.txt").write_text(re.sub(r"(?m)^torch==\S+", f"torch=={torch.__version__}", pins))

    with contextlib.ExitStack() as stack:
        net = stack.enter_context(sshnode.network())
        home = net["home"]
        s3 = stack.enter_context(s3_server("vgg-up", host=net["gateway"]))  # where the nodes reach it
        head, worker = (stack.enter_context(sshnode.ssh_node(net, i, key, tmp_path / f"sshd{i}.log"))
                        for i in range(2))
        for node in (head, worker):
            sshnode.node_venv(node["home"], home)
        for f in sorted(shards.rglob("*")):
            if f.is_file():
                boto3.client("s3").upload_file(str(f), "vgg-up", f"shards/{f.relative_to(shards)}")
        boto3.client("secretsmanager", region_name="us-east-1").create_secret(
            Name="vgg-pipeline/mlflow-db", SecretString="unused-by-sqlite")
        settings = {"VGG_BUCKET": "vgg-up", "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{home}/mlflow/mlflow.db",
                    **s3["env"], "AWS_DEFAULT_REGION": "us-east-1",
                    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}  # as every test's Ray (conftest.py)
        (tmp_path / "cluster.env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
        config = local_config(f"vgg-up-{os.getpid()}", key, head["ip"], [worker["ip"]], home,
                              {".": REPO, "~/.vgg/cluster.env": tmp_path / "cluster.env",
                               "~/.ray/auth_token": tmp_path / "auth_token"})
        config["file_mounts"][f"{home}/vgg-pipeline/cluster/constraints.txt"] = str(tmp_path / "constraints.txt")
        cfg = tmp_path / "cluster.yaml"
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_", "AWS_"))}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        # Ray 2.60's `ray up` starts autoscaler v2 unless told otherwise, and v2 does not
        # manage the local provider's nodes (seen here: the head's monitor.log says "cloud
        # instance <head> no longer found", then "Adding 1 node(s)" every 5 s and launches
        # nothing). v1, the local provider's own, launches the worker; on AWS v2 runs.
        env["RAY_UP_enable_autoscaler_v2"] = "0"
        ssh = ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        tunnels = []
        t0 = time.monotonic()
        try:
            up = _run([RAY, "up", "-y", "--no-config-cache", str(cfg)], env)
            assert f"staged s3://vgg-up/shards into {home}/shards" in up, up[-3000:]  # the head's verified stage-in
            print(f"ray up: {time.monotonic() - t0:.0f} s", flush=True)
            dash, mlflow = free_port(), free_port()
            tunnels.append(subprocess.Popen([RAY, "dashboard", "--no-config-cache", "-p", str(dash), str(cfg)],
                                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            tunnels.append(subprocess.Popen([*ssh, "-N", "-L", f"{mlflow}:127.0.0.1:5000", f"root@{head['ip']}"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            _wait_port("127.0.0.1", dash, tunnels[0], "ray dashboard")
            _wait_port("127.0.0.1", mlflow, tunnels[1], "the MLflow tunnel")
            with urllib.request.urlopen(f"http://127.0.0.1:{mlflow}/health", timeout=30) as r:
                assert r.status == 200  # the head's tracking server, on its loopback only
            with pytest.raises(OSError):
                socket.create_connection((head["ip"], 5000), timeout=5).close()

            # the worker: launched by the head's autoscaler, set up by the same commands, joined.
            # Watched through the dashboard tunnel (Ray's state API, the cluster's token); then
            # a driver on the head, run by `ray exec` as a user would, sees it alive too.
            wait_for(lambda: worker["ip"] in _alive_nodes(dash, token), 600, "the worker node to join", slowest=2)
            out = _run([RAY, "exec", "--no-config-cache", str(cfg), ALIVE], env)
            alive = [line for line in out.splitlines() if line.startswith("alive: [")]
            assert alive and repr(worker["ip"]) in alive[-1], out[-3000:]
            print(f"worker joined: {time.monotonic() - t0:.0f} s: {alive[-1]}", flush=True)
            assert (worker["home"] / "venv" / "lib").is_dir() and (worker["home"] / ".ray" / "auth_token").is_file()
            assert not (worker["home"] / "shards").exists()  # no GPU: the GPU nodes' stage-in is not for it
            # ... so its shards come the way docs/cluster.md gives for a node without its set
            # (training there would stop, naming the folder): the same stage-in, over SSH
            stage = ("bash --login -c 'set -a; . ~/.vgg/cluster.env; ~/venv/bin/python "
                     "~/vgg-pipeline/data_prep/shard.py --stage-in s3://$VGG_BUCKET/shards --to ~/shards'")
            staged = _run([*ssh, f"root@{worker['ip']}", stage], env)
            assert f"staged s3://vgg-up/shards into {home}/shards" in staged, staged

            # the user's machine: the cluster's token, its own AWS access to the bucket (the
            # submit's preflight writes to the storage), and the address the job logs to
            client = dict(env, **s3["env"], RAY_AUTH_TOKEN=token, MLFLOW_TRACKING_URI="http://127.0.0.1:5000")
            submitted = _run([sys.executable, "-m", "cluster.submit", "--plan", "pipeline/plans/demo.yaml",
                              "--set", f"data.root={home}/shards", "--set", "storage=s3://vgg-up/checkpoints",
                              "--set", "recipe.epochs=1", "--set", "stages.B.recipe.epochs=1",
                              "--set", "resources.num_workers=2", "--set", "resources.max_failures=0",
                              "--address", f"http://127.0.0.1:{dash}", "--wait"], client)
            print(f"job done: {time.monotonic() - t0:.0f} s", flush=True)
            assert "SUCCEEDED" in submitted, submitted[-3000:]

            from mlflow.tracking import MlflowClient

            tracked = MlflowClient(f"http://127.0.0.1:{mlflow}")
            exp = tracked.get_experiment_by_name("vgg-demo")
            runs = tracked.search_runs([exp.experiment_id], "tags.kind = 'stage'")
            assert sorted((r.data.tags.get("stage"), r.info.status) for r in runs) == [
                ("A", "FINISHED"), ("B", "FINISHED")], [(r.data.tags, r.info.status) for r in runs]
            stored = boto3.client("s3").list_objects_v2(Bucket="vgg-up", Prefix="checkpoints/")
            assert stored.get("KeyCount", 0) > 0  # checkpoints in the bucket, not on a node's disk
            print("\n".join(line for line in submitted.splitlines() if "world_rank=" in line))
        finally:
            for t in tunnels:
                t.terminate()
                t.wait(timeout=30)
            down = subprocess.run([RAY, "down", "-y", str(cfg)], env=env, capture_output=True, text=True,
                                  timeout=300, cwd=REPO)
            print(f"ray down: rc {down.returncode}", down.stdout[-2000:], down.stderr[-2000:])
            from ray._common.utils import get_default_ray_temp_dir

            for suffix in ("state", "lock"):  # the local provider's record of the nodes, on this side
                Path(get_default_ray_temp_dir(), f"cluster-{config['cluster_name']}.{suffix}").unlink(missing_ok=True)
        assert down.returncode == 0, down.stderr[-3000:]
        # `ray down` stopped Ray on the head. (The local provider's "terminate" only marks
        # a worker as free: its raylet lives on until it gives up on the head's GCS; on AWS
        # the instance is gone. Leaving this block ends the nodes.)
        left = [p for p in sshnode.processes_in(head["pid"]) if re.search(r"raylet|gcs_server|ray::", p)]
        assert not left, left
