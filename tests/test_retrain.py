"""Scheduled retrains against real local services: a Ray head started with `ray start`
on loopback, cluster.tracking_server on a real PostgreSQL (started here as an
unprivileged user, the password in the server's environment only), and jobs submitted
through the Ray Jobs API.

One sequence, as a schedule would see it: a retrain whose job is stopped changes
nothing; two overlapping retrains then retry that job once (no --force) and crown a
first champion; an unchanged dataset is not retrained; a forced retrain
that is better takes the alias, one that is worse does not, and a failed job
leaves the champion as it was. Two of the nets are evaluated and ensembled. Then the
tracking server and the database restart (as after `ray down` / `ray up` with an
external database) and every run, metric, model version, tag and the champion alias
read back unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from services import RAY, Postgres, free_port, ray_cluster_on_loopback, tiny_plan

from cluster.retrain import data_hash

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
MODEL = "retrain-test-A"


def write_plan(tmp_path: Path, shards: Path) -> Path:
    # One worker a job: what is tested here is the schedule around the jobs (DDP across
    # workers and nodes is test_train's and test_multinode's), and each job's second
    # worker process cost a torch, DALI and gloo start.
    return tiny_plan(tmp_path, shards, name="nightly", experiment="retrain-test",
                     stages={"A": {"arch": "A", "scale": 36, "resources": {"num_workers": 1, "cpus_per_worker": 1}}},
                     epochs=6, log_every_steps=0, optim={"lr": 0.05, "patience": 50})


# A net that cannot learn (lr 1e-9) but is otherwise the same plan: near chance, and
# the same every time it is trained.
STUCK = ["optim.lr=1e-9", "recipe.epochs=1"]


def retrain(cluster, uri, plan, *extra) -> subprocess.Popen:
    env = dict(cluster["env"], MLFLOW_TRACKING_URI=uri)
    return subprocess.Popen([sys.executable, "-m", "cluster.retrain", "--plan", str(plan), "--address",
                             cluster["dashboard"], "--storage-is-shared", *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def jobs_submitted(cluster) -> list[str]:
    """Submission ids of the retrain jobs the cluster has seen, from the Jobs API's REST
    route with the cluster's token (Ray's own job client reads its auth settings once per
    process, so it would need a fresh Python, and Ray's imports, for each question)."""
    request = urllib.request.Request(f"{cluster['dashboard']}/api/jobs/",
                                     headers={"Authorization": f"Bearer {cluster['env']['RAY_AUTH_TOKEN']}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        jobs = json.load(r)
    return [j["submission_id"] for j in jobs if (j.get("submission_id") or "").startswith("retrain-")]


def test_retrain_schedule(tmp_path, shards):
    from mlflow.tracking import MlflowClient

    from cluster import tracking_server

    plan = write_plan(tmp_path, shards)
    overrides = [x for o in STUCK for x in ("--set", o)]
    pg = Postgres()
    server = (pg.uri, str(tmp_path / "artifacts"), free_port())
    try:
        proc, uri = tracking_server.start(*server, log=tmp_path / "server.log", password=pg.password)
    except BaseException:  # e.g. the server too slow to answer on a loaded machine: no PostgreSQL left behind
        pg.remove()
        raise
    assert pg.password.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    try:
        with ray_cluster_on_loopback("rt", [{"cpus": 2, "resources": {}}]) as cluster:
            client = MlflowClient(uri)
            _schedule(client, cluster, uri, plan, overrides, shards)
        # an evaluation and an ensemble of two retrained nets, on the same PostgreSQL store
        from pipeline.ensemble import run_ensemble
        from pipeline.evaluate import evaluate_run

        members = [v.run_id for v in client.search_model_versions(f"name = '{MODEL}'")][:2]
        for run_id in members:
            evaluate_run(run_id, tracking_uri=uri, protocol="single", workers=1)
        ens = run_ensemble(members, tracking_uri=uri, experiment=None, protocol="single", scales=None,
                           register=False)
        assert ens["images"] == 48
        before = _registry(client)
        tracking_server.stop(proc)
        pg.stop()
        pg.start()
        proc, uri = tracking_server.start(*server, log=tmp_path / "server.log", password=pg.password)
        assert _registry(MlflowClient(uri)) == before
        assert pg.password not in (tmp_path / "server.log").read_text()
    finally:
        tracking_server.stop(proc)
        pg.remove()


def _registry(client) -> dict:
    versions = client.search_model_versions(f"name = '{MODEL}'")
    return {"versions": sorted((v.version, v.run_id, tuple(sorted(v.tags.items())), v.description) for v in versions),
            "champion": client.get_model_version_by_alias(MODEL, "champion").version,
            "runs": sorted((r.info.run_id, r.info.status, tuple(sorted(r.data.metrics.items())),
                            tuple(sorted(r.data.tags.items())))
                           for r in client.search_runs([client.get_experiment_by_name("retrain-test").experiment_id])),
            "history": {r.info.run_id: [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, "train_loss")]
                        for r in client.search_runs([client.get_experiment_by_name("retrain-test").experiment_id])}}


def _schedule(client, cluster, uri, plan, overrides, shards) -> None:
    """The schedule's sequence (see the module docstring)."""
    # the first retrain on new data loses its job (stopped, as when its node goes): exit 1, nothing promoted
    lost = retrain(cluster, uri, plan, *overrides)
    for line in lost.stdout:
        if "submitted retrain job" in line:
            sid = line.split("submitted retrain job ")[1].strip()
            break
    else:
        raise AssertionError(f"no job submitted: {finish(lost)}")
    stop = subprocess.run([RAY, "job", "stop", "--address", cluster["dashboard"], sid], env=cluster["env"],
                          capture_output=True, text=True, timeout=300)
    assert stop.returncode == 0, stop.stdout[-2000:] + stop.stderr[-2000:]
    rc, out = finish(lost)
    assert rc == 1 and f"retrain job {sid} STOPPED" in out, out[-3000:]

    # two schedules fire together on the same data, no --force: the lost job is retried once
    # (a new id, the same plan run), and one first champion is crowned
    first, second = retrain(cluster, uri, plan, *overrides), retrain(cluster, uri, plan, *overrides)
    (rc1, out1), (rc2, out2) = finish(first), finish(second)
    assert rc1 == 0 and rc2 == 0, out1[-3000:] + out2[-3000:]
    assert sorted(jobs_submitted(cluster)) == [sid, f"{sid}-retry1"]
    assert f"submitted retrain job {sid}-retry1" in out1 + out2
    assert "already submitted" in out1 + out2
    assert (out1 + out2).count("is the new champion") == 1  # one decision per job
    champ = client.get_model_version_by_alias(MODEL, "champion")
    assert champ.tags["data_hash"] == data_hash(shards)
    assert champ.tags["promotion"].startswith("promoted: first champion")
    stuck_error = float(champ.tags["val_top1_error"])

    # the data has not changed: nothing is submitted
    rc, out = finish(retrain(cluster, uri, plan, *overrides))
    assert rc == 0 and "data unchanged" in out and len(jobs_submitted(cluster)) == 2

    # forced, with a recipe that learns: better, so it becomes the champion
    rc, out = finish(retrain(cluster, uri, plan, "--force"))
    assert rc == 0, out[-3000:]
    better = client.get_model_version_by_alias(MODEL, "champion")
    assert better.version != champ.version, out[-3000:]
    assert float(better.tags["val_top1_error"]) < stuck_error
    assert "new champion" in out

    # forced again with the net that cannot learn: not better, the alias stays
    rc, out = finish(retrain(cluster, uri, plan, "--force", *overrides))
    assert rc == 0 and "not promoted" in out, out[-3000:]
    assert client.get_model_version_by_alias(MODEL, "champion").version == better.version
    newest = max(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert newest.tags["promotion"].startswith("kept the champion")

    # a job that fails on the cluster (no global batch fits the data) changes nothing
    rc, out = finish(retrain(cluster, uri, plan, "--force", "--set", "recipe.batch_size=100000"))
    assert rc == 1 and "FAILED" in out and f"champion untouched ({MODEL} v{better.version})" in out
    assert client.get_model_version_by_alias(MODEL, "champion").version == better.version
    assert len(jobs_submitted(cluster)) == 5


def test_an_unreachable_tracking_server_is_not_no_champion(tmp_path, shards):
    """With the server up and no registered model, "no champion" is the answer and the
    retrain goes on to the cluster (here a dead address, so it stops there). With the
    same server stopped, the retrain must not take that path: it says the server cannot
    be read, exits 3, and contacts no cluster."""
    from services import mlflow_server

    plan = write_plan(tmp_path, shards)
    dead_ray = f"http://127.0.0.1:{free_port()}"
    env = dict(os_environ(), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10",
               RAY_AUTH_MODE="disabled")

    def run(uri):
        return subprocess.run([sys.executable, "-m", "cluster.retrain", "--plan", str(plan), "--address", dead_ray,
                               "--storage-is-shared"],
                              cwd=REPO, env=dict(env, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
                              timeout=300)

    with mlflow_server(tmp_path / "server") as uri:
        up = run(uri)
    assert up.returncode not in (0, 3) and "cannot read" not in up.stderr, up.stdout + up.stderr
    assert dead_ray.split("//")[1] in up.stdout + up.stderr  # it went on to the cluster: no champion yet
    down = run(uri)  # the same server, stopped
    assert down.returncode == 3, down.stdout + down.stderr
    assert f"cannot read {MODEL}'s champion from the tracking server at {uri}" in down.stderr
    assert "Nothing was submitted" in down.stderr and dead_ray.split("//")[1] not in down.stdout + down.stderr


def os_environ() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
