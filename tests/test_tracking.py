"""MLflow bookkeeping against real stores: a SQLite file, and a real `mlflow server`
(started by cluster.tracking_server) that goes down mid-run and comes back."""

from __future__ import annotations

import shutil

import pytest
from services import free_port

from cluster.tracking_server import start, stop
from pipeline.tracking import MetricsLogger, Tracker


def test_sqlite_artifacts_live_beside_the_database(tmp_path, monkeypatch, mlflow_store_template):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's default would be ./mlruns under this directory
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    shutil.copyfile(mlflow_store_template, tmp_path / "store" / "mlflow.db")  # migrated, empty: no experiment yet
    tracker = Tracker(uri, "artifacts-test")
    run_id, resumed = tracker.parent_run("r1", params={"a": 1}, tags={})
    assert not resumed
    tracker.client.log_text(run_id, "hello", "notes/hello.txt")
    [written] = (tmp_path / "store" / "mlartifacts").rglob("hello.txt")
    assert written.read_text() == "hello"
    assert not list(elsewhere.iterdir())
    # the same plan run name finds the same run again
    assert Tracker(uri, "artifacts-test").parent_run("r1", params={}, tags={}) == (run_id, True)


def test_a_store_is_upgraded_unless_it_is_at_mlflows_newest_schema(tmp_path, mlflow_store_template):
    """A restart on a current store runs no `mlflow db upgrade` (5 CPU-s of imports); for a
    store an older MLflow left (here: migrated one revision down by alembic) it runs. The
    newest revision is checked against alembic's own reading of MLflow's migrations."""
    import os

    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    from cluster.tracking_server import schema_head, store_revision, upgrade

    store = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_store_template, store)
    uri = f"sqlite:///{store}"
    config = _get_alembic_config(uri)
    head = ScriptDirectory.from_config(config).get_current_head()
    assert schema_head() == head and store_revision(uri) == head
    assert store_revision(f"sqlite:///{tmp_path / 'none.db'}") is None
    broken = dict(os.environ, PYTHONHOME=str(tmp_path / "nowhere"))  # an upgrade command that cannot start
    upgrade(uri, broken)  # current: not run, so no error

    command.downgrade(config, "-1")
    older = store_revision(uri)
    assert older not in (None, head)
    with pytest.raises(RuntimeError, match="mlflow db upgrade"):
        upgrade(uri, broken)  # not current: run


@pytest.mark.slow
def test_metrics_survive_a_tracking_server_outage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    db, artifacts, port = tmp_path / "mlflow.db", tmp_path / "artifacts", free_port()
    server, uri = start(f"sqlite:///{db}", str(artifacts), port, log=tmp_path / "server.log")
    try:
        tracker = Tracker(uri, "outage-test")
        run_id, _ = tracker.parent_run("r1", params={}, tags={})
        logger = MetricsLogger(uri, run_id, enabled=True)
        logger.log({"train_loss": 3.0}, step=0)
        assert logger.pending == []

        stop(server)
        logger.log({"train_loss": 2.0}, step=1)  # must not raise: training goes on
        logger.log({"train_loss": 1.5}, step=2)
        assert len(logger.pending) == 2
        assert "MLflow unreachable" in capsys.readouterr().err

        server, _ = start(f"sqlite:///{db}", str(artifacts), port, log=tmp_path / "server.log")
        logger.log({"train_loss": 1.0}, step=3)
        assert logger.pending == [] and logger.flush()
        history = tracker.client.get_metric_history(run_id, "train_loss")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (0, 3.0), (1, 2.0), (2, 1.5), (3, 1.0)]
    finally:
        stop(server)


def test_logged_model_reloads_and_takes_any_batch(tmp_path, monkeypatch, mlflow_uri):
    import mlflow
    import torch

    from pipeline.models import build_model

    monkeypatch.chdir(tmp_path)
    uri = mlflow_uri
    tracker = Tracker(uri, "model-test")
    run_id, _ = tracker.parent_run("r1", params={}, tags={"stage": "A"})
    torch.manual_seed(0)
    net = build_model("A", num_classes=6, width_mult=0.125, input_size=32).eval()
    tracker.log_model(run_id, net, "model-test-A")
    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pytorch.load_model("models:/model-test-A/1")
    for batch in (1, 5):  # an export traced at batch 1 would accept only batch 1
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), net(x), atol=1e-5, rtol=1e-4)
    version = tracker.client.get_model_version("model-test-A", "1")
    assert version.tags["stage"] == "A" and version.run_id == run_id


def test_a_resumed_run_logs_what_its_checkpoint_carried_once(tmp_path, mlflow_uri):
    """A driver killed after a checkpoint was written but before its figures reached MLflow:
    the resumed run's first report replays them; nothing already logged is logged twice."""
    from mlflow.tracking import MlflowClient

    from pipeline.metricsink import MetricsSink
    from pipeline.worker import MlflowEpochMetrics

    uri = mlflow_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("replay")).info.run_id

    def epoch(e: int, steps: list[int]) -> dict:
        return {"epoch": e, "step": 9, "train_loss": 1.0 / (e + 1), "val_top1_error": 50.0 - e,
                "step_log": [{"step": s, "train_loss": 1.0, "lr": 0.1} for s in steps]}

    def controller(*reports) -> None:  # a driver's sink and controller, ended once MLflow has it all
        sink = MetricsSink(uri, run_id)
        for report in reports:
            MlflowEpochMetrics(sink).after_report(None, [report], None)
        assert sink.flush(60)["ok"]
        sink.close()

    controller(epoch(0, [4, 9]))  # logged; then the driver dies after epoch 1's checkpoint
    # a new driver: the checkpoint's replay is every report so far (epoch 0's is in MLflow already)
    controller(dict(epoch(2, [22, 27]), replay=[epoch(0, [4, 9]), epoch(1, [13, 18])]))
    controller(dict(epoch(2, [22, 27]), replay=[epoch(0, [4, 9]), epoch(1, [13, 18])]))  # once more
    controller(dict(epoch(2, [22, 27]), replay=epoch(1, [13, 18])))  # a checkpoint from before the history
    assert [m.step for m in client.get_metric_history(run_id, "val_top1_error")] == [0, 1, 2]
    assert sorted(m.step for m in client.get_metric_history(run_id, "step/train_loss")) == [4, 9, 13, 18, 22, 27]


@pytest.mark.slow
def test_every_command_and_the_local_server_default_to_one_store(tmp_path, monkeypatch):
    """With no MLFLOW_TRACKING_URI, a run logged from any directory lands in the one store
    that `make mlflow-server` (python -m cluster.tracking_server, no options) serves."""
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    from mlflow.tracking import MlflowClient

    from pipeline.tracking import tracking_uri

    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("VGG_HOME", str(tmp_path / "home"))
    for cwd in ("a", "b"):  # two unrelated working directories, as a Ray job's copy would be
        (tmp_path / cwd).mkdir()
        monkeypatch.chdir(tmp_path / cwd)
        assert tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
        Tracker(tracking_uri(), "one-store").parent_run(f"run-{cwd}", params={}, tags={})
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "cluster.tracking_server", "--port", str(port)], cwd=tmp_path,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        said = ""
        while "export MLFLOW_TRACKING_URI=" not in said:  # printed once it answers; EOF if it died
            line = server.stdout.readline()
            assert line, f"the server stopped: {said[-2000:]}"
            said += line
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).close()
        client = MlflowClient(f"http://127.0.0.1:{port}")
        exp = client.get_experiment_by_name("one-store")
        assert sorted(r.info.run_name for r in client.search_runs([exp.experiment_id])) == ["run-a", "run-b"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_an_unknown_stage_or_experiment_is_answered_with_what_exists(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import finished_stage_run

    uri = mlflow_uri
    client = MlflowClient(uri)
    exp = client.create_experiment("vgg-x")
    for stage, status in (("A", "finished"), ("B", "finished"), ("C", "failed")):
        client.create_run(exp, tags={"kind": "stage", "stage": stage, "stage_status": status})
    assert finished_stage_run(client, "vgg-x", "B").data.tags["stage"] == "B"
    with pytest.raises(ValueError, match="no finished run of stage 'C'; finished stages there: A, B$"):
        finished_stage_run(client, "vgg-x", "C")
    with pytest.raises(ValueError, match="no experiment 'vgg-y' in sqlite:.*; experiments there: Default, vgg-x$"):
        finished_stage_run(client, "vgg-y", "A")


def test_each_nodes_system_figures_are_logged_under_its_label_at_the_time_taken(mlflow_uri):
    """A real sampler's figures (psutil on this machine) ride with two ranks' reports, as
    pipeline/stageloop.py sends them; the controller's callback logs them per node."""
    import time

    from mlflow.tracking import MlflowClient

    from pipeline.metricsink import MetricsSink
    from pipeline.sysmetrics import Sampler
    from pipeline.worker import MlflowEpochMetrics

    sampler = Sampler(interval=0.05)
    deadline = time.monotonic() + 30
    while len(sampler._samples) < 2:  # two samples at least, at the thread's own pace
        assert time.monotonic() < deadline, "the sampler took no samples"
        time.sleep(0.05)
    sampler.stop()
    samples = sampler.drain()
    assert {"cpu_utilization_percentage", "system_memory_usage_percentage", "disk_read_megabytes",
            "network_receive_megabytes"} <= set(samples[0][1])
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("system")).info.run_id
    sink = MetricsSink(mlflow_uri, run_id)
    callback = MlflowEpochMetrics(sink)
    callback.after_report(None, [{"epoch": 0, "step": 3, "system": {"node": "aaaa1111", "samples": samples}},
                                 {"epoch": 0, "step": 3, "system": {"node": "bbbb2222", "samples": samples[:1]}}],
                          None)
    assert sink.flush(60)["ok"]
    mine = client.get_metric_history(run_id, "system/aaaa1111/cpu_utilization_percentage")
    assert [(m.timestamp, m.step) for m in mine] == [(ts, ts // 1000) for ts, _ in samples]
    assert len(client.get_metric_history(run_id, "system/bbbb2222/system_memory_usage_percentage")) == 1
    assert "system" not in str(client.get_run(run_id).data.params)


def test_registration_holds_back_only_mlflows_two_inapplicable_notes():
    """Registering our classifier printed MLflow's "add type hints" and "pickled with
    CloudPickle" notes every time; those two are gone, every other warning still shows."""
    import logging
    import warnings

    from pipeline.tracking import _classifier_model, _known_harmless_mlflow_notes

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _classifier_model()  # MLflow inspects predict's type hints when the class is made
    assert not [w for w in seen if "type hints" in str(w.message)]
    log, records = logging.getLogger("mlflow.pyfunc"), []  # MLflow's loggers do not propagate: listen on it
    handler = logging.Handler()
    handler.emit = records.append
    log.addHandler(handler)
    try:
        with _known_harmless_mlflow_notes():
            log.warning(_known_harmless_mlflow_notes.PICKLED + ", requires exercising caution")
            log.warning("something else went wrong")
        log.warning(_known_harmless_mlflow_notes.PICKLED + " (outside a registration)")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage()[:26] for r in records] == ["something else went wrong", "Passing a Python object as"]
