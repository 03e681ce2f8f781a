"""An elastic stage on a real two-node Ray cluster on loopback (CPU workers, one per
node): started on 2 workers, the second node drained with a deadline (a spot reclaim
notice) and then killed; the stage checkpoints inside the notice window, goes on with 1
worker at the same global batch and lr, grows back to 2 when a node rejoins, and goes
on with 1 again when that node is killed without notice, having lost no more than the
steps since its last checkpoint (`checkpoint_every_steps`). Every
image of every epoch is trained on exactly once (counted from the keys the loaders
returned), and the final weights equal, to the bit, those of the same recipe run on one
worker without Ray (the run is deterministic: no dropout, the augmentation's draws
belong to the image's position, not to the rank)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from services import RAY, ray_cluster_on_loopback, step_records, tiny_plan, wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
EPOCHS, STEPS, BATCH = 8, 9, 16  # 144 training images, global batch 16
NOTICE_S = 20  # the drain's deadline: a spot notice is 120 s (AWS) or 30 s (GCP)


@pytest.fixture
def elastic_cluster(monkeypatch):
    # Ray Train's preemption watcher polls node drains every 5 s; the test's stage is short
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")  # off elsewhere in the suite (conftest.py)
    # Right after the deadline the drained node may still look alive to the elastic policy,
    # which then waits for a 2-worker group that cannot start (60 s by default) before it
    # tries 1: a cost a spot stage pays too (docs/cluster.md), shortened here
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
    with ray_cluster_on_loopback("el", [{"cpus": 1, "resources": {"head": 1}}, {"cpus": 1}]) as cluster:
        yield cluster


def _nodes(cluster) -> list[dict]:
    out = subprocess.run([RAY, "list", "nodes", "--address", cluster["address"], "--format", "json", "--limit", "20"],
                         capture_output=True, text=True, env=cluster["env"], timeout=60)
    return [n for n in json.loads(out.stdout or "[]") if n.get("state") == "ALIVE"]


def _taken(storage: Path) -> int:
    """The newest checkpoint Ray Train's controller has taken (its own record of them),
    as global steps done; 0 before the first."""
    taken = []
    for f in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            taken += [c["metrics"] for c in json.loads(f.read_text())["checkpoint_results"]]
        except (OSError, ValueError):  # being rewritten
            pass
    return max((m["epoch"] * STEPS + m.get("step", STEPS) for m in taken), default=0)  # epoch ends: its last step


def test_a_stage_shrinks_on_a_drain_notice_and_grows_back_with_the_same_recipe(tmp_path, shards, elastic_cluster,
                                                                             mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pipeline.stages import load_plan

    keys = tmp_path / "keys"
    path = tiny_plan(tmp_path, shards, name="el", experiment="el-test", epochs=EPOCHS, log_every_steps=1,
                     checkpoint_every_steps=3, dropout=0.0, stall_epochs=0, optim={"lr": 0.1, "patience": 50},
                     stages={"A": {"arch": "A", "scale": 36}})
    # max_failures: a node lost without notice is a failure to Ray Train (a drained one is a
    # preemption, counted apart)
    plan_args = ["resources.num_workers=[1,2]", "resources.max_worker_batch=8", "resources.resize_check_s=1",
                 "resources.max_failures=1", f"data.keys_log={keys}"]
    log = tmp_path / "train.log"
    cmd = [sys.executable, "-m", "pipeline", "train", "--plan", str(path), "--address", elastic_cluster["address"],
           "--run-name", "el-1", *[x for a in plan_args for x in ("--set", a)]]
    with open(log, "w") as out:
        driver = subprocess.Popen(cmd, cwd=REPO, env=dict(elastic_cluster["env"], MLFLOW_TRACKING_URI=mlflow_uri),
                                  stdout=out, stderr=subprocess.STDOUT)
    text = lambda: log.read_text()  # noqa: E731
    client = MlflowClient(mlflow_uri)

    def until(cond, timeout: float, what: str) -> None:
        """`cond` becomes true while the driver runs (a driver that exits first fails here)."""
        wait_for(lambda: cond() or driver.poll() is not None, timeout, what)
        assert cond(), f"the driver exited ({driver.returncode}) before {what}:\n{text()[-4000:]}"

    try:
        until(lambda: "on 2 worker(s) ETA" in text(), 300, "the stage training on 2 workers")
        # held still while the two Ray commands start (seconds each, more in a slow hour), or
        # the tiny stage trains on toward its end before the notice is given
        assert elastic_cluster["signal_train_workers"](signal.SIGSTOP)
        try:
            second = next(n["node_id"] for n in _nodes(elastic_cluster) if not n.get("is_head_node"))
            drain = subprocess.run([RAY, "drain-node", "--address", elastic_cluster["address"], "--node-id", second,
                                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim",
                                    "--deadline-remaining-seconds", str(NOTICE_S)],
                                   capture_output=True, text=True, env=elastic_cluster["env"], timeout=60)
        finally:
            elastic_cluster["signal_train_workers"](signal.SIGCONT)
        # no earlier than Ray's deadline, which the command set once it had started: a node
        # killed before it is an ordinary failure to Ray, not a preemption
        deadline = time.time() + NOTICE_S
        assert drain.returncode == 0, drain.stderr[-2000:]
        until(lambda: "preemption: the notice's checkpoint is" in text(), NOTICE_S + 60, "the notice's checkpoint")
        # written and committed by Ray Train inside the notice window
        assert re.search(r"notice's checkpoint is committed, \d+ s before the deadline", text()), text()[-3000:]
        # Training is held still (SIGSTOP) while the cluster changes, so the tiny stage cannot
        # finish first however fast this machine is; the order of events is what a slow
        # ImageNet stage sees. The reclaim, at the deadline: the machine is gone. (Ray counts
        # a drained node's death as a preemption only after the drain's deadline.)
        hold, go = signal.SIGSTOP, signal.SIGCONT
        assert elastic_cluster["signal_train_workers"](hold)
        wait_for(lambda: time.time() > deadline + 1, NOTICE_S + 5, "the notice's deadline")
        elastic_cluster["kill_node"](1)
        elastic_cluster["signal_train_workers"](go)
        until(lambda: "resize: 2 -> 1 workers" in text(), 300, "the stage going on with 1 worker")

        def one_worker_report() -> bool:
            """Ray Train's controller has taken a report of the 1-worker group (its callback
            logged the group's step records): a held worker could not hand it over."""
            try:
                run = client.search_runs([client.get_experiment_by_name("el-test").experiment_id],
                                         "tags.kind = 'stage'")[0]
                return any(m.value == 1 for m in client.get_metric_history(run.info.run_id, "step/world_size"))
            except Exception:  # noqa: BLE001 - the store is busy or the run not there yet
                return False

        until(one_worker_report, 300, "a report of the 1-worker group")
        until(lambda: elastic_cluster["signal_train_workers"](hold), 60, "the 1-worker group's process")
        before_grow = set(keys.glob("A-*.txt"))
        elastic_cluster["add_node"](2, {"cpus": 1})  # capacity returns
        until(lambda: "resize the worker group from 1 -> 2" in text(), 300, "Ray Train deciding to grow")
        # the 1-worker group's last checkpoint, read while its worker is still held (once the
        # new group goes on, it may take its own first checkpoint before its line is read)
        grown_from = wait_for(lambda: _taken(tmp_path / "runs"), 30, "the controller's record of the checkpoints")
        elastic_cluster["signal_train_workers"](go)
        until(lambda: "resize: 1 -> 2 workers" in text(), 300, "the stage growing back to 2 workers")

        # A node lost without notice (a machine that dies, a reclaim whose notice never came):
        # the regrown group trains past a checkpoint, then node 2 is killed outright.
        def regrown_steps() -> list[tuple[int, int]]:
            """The (epoch, step)s the regrown group has read, in order."""
            lines = [line.split() for f in set(keys.glob("A-*.txt")) - before_grow for line in f.read_text().splitlines()]
            return sorted({(int(p[0]), int(p[1])) for p in lines if len(p) == 3})

        # (once the controller has taken a checkpoint of the regrown group: until then a
        # loss resumes from the 1-worker group's and is no resize at all)
        until(lambda: _taken(tmp_path / "runs") > grown_from and len(regrown_steps()) >= 5, 300,
              "the regrown group's first checkpoint")
        assert elastic_cluster["signal_train_workers"](hold)
        last_read = regrown_steps()[-1]
        taken = _taken(tmp_path / "runs")  # where the stage stood: a held worker hands over no more
        elastic_cluster["kill_node"](2)
        elastic_cluster["signal_train_workers"](go)
        until(lambda: "resize: 2 -> 1 workers (a node lost without notice" in text(), 300,
              "the stage going on with 1 worker after the unannounced loss")
        assert driver.wait(timeout=600) == 0, text()[-4000:]
    finally:
        elastic_cluster["signal_train_workers"](signal.SIGCONT)
        if driver.poll() is None:
            driver.kill()
    console = text()
    assert "2 -> 1 workers (preemption notice (nodes " in console, console[-4000:]

    # MLflow: world size per step (2, then 1, then 2 again), each resize and the notice as
    # events with their cause, the same lr at every step, every step's record once
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("el-test")
    (run,) = client.search_runs([exp.experiment_id], "tags.kind = 'stage'")
    rid = run.info.run_id
    world = [int(m.value) for m in sorted(client.get_metric_history(rid, "step/world_size"), key=lambda m: m.step)]
    changes = [w for i, w in enumerate(world) if i == 0 or w != world[i - 1]]
    assert changes == [2, 1, 2, 1], world
    assert [m.step for m in sorted(client.get_metric_history(rid, "step/train_loss"), key=lambda m: m.step)] == \
        step_records(EPOCHS, STEPS, 1, checkpoint_every=3)
    lrs = client.get_metric_history(rid, "step/lr")
    assert lrs and all(m.value == pytest.approx(0.1 * BATCH / 256) for m in lrs)
    events = {k: v for k, v in run.data.tags.items() if k.startswith("event.")}
    kinds = [k.rsplit(".", 1)[1] for k in sorted(events)]
    assert kinds.count("preemption") >= 1 and kinds.count("resize") >= 3, events
    shrink = next(v for k, v in sorted(events.items()) if k.endswith(".resize"))
    assert "2 -> 1 workers" in shrink and "preemption notice" in shrink and "global batch 16" in shrink

    # every image of every epoch exactly once: a step redone after a restart reads the same keys
    by_step: dict = defaultdict(Counter)
    for f in keys.glob("A-*.txt"):
        for line in f.read_text().splitlines():
            epoch, step, key = line.split()
            by_step[int(epoch), int(step)][key] += 1
    assert sorted(by_step) == [(e, s) for e in range(EPOCHS) for s in range(STEPS)]
    for epoch in range(EPOCHS):
        keys_of = [set(by_step[epoch, s]) for s in range(STEPS)]
        assert all(len(k) == BATCH for k in keys_of)
        assert len(set().union(*keys_of)) == STEPS * BATCH  # no image in two steps of one epoch
    # What a restart redoes is the steps read after the checkpoint it resumes from: the
    # shrink resumed at the notice's own checkpoint (or one written after it, at the same
    # epoch or later), and no restart redid an epoch
    notice = re.search(r"drain notice for node\(s\) \w+ at epoch (\d+) step (\d+)", console)
    shrink = re.search(r"resize: 2 -> 1 workers .*?resumed (?:at epoch (\d+) image (\d+)|after epoch (\d+))", console)
    at = ((int(shrink.group(1)), int(shrink.group(2)) // BATCH) if shrink.group(1)
          else (int(shrink.group(3)) + 1, 0))
    assert at >= (int(notice.group(1)), int(notice.group(2))), (notice[0], shrink[0])
    redone = sum(sum(c.values()) for c in by_step.values()) - EPOCHS * STEPS * BATCH
    assert 0 <= redone < 3 * STEPS * BATCH, redone
    # The unannounced loss cost at most checkpoint_every_steps (3) steps of work: the steps
    # read again are those after the last committed checkpoint, plus the one in flight at
    # the kill (read, never finished)
    lost = re.search(r"resize: 2 -> 1 workers \(a node lost without notice.*?resumed (?:at epoch (\d+) image (\d+)"
                     r"|after epoch (\d+))", console)
    resumed = ((int(lost.group(1)) - 1, int(lost.group(2)) // BATCH) if lost.group(1)
               else (int(lost.group(3)), 0))
    resumed_at = resumed[0] * STEPS + resumed[1]
    assert resumed_at >= taken, (taken, lost[0])  # no checkpoint Ray Train had taken was lost
    read_again = (last_read[0] * STEPS + last_read[1]) - resumed_at + 1
    # at most checkpoint_every_steps (3) and the step in flight, and one interval more for a
    # checkpoint still on its way to the controller at the loss (uploading in the background,
    # or not yet polled: RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default, 0.2 s here)
    assert 0 <= read_again <= 3 + 1 + 3, (last_read, taken, lost[0])

    # the final weights: the same recipe on one fixed worker, in this process, without Ray.
    # The stage's last checkpoint is the one Ray Train committed last, read back as a resume
    # reads it: a folder of a worker killed while uploading may lie beside it, torn and
    # never reported (Ray Train copies a checkpoint straight into its final folder).
    from pipeline.stageloop import Seat, read_checkpoint, run_stage
    from pipeline.worker import stored_outcome

    final = read_checkpoint(Path(stored_outcome(str(tmp_path / "runs"), "el-1-A").checkpoint.path))
    assert (final["epoch"], final["step"]) == (EPOCHS - 1, STEPS)
    plan = load_plan(path, plan_args[1:])
    stage = plan.stages["A"]
    stage = replace(stage, resources=replace(stage.resources, num_workers=1))
    states: list = []

    def report(metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            states.append(read_checkpoint(Path(checkpoint_dir)))

    run_stage({"stage": stage, "data": replace(plan.data, keys_log=None)},
              Seat(rank=0, world=1, device=torch.device("cpu"), report=report, wrap=lambda m: m))
    reference = states[-1]["model"]
    # Equal to the bit: a step's gradient is (g_a + g_b) / 2 from DDP on two ranks and
    # g_a / 2 + g_b / 2 from two accumulated micro-batches on one, and halving is exact in
    # binary floating point; the data, its draws and its order are the same at any size.
    assert all(torch.equal(final["model"][k], reference[k]) for k in reference), \
        max(float((final["model"][k] - reference[k]).abs().max()) for k in reference)
