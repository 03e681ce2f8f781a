"""A real Ray cluster on loopback started with `ray start`: two nodes of one CPU each. Its
head takes a plan through the Ray Jobs API (`ray job submit`, then cluster.submit), as
users submit it, and trains it with one worker per node, so ranks, shard assignment and
checkpoint storage cross nodes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import RAY, ray_cluster_on_loopback, tiny_plan

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def two_nodes():
    """One cluster for this file's tests (a cluster start and stop is 15-25 s here); the
    submitted job comes first, so the only Ray Train workers it lists are its own."""
    with ray_cluster_on_loopback("two", [{"cpus": 1, "resources": {"head": 1}},
                                  {"cpus": 1, "resources": {"second": 1}}]) as cluster:
        yield cluster


def write_plan(tmp_path: Path, shards: Path) -> Path:
    return tiny_plan(tmp_path, shards, name="twonode", experiment="twonode-test",
                     stages={"A": {"arch": "A", "scale": 36, "resources": {"num_workers": 2}}})


def _stage_run(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'stage'")
    return client, runs


def test_ray_job_submit_trains_one_worker_per_node_and_checkpoints(tmp_path, shards, two_nodes, mlflow_uri):
    """The plan as users submit it, its two workers on the two nodes. (A driver outside
    the cluster, `pipeline train --address`, is test_elastic's way in.)"""
    plan = write_plan(tmp_path, shards)
    runtime_env = {"excludes": [".venv", "data", "runs", "mlflow.db", ".git", "tests"],
                   "env_vars": {"MLFLOW_TRACKING_URI": mlflow_uri}}
    cmd = [RAY, "job", "submit", "--address", two_nodes["dashboard"], "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "pipeline", "train", "--plan", str(plan), "--run-name", "submitted"]
    for _ in range(60):  # the head's job agent may still be starting ("try again later")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env=two_nodes["env"])
        if "No available agent to submit job" not in out.stderr:
            break
        time.sleep(2)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "succeeded" in out.stdout.lower()
    assert "| A " in out.stdout  # the results table reached the job's logs
    client, runs = _stage_run(mlflow_uri, "twonode-test")
    assert len(runs) == 1 and runs[0].data.tags["plan_run"] == "submitted" and runs[0].info.status == "FINISHED"
    assert client.get_metric_history(runs[0].info.run_id, "val_images")[-1].value == 48  # once each, 2 ranks
    assert list((tmp_path / "runs").glob("submitted-A/checkpoint_*"))
    # the two workers ran on two different nodes (this file's first Ray Train run: the only workers listed)
    nodes = subprocess.run([RAY, "list", "actors", "--address", two_nodes["address"], "--format", "json",
                            "--filter", "class_name=RayTrainWorker", "--detail", "--limit", "100"],
                           capture_output=True, text=True, env=two_nodes["env"])
    actors = json.loads(nodes.stdout or "[]")
    assert len({a["node_id"] for a in actors}) == 2, nodes.stdout[-2000:] + nodes.stderr[-2000:]

    # cluster.submit for the same plan run, as the README's walk-through runs it: no
    # MLFLOW_TRACKING_URI, so the user's default store ($VGG_HOME/mlflow.db, here the test's
    # store) goes to the job, absolute; the job runs (the plan run is finished, so it only
    # reports) and ends with the UI command, whose store holds the runs. A resubmit, as
    # after a dropped tunnel, starts no second driver.
    import os

    from mlflow.tracking import MlflowClient

    store = Path(mlflow_uri[len("sqlite:///"):])
    user = {k: v for k, v in two_nodes["env"].items() if k != "MLFLOW_TRACKING_URI"} | {"VGG_HOME": str(store.parent)}
    submit = [sys.executable, "-m", "cluster.submit", "--plan", str(plan), "--run-name", "submitted", "--address",
              two_nodes["dashboard"], "--storage-is-shared"]
    first = subprocess.run([*submit, "--wait"], cwd=REPO, env=user, capture_output=True, text=True, timeout=500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "submitted train-submitted (plan run submitted)" in first.stdout
    assert f"tracking: {mlflow_uri}" in first.stdout, first.stdout
    assert "| A " in first.stdout  # --wait follows the job's own output, its results table included
    ui = first.stdout.split("MLflow UI: ", 1)[1].splitlines()[0]
    assert ui.startswith(f"mlflow ui --backend-store-uri {mlflow_uri}"), ui
    shown = MlflowClient(ui.split("--backend-store-uri ")[1].split()[0])
    exp = shown.get_experiment_by_name("twonode-test").experiment_id
    assert shown.search_runs([exp], "tags.plan_run = 'submitted' and tags.kind = 'stage'")
    # the printed follow command works as printed, in a shell that has the token but not token mode
    follow = first.stdout.split("follow: ", 1)[1].splitlines()[0]
    assert f"--address {two_nodes['dashboard']}" in follow
    env = {k: v for k, v in two_nodes["env"].items() if k != "RAY_AUTH_MODE"}
    logs = subprocess.run(["bash", "-c", follow], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert logs.returncode == 0 and "| A " in logs.stdout, logs.stdout[-2000:] + logs.stderr[-2000:]
    # the tracking address reaches the job absolute even when given relative to the repository
    relative = "sqlite:///" + os.path.relpath(store, REPO)
    again = subprocess.run([*submit, "--tracking-uri", relative], cwd=REPO, env=two_nodes["env"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"tracking: {mlflow_uri}" in again.stdout, again.stdout
    assert "train-submitted was already submitted for plan run submitted (SUCCEEDED): not submitted again" in again.stdout
    listed = subprocess.run([RAY, "job", "list", "--address", two_nodes["dashboard"]], env=two_nodes["env"],
                            capture_output=True, text=True, timeout=300)
    assert listed.stdout.count("submission_id='train-submitted") == 1, listed.stdout[-3000:]


def test_token_is_found_in_ray_token_file_and_its_absence_is_explained(tmp_path, two_nodes):
    """Ray 2.60's token authentication, as a user meets it on a head started in token mode
    with a token (as ray_cluster.yaml starts it): cluster.submit and cluster.retrain find
    the token as Ray's own clients do (the RAY_AUTH_TOKEN variable or ~/.ray/auth_token)
    and, with none, stop before submitting with the commands to run."""
    cluster = two_nodes
    token = cluster["env"]["RAY_AUTH_TOKEN"]
    probe = ("from cluster import jobs; c = jobs.client(%r); print('jobs:', len(c.list_jobs()))"
             % cluster["dashboard"])
    before = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=cluster["env"], capture_output=True,
                            text=True, timeout=120)
    assert before.returncode == 0, before.stderr[-2000:]
    home = tmp_path / "home"
    home.mkdir()
    bare = {k: v for k, v in cluster["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE",
                                                                  "RAY_AUTH_TOKEN_PATH")}
    bare.update(HOME=str(home), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'never.db'}")
    for tool in ("cluster.submit", "cluster.retrain"):
        out = subprocess.run([sys.executable, "-m", tool, "--plan", "pipeline/plans/demo.yaml", "--address",
                              cluster["dashboard"], "--set", f"storage={tmp_path / 'runs'}", "--storage-is-shared"],
                             cwd=REPO, env=bare, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert "uses token authentication and no token was found" in out.stderr
        assert "ray get-auth-token" in out.stderr and "export RAY_AUTH_TOKEN=" in out.stderr
    # nothing was submitted; with the token in Ray's file, the client works
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(token)
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=bare, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout == before.stdout, out.stdout + out.stderr[-2000:]
    # and from the variable, as `export RAY_AUTH_TOKEN=...` gives it
    env = dict(bare, HOME=str(tmp_path), RAY_AUTH_TOKEN=token)
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout == before.stdout, out.stdout + out.stderr[-2000:]
