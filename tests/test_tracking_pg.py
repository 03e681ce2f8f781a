"""Experiment history that survives the machine: MLflow on a real PostgreSQL server
(started here, on loopback, as an unprivileged user) through cluster.tracking_server,
with the password from a file and never in a URI, a process listing or a log; then
the server and the database restart and everything reads back unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
from services import Postgres, free_port, tiny_plan

from cluster import tracking_server
from pipeline.stages import load_plan


def snapshot(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    out = {"runs": [(r.info.run_id, r.info.status, r.data.tags.get("kind"), dict(r.data.metrics),
                     dict(r.data.params)) for r in runs]}
    for r in runs:
        for key in r.data.metrics:
            out[(r.info.run_id, key)] = [(m.step, m.value) for m in client.get_metric_history(r.info.run_id, key)]
    out["versions"] = sorted((v.name, v.version, v.run_id, tuple(sorted(v.tags.items())))
                             for v in client.search_model_versions())
    out["champion"] = client.get_model_version_by_alias("pg-test-A", "champion").version
    return out


@pytest.mark.slow
def test_plan_evaluation_ensemble_and_alias_survive_a_restart_of_server_and_database(
        tmp_path, shards, ray_cluster):
    from mlflow.tracking import MlflowClient

    from pipeline.ensemble import run_ensemble
    from pipeline.evaluate import evaluate_run
    from pipeline.runner import run_plan

    pg = Postgres()
    secret = tmp_path / "db-password"
    secret.write_text(pg.password + "\n")
    log, port = tmp_path / "server.log", free_port()
    args, proc = (pg.uri, str(tmp_path / "artifacts"), port), None
    try:
        proc, url = tracking_server.start(*args, log=log, password=secret.read_text().strip())
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert pg.password.encode() not in cmdline and pg.password not in log.read_text()
        one = {"num_workers": 1, "cpus_per_worker": 1}
        plan = load_plan(tiny_plan(tmp_path, shards, name="pg", experiment="pg-test", epochs=1, stall_epochs=0,
                                   optim={"lr": 0.05}, stages={"A": {"arch": "A", "scale": 36, "resources": one},
                                                               "A-LRN": {"arch": "A-LRN", "scale": 36,
                                                                         "resources": one}}))
        results = run_plan(plan, run_name="pg-1", tracking_uri=url)
        for r in results:
            evaluate_run(r.run_id, tracking_uri=url, protocol="single", workers=1)
        run_ensemble([r.run_id for r in results], tracking_uri=url, experiment=None, protocol="single",
                     scales=None, register=False)
        client = MlflowClient(url)
        version = client.search_model_versions("name='pg-test-A'")[0].version
        client.set_registered_model_alias("pg-test-A", "champion", version)
        before = snapshot(url, "pg-test")
        assert len(before["runs"]) == 4 and before["champion"] == version  # plan, 2 stages, ensemble

        tracking_server.stop(proc)
        pg.stop()
        pg.start()
        proc, url = tracking_server.start(*args, log=log, password=secret.read_text().strip())  # db upgrade too
        assert snapshot(url, "pg-test") == before
        assert pg.password not in log.read_text()
    finally:
        if proc is not None:
            tracking_server.stop(proc)
        pg.remove()


def test_a_password_in_the_uri_is_refused_without_being_echoed(capsys):
    assert tracking_server.main(["--backend-store-uri", "postgresql://postgres:hunter2@127.0.0.1:1/mlflow"]) == 2
    err = capsys.readouterr().err
    assert "PGPASSWORD or --password-file" in err and "hunter2" not in err and "postgres:***@" in err
