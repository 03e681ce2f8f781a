"""`python -m cluster.tracking_server` as ray_cluster.yaml's head start line runs it
(`--detach LOG --pid-file FILE`): the command returns only once the server answers, or
fails with the log's tail; running it again replaces the running server (no pkill); and
SIGTERM ends the whole process tree (`mlflow server` and uvicorn; MLflow's job runner
stays off), so the port is free again. And a stage's figures reach a server that
stops answering mid-stage and at the stage's end exactly once. Real MLflow servers on a
free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from services import free_port

from cluster.tracking_server import _alive, group_members, stop_group

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # two MLflow server starts: 10-20 s each when idle, over a minute on a loaded machine


def _start(tmp_path: Path, port: int, pid_file: Path, artifacts: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.tracking_server", "--detach", str(tmp_path / "server.log"),
                           "--pid-file", str(pid_file), "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                           "--artifacts-destination", artifacts or str(tmp_path / "art"), "--port", str(port)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def _ids(pid_file: Path) -> tuple[int, int]:
    wrapper, pgid = (int(x) for x in pid_file.read_text().split())
    return wrapper, pgid


def _port_free(port: int) -> bool:
    """Whether a new server can listen on `port` (with SO_REUSEADDR, as uvicorn binds: the
    old server's closed connections may sit in TIME_WAIT, a live listener may not)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _gone(pids: set[int], timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_detached_start_restart_by_pid_file_and_sigterm_free_the_port(tmp_path):
    port, pid_file = free_port(), tmp_path / "run" / "server.pid"
    # a server that cannot start: the command fails and says why (the log's tail)
    bad = _start(tmp_path, port, pid_file, artifacts="/proc/no-such-place/art")
    assert bad.returncode == 2 and "did not start" in bad.stderr and "/proc/no-such-place" in bad.stderr, bad
    try:
        first = _start(tmp_path, port, pid_file)
        assert first.returncode == 0, first.stdout + first.stderr
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).close()  # answering on return
        wrapper, pgid = _ids(pid_file)
        old = group_members(pgid) | {wrapper}
        assert len(old) >= 3, old  # wrapper, mlflow server, uvicorn

        # the head's start line run again (ray up twice): the old tree goes, the new server takes the port
        second = _start(tmp_path, port, pid_file)
        assert second.returncode == 0, second.stdout + second.stderr
        assert not any(_alive(p) for p in old), [p for p in old if _alive(p)]
        wrapper, pgid = _ids(pid_file)
        assert wrapper not in old and group_members(pgid)
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).close()

        # SIGTERM to the wrapper, as `kill` or systemd sends it: nothing of the server is left, the port is free
        members = group_members(pgid) | {wrapper}
        os.kill(wrapper, signal.SIGTERM)
        assert _gone(members), [p for p in members if _alive(p)]
        assert _port_free(port)
    finally:
        if pid_file.exists():
            stop_group(_ids(pid_file)[1])


def test_a_stages_figures_reach_mlflow_exactly_once_across_outages_mid_stage_and_at_its_end(
        tmp_path, shards, ray_cluster):
    """A real stage on Ray Train logging to a real `mlflow server` that stops answering
    (its processes paused: requests hang, as with a stuck server) once mid-stage and once
    across the stage's end. Training never waits for it, the driver waits for MLflow
    before booking and says so, and the run's step curve has no gap and no duplicate."""
    import json
    import threading

    from mlflow.tracking import MlflowClient
    from services import own_train_workers, signal_processes, step_records, tiny_plan, wait_for

    from cluster.tracking_server import start, stop
    from pipeline.runner import run_plan
    from pipeline.stages import load_plan

    proc, uri = start(f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "art"), free_port(),
                      log=tmp_path / "server.log")
    paused = []

    def pause(on: bool) -> None:
        os.killpg(proc.pid, signal.SIGSTOP if on else signal.SIGCONT)
        paused[:] = [True] if on else []

    held: list[int] = []

    def hold(on: bool) -> list[int]:
        """Stop (or continue) the stage's training processes; those signalled."""
        pids = signal_processes(own_train_workers() if on else held, signal.SIGSTOP if on else signal.SIGCONT)
        held[:] = pids if on else []
        return pids

    lines: list[str] = []

    class Out:  # the driver's console
        def write(self, text: str) -> None:
            lines.extend(text.splitlines())

        def flush(self) -> None:
            pass

    # Training is held still (its Ray Train workers SIGSTOPped) whenever the test must act
    # before the stage moves on: from its first checkpoint until MLflow has its first
    # figures (the figures reach MLflow behind training, seconds behind on a loaded machine:
    # the stage could be at epoch 7 of 8 by then), and from two epochs into the outage until
    # the second outage has begun, so the stage's end falls inside that one however fast the
    # machine or slow the figures.
    EPOCHS = 10  # noqa: N806 - epochs to spare for the checks' own latency
    plan = load_plan(tiny_plan(tmp_path, shards, name="outage", experiment="outage", epochs=EPOCHS, log_every_steps=2,
                               optim={"lr": 0.05, "patience": 50}, stages={"A": {"arch": "A", "scale": 36}}),
                     ["resources.num_workers=1"])  # the figures' way to MLflow is under test, not DDP
    outcome = {}

    def drive():
        try:
            outcome["results"] = run_plan(plan, run_name="outage-1", tracking_uri=uri, out=Out())
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    client = MlflowClient(uri)

    def history(metric: str) -> list:
        exp = client.get_experiment_by_name("outage")
        runs = exp and client.search_runs([exp.experiment_id], "tags.kind = 'stage'")
        return client.get_metric_history(runs[0].info.run_id, metric) if runs else []

    def taken_epochs() -> set[int]:
        """The epochs whose checkpointed report Ray Train's controller has taken (its own
        record of them): a checkpoint on disk is not yet one, and a held worker could not
        hand it over."""
        try:
            snapshot = json.loads((tmp_path / "runs" / "outage-1-A" / "checkpoint_manager_snapshot.json").read_text())
            return {c["metrics"]["epoch"] for c in snapshot["checkpoint_results"]}
        except (OSError, ValueError, KeyError):  # not written yet, or being rewritten
            return set()

    driver = threading.Thread(target=drive)
    try:
        driver.start()
        wait_for(lambda: taken_epochs(), 600, "the stage's first checkpoint")
        assert hold(True), "no Ray Train worker process to hold"
        first = max(wait_for(taken_epochs, 30, "the controller's record"))  # empty while it is rewritten
        assert first < EPOCHS - 5, f"the stage was at epoch {first + 1} of {EPOCHS} before it could be held"
        wait_for(lambda: history("step/train_loss"), 600, "the first step records in MLflow")
        pause(True)  # mid-stage: two or more epochs end while MLflow does not answer
        hold(False)
        # (taken by the controller: two epochs on, or a later one)
        wait_for(lambda: max(taken_epochs(), default=-1) >= first + 2, 600, "two more epochs' checkpoints")
        assert hold(True), "no Ray Train worker process to hold"
        during = max(wait_for(taken_epochs, 30, "the controller's record"))
        assert during < EPOCHS - 1, "the stage had ended before it could be held"
        pause(False)
        wait_for(lambda: len(history("val_top1_error")) > during, 600, "the outage's epochs in MLflow once it answers")
        pause(True)  # again, across the stage's end: its last figures wait in the sink
        hold(False)
        wait_for(lambda: any("MLflow has not taken" in line for line in lines) or not driver.is_alive(), 600,
                 "the driver's wait")
        assert any("MLflow has not taken" in line for line in lines), (outcome, lines[-20:])
        pause(False)
        driver.join(timeout=600)
        assert not driver.is_alive() and "error" not in outcome, outcome.get("error") or lines
    finally:
        hold(False)
        if paused:
            pause(False)
        driver.join(timeout=600)
        try:
            steps = [m.step for m in history("step/train_loss")]
            epochs = sorted(m.step for m in history("val_top1_error"))
        finally:
            stop(proc)
    assert any("MLflow took them" in line for line in lines), lines
    assert sorted(steps) == step_records(EPOCHS, 9, 2)  # no gap, no duplicate
    assert epochs == list(range(EPOCHS))
