"""A stage that cannot learn FAILS, everywhere a user looks: exit status, MLflow run
status, the registry, the results table. Real Ray Train (gloo; X on 2 workers), real DALI,
real MLflow; the failures are real: an lr of ~0 leaves the net at chance, an lr of
1000 makes the loss non-finite within a few steps. A failure stops only its own branch:
its dependant is not started, and an independent stage finishes."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
from services import tiny_plan

from pipeline.cli import main as cli_main

pytestmark = pytest.mark.slow
ONE = {"num_workers": 1, "cpus_per_worker": 1}


def stage_runs(client, experiment: str) -> dict[str, list]:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'stage'", order_by=["attributes.start_time ASC"])
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.data.tags["stage"], []).append(r)
    return out


def test_stalled_and_diverged_stages_fail_and_a_fixed_recipe_fine_tunes_from_the_last_good_checkpoint(
        tmp_path, shards, ray_cluster, mlflow_uri, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    plan = tiny_plan(tmp_path, shards, name="fail", experiment="fail-test", epochs=3, log_every_steps=1,
                     optim={"lr": 1.0e-9, "patience": 50}, stall_epochs=2, chance_margin=30.0,
                     # A and B on one worker each: what fails here is the recipe, and a rank that
                     # sees its loss explode stopping every other rank is X's part (2 workers)
                     stages={"A": {"arch": "A", "scale": 36, "resources": ONE},  # lr ~0: at chance after 2 epochs
                             "B": {"arch": "B", "scale": 36, "init_from": {"stage": "A"}, "recipe": {"epochs": 1},
                                   "resources": ONE},
                             "X": {"arch": "A", "scale": 36, "recipe": {"optim": {"lr": 1000.0}}},  # diverges
                             # independent of A and X (and trained beside A on the 2 CPUs): it learns and
                             # finishes, as a failure stops only its own branch
                             "A-LRN": {"arch": "A-LRN", "scale": 36, "resources": ONE,
                                       "recipe": {"epochs": 1, "stall_epochs": 0, "optim": {"lr": 0.05}}}})
    argv = ["train", "--plan", str(plan), "--run-name", "fail-1"]
    assert cli_main(argv) == 1
    out = capsys.readouterr()
    assert "stage A FAILED (stalled) in epoch 2: validation top-1 error" in out.err
    assert "of chance (83.33% for 6 classes)" in out.err and "Nothing was registered" in out.err
    assert "stage X FAILED (diverged) in epoch 1: [X] epoch 1: loss became non-finite between steps" in out.err
    assert "not started: B (A failed)" in out.err and "add --run-name fail-1: finished stages are kept" in out.err
    assert "X failed before its first checkpoint" not in out.err and "no good weights to keep" in out.err
    table = [line for line in out.out.splitlines() if line.startswith("| ")]
    assert any("| A " in r and "FAILED (STALLED)" in r for r in table)
    assert any("| B " in r and "NOT STARTED" in r for r in table)
    assert any(r.startswith("| A-LRN ") and " finished " in r for r in table), table

    client = MlflowClient(mlflow_uri)
    runs = stage_runs(client, "fail-test")
    assert set(runs) == {"A", "X", "A-LRN"}  # B never started, so it has no run
    (a,), (x,), (lrn,) = runs["A"], runs["X"], runs["A-LRN"]
    assert lrn.info.status == "FINISHED" and lrn.data.tags["stage_status"] == "finished"
    for run, kind in ((a, "stalled"), (x, "diverged")):
        assert run.info.status == "FAILED" and run.data.tags["stage_status"] == "failed"
        assert run.data.tags["failure_kind"] == kind and f"FAILED ({kind})" in run.data.tags["failure"]
    assert a.data.tags["failure_epoch"] == "2"
    last_good = a.data.tags["last_good_checkpoint"]
    assert (Path(last_good) / "state.pt").is_file()  # epoch 1's checkpoint; epoch 2's weights were not saved
    assert x.data.tags["last_good_checkpoint"] == "none"  # it diverged before its first checkpoint
    # the failing epoch's figures are in MLflow; so are the step records up to the explosion
    assert [m.step for m in client.get_metric_history(a.info.run_id, "val_top1_error")] == [0, 1]
    steps = client.get_metric_history(x.info.run_id, "step/train_loss")
    assert steps and all(math.isfinite(m.value) for m in steps)
    assert [m.step for m in steps] == list(range(1, len(steps) + 1))
    parent = client.search_runs([client.get_experiment_by_name("fail-test").experiment_id], "tags.kind = 'plan'")[0]
    assert parent.info.status == "FAILED" and parent.data.tags["failed_stages"] == "A, X"
    assert parent.data.tags["not_started_stages"] == "B (A failed)"
    assert {m.name for m in client.search_registered_models()} == {"fail-test-A-LRN"}  # none of a failed net
    _booking_from_storage(tmp_path, shards, plan, parent.info.run_id, mlflow_uri)

    # The same command again would repeat the failure: refused at once, nothing new trained.
    assert cli_main(argv) == 1
    assert "already FAILED (stalled) in plan run fail-1 with this same recipe" in capsys.readouterr().out
    assert {k: len(v) for k, v in stage_runs(client, "fail-test").items()} == {"A": 1, "X": 1, "A-LRN": 1}

    # A fixed recipe under the same plan run: A fine-tunes from its last good checkpoint in
    # a new MLflow run (the failed attempt stays as it was), B follows, X starts afresh.
    fixed = ["--set", "optim.lr=0.05", "--set", "stages.X.recipe.optim.lr=0.05", "--set", "recipe.stall_epochs=0",
             "--set", "recipe.epochs=2"]
    assert cli_main(argv + fixed) == 0, capsys.readouterr()
    runs = stage_runs(client, "fail-test")
    a_failed, a2 = runs["A"]
    assert a_failed.info.run_id == a.info.run_id and a_failed.info.status == "FAILED"
    assert a2.info.status == "FINISHED" and a2.data.tags["attempt"] == "2"
    assert a2.data.tags["retry_of"] == a.info.run_id and a2.data.tags["init_checkpoint"] == last_good
    assert a2.data.params["recipe.optim.lr"] == "0.05"
    assert runs["B"][0].info.status == "FINISHED" and runs["X"][-1].info.status == "FINISHED"
    assert "init_checkpoint" not in runs["X"][-1].data.tags
    assert len(runs["A-LRN"]) == 1  # finished in this plan run: kept, not trained again
    assert {m.name for m in client.search_registered_models()} == {"fail-test-A", "fail-test-B", "fail-test-A-LRN"}

    # prune on this real Ray Train storage: one plan run, so its latest attempts stay; A's failed
    # first attempt was replaced, but its last good checkpoint is where the second one started
    from pipeline.prune import prune

    from ray.train import Result

    storage = tmp_path / "runs"
    committed = {os.path.realpath(c.path) for trial in storage.glob("*/checkpoint_manager_snapshot.json")
                 for c, _ in (Result.from_path(str(trial.parent)).best_checkpoints or [])}  # Ray Train's reading
    # beside B's committed checkpoints: one a stopped worker uploaded but never reported,
    # and one cut short mid-upload (Ray Train copies straight into the final folder)
    b_done = Path(runs["B"][0].data.tags["checkpoint"])
    orphan, torn = (b_done.parent / f"checkpoint_2099-01-01_00-00-0{i}.000000" for i in (1, 2))
    shutil.copytree(b_done, orphan)
    shutil.copytree(b_done, torn)
    (torn / "weights.pt").write_bytes((b_done / "weights.pt").read_bytes()[:4096])
    written = (b_done / "weights.pt").stat()
    os.utime(torn / "weights.pt", ns=(written.st_atime_ns, written.st_mtime_ns))  # cut short back then
    said: list[str] = []
    verdicts = prune(str(storage), 1, mlflow_uri, say=said.append)
    removed = {v.path: v.why for v in verdicts if v.remove}
    assert {str(orphan), str(torn)} <= set(removed), said
    # nothing else but folders Ray Train never listed (a real run may leave one of its own)
    assert all("not in Ray Train's record of the run" in why for why in removed.values()), said
    assert committed and not committed & set(removed), said
    assert {v.path: v.why for v in verdicts}[last_good] == "named by stage run fail-1/A (attempt 2)", said


def _booking_from_storage(tmp_path: Path, shards: Path, plan_file: Path, parent_id: str, uri: str) -> None:
    """The rerun's way to book a stage trained to its end but never booked (pipeline/booking.py),
    on A-LRN's real Ray Train storage and MLflow run: it reads back the very checkpoint its
    training ended with, and declines (so that Ray Train resumes the stage instead) where
    the stage has a later checkpoint since or the shard set changed."""
    from dataclasses import replace

    from pipeline.booking import trained_earlier
    from pipeline.stages import load_plan
    from pipeline.tracking import Tracker
    from pipeline.worker import checkpoint_uri

    plan = load_plan(plan_file)
    tracker = Tracker(uri, "fail-test")
    srun = tracker.stage_run(parent_id, "fail-1", "A-LRN", {}, {})  # the finished run, found again
    said: list[str] = []

    def shortcut(p=plan, run=srun):
        return trained_earlier(tracker, p, p.stages["A-LRN"], run, str(tmp_path / "runs"), run.tags["trial"],
                               said.append)

    outcome = shortcut().result()
    assert checkpoint_uri(outcome.checkpoint) == srun.tags["training_ended_at"] == srun.checkpoint
    assert outcome.metrics["epoch"] == 0 and "val_top1_error" in outcome.metrics
    moved = replace(srun, tags=dict(srun.tags, training_ended_at=f"{srun.checkpoint}-an-earlier-one"))
    assert shortcut(run=moved) is None and "it has a later checkpoint: resuming it with Ray Train" in said[-1], said
    other = tmp_path / "rebuilt-shards"  # the same root path's content rebuilt: another class list
    shutil.copytree(shards, other)
    (other / "classes.json").write_text((other / "classes.json").read_text() + "\n")
    assert shortcut(p=replace(plan, data=replace(plan.data, root=str(other)))) is None
    assert "the shard set changed: resuming it with Ray Train" in said[-1], said
