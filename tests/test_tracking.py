"""MLflow bookkeeping against real stores: a SQLite file, and a real `mlflow server`
that goes down mid-run and comes back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.tracking import MetricsLogger, Tracker

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def test_sqlite_artifacts_live_beside_the_database(tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's default would be ./mlruns under this directory
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    tracker = Tracker(uri, "artifacts-test")
    run_id, resumed = tracker.parent_run("r1", params={"a": 1}, tags={})
    assert not resumed
    tracker.client.log_text(run_id, "hello", "notes/hello.txt")
    [written] = (tmp_path / "store" / "mlartifacts").rglob("hello.txt")
    assert written.read_text() == "hello"
    assert not list(elsewhere.iterdir())
    # the same plan run name finds the same run again
    assert Tracker(uri, "artifacts-test").parent_run("r1", params={}, tags={}) == (run_id, True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(db: Path, artifacts: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([MLFLOW, "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not come up in 120 s")


def _stop_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 9)  # the server's gunicorn/uvicorn workers too
    proc.wait()


@pytest.mark.slow
def test_metrics_survive_a_tracking_server_outage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    db, artifacts, port = tmp_path / "mlflow.db", tmp_path / "artifacts", _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(db, artifacts, port)
    try:
        tracker = Tracker(uri, "outage-test")
        run_id, _ = tracker.parent_run("r1", params={}, tags={})
        logger = MetricsLogger(uri, run_id, enabled=True)
        logger.log({"train_loss": 3.0}, step=0)
        assert logger.pending == []

        _stop_server(server)
        logger.log({"train_loss": 2.0}, step=1)  # must not raise: training goes on
        logger.log({"train_loss": 1.5}, step=2)
        assert len(logger.pending) == 2
        assert "MLflow unreachable" in capsys.readouterr().err

        server = _start_server(db, artifacts, port)
        logger.log({"train_loss": 1.0}, step=3)
        assert logger.pending == [] and logger.flush()
        history = tracker.client.get_metric_history(run_id, "train_loss")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
            (0, 3.0), (1, 2.0), (2, 1.5), (3, 1.0)]
    finally:
        _stop_server(server)
