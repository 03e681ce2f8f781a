"""A crash costs minutes, not weeks: a killed worker resumes from its checkpoint inside
the same Ray Train run. Real processes are SIGKILLed; nothing is simulated. (A killed
driver, resumed by rerunning the same command: tests/test_parallel.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from services import step_records, tiny_plan

from pipeline.stages import load_plan

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


def write_plan(tmp_path: Path, shards: Path, epochs: int, max_failures: int, checkpoint_every: int = 0) -> Path:
    return tiny_plan(tmp_path, shards, name="crash", experiment="crash-test", max_failures=max_failures,
                     stages={"A": {"arch": "A", "scale": 36},
                             "B": {"arch": "B", "scale": 36, "init_from": {"stage": "A"}, "recipe": {"epochs": 1}}},
                     epochs=epochs, batch_size=8, checkpoint_every_steps=checkpoint_every, log_every_steps=4,
                     optim={"lr": 0.05, "patience": 50})


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def checkpoints(storage: Path, trial: str) -> list[Path]:
    return sorted((storage / trial).glob("checkpoint_*")) if (storage / trial).is_dir() else []


def train_workers() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"RayTrainWorker" in cmd:
                pids.append(int(proc.name))
    return pids


def _history_or_empty(uri: str, stage: str):
    try:
        return stage_history(uri, "crash-test", stage, "train_loss")[1]
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return []


def stage_history(uri: str, experiment: str, stage: str, metric: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}' and tags.kind = 'stage'")
    return runs, (client.get_metric_history(runs[0].info.run_id, metric) if runs else [])


def test_killed_worker_resumes_from_its_checkpoint(tmp_path, shards, ray_cluster, mlflow_uri):
    from pipeline.runner import run_plan

    plan = load_plan(write_plan(tmp_path, shards, epochs=8, max_failures=2, checkpoint_every=5))
    storage, outcome = tmp_path / "runs", {}
    steps_seen: set[int] = set()
    streams: list = []  # the checkpoints' random generators

    def note_checkpoint_steps():
        import torch

        for ckpt in checkpoints(storage, "crash-1-A"):
            try:
                state = torch.load(ckpt / "state.pt", weights_only=False)
                steps_seen.add(state["step"])
                streams.append(state["rng"])
            except Exception:  # noqa: BLE001 - being written or already rotated away
                pass
        return len(_history_or_empty(mlflow_uri, "A")) >= 2

    def drive():
        try:
            outcome["results"] = run_plan(plan, run_name="crash-1", tracking_uri=mlflow_uri)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    driver = threading.Thread(target=drive)
    driver.start()
    # Kill once the controller has registered two epochs (their metrics are in MLflow): a
    # checkpoint on disk that the controller has not polled yet is not one Ray resumes from.
    wait_for(note_checkpoint_steps, 240, "stage A's second registered epoch")
    victims = train_workers()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    driver.join(timeout=400)
    assert not driver.is_alive() and "error" not in outcome, outcome.get("error")
    assert [r.stage for r in outcome["results"]] == ["A", "B"]

    runs, history = stage_history(mlflow_uri, "crash-test", "A", "train_loss")
    assert len(runs) == 1  # one MLflow run for the stage, restarts included
    steps = [m.step for m in history]
    assert sorted(set(steps)) == list(range(8))  # every epoch, counter not reset
    _, resumed = stage_history(mlflow_uri, "crash-test", "A", "resumed_from_epoch")
    assert max(m.value for m in resumed) >= 1  # the restarted workers started from a checkpoint
    # 144 images / global batch 8 = 18 steps: mid-epoch checkpoints at steps 5, 10, 15
    # were written besides the epoch ends (18)
    assert steps_seen & {5, 10, 15} and 18 in steps_seen, steps_seen
    # every rank's own generator is in the checkpoint (each rank draws its own dropout masks)
    import torch

    ranks = streams[-1]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["cpu"], ranks[1]["cpu"])
    _, at_step = stage_history(mlflow_uri, "crash-test", "A", "resumed_at_step")
    assert {m.value for m in at_step} <= {0, 5, 10, 15}
    # per-step curves: every record once, at its global step, across the kill and resume
    _, per_step = stage_history(mlflow_uri, "crash-test", "A", "step/train_loss")
    assert [m.step for m in sorted(per_step, key=lambda m: m.step)] == step_records(8, 18, 4, checkpoint_every=5)  # 144 images / global batch 8
    _, lrs = stage_history(mlflow_uri, "crash-test", "A", "step/lr")
    assert len(lrs) == len(per_step) and all(m.value == pytest.approx(0.05 * 8 / 256) for m in lrs)
