"""`python -m pipeline prune --keep-last N` on a real storage folder (checkpoints written
by the stage loop's own writer, in Ray Train's layout) against a real MLflow store with a
registered model version; and the weights-only read that init_from and booking use.
(tests/test_failures.py prunes the storage of a real Ray Train plan run too.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from pipeline.cli import main as cli_main
from pipeline.models import build_model
from pipeline.prune import prune
from pipeline.stageloop import CHECKPOINT_FILE, WEIGHTS_FILE, write_checkpoint


def _checkpoint(folder, seed: int = 0) -> str:
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    net = build_model("A", num_classes=6, width_mult=0.125, input_size=32)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.zeros(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # momentum buffers: the optimizer state is as large as the weights
    write_checkpoint(folder, {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0,
                              "step": 9, "arch": "A", "num_classes": 6, "mean_rgb": [1.0, 2.0, 3.0]})
    return str(folder)


def test_prune_keeps_what_a_registered_version_a_running_plan_run_or_a_retry_needs(tmp_path, mlflow_uri,
                                                                                   monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    storage = tmp_path / "runs"
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("prune")
    clock = iter(range(1_000_000, 2_000_000, 1000))  # runs in the order they are made

    def stage_run(plan_run: str, stage: str, trial: str, status: str, attempt: int = 1, **tags) -> str:
        run = client.create_run(exp, start_time=next(clock), tags={
            "kind": "stage", "plan_run": plan_run, "stage": stage, "trial": trial, "attempt": str(attempt), **tags})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    def plan_run(name: str, status: str) -> None:
        run = client.create_run(exp, start_time=next(clock), tags={"kind": "plan", "plan_run": name})
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)

    ck = {name: _checkpoint(storage / name.split(":")[0] / f"checkpoint_{name.split(':')[1]}")
          for name in ("p3-A:1", "p3-A:2", "p1-A:1", "p1-A:2", "p1-B:1", "p1-B:2", "p2-A:1", "p2-A:2",
                       "p2-A-attempt2:1", "p2-A-attempt2:2", "p2-A-attempt2:3", "p2-A-attempt2:4",
                       "p2-A-attempt2:5", "p2-A-attempt2:6", "p2-X:1", "stray:1")}
    (storage / "p1-B" / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own file beside them
    # Ray Train's record of a run (the fields of its 2.x checkpoint_manager_snapshot.json
    # that name folders): attempt 2 committed checkpoint_1; checkpoint_2 was uploaded but
    # never reported, checkpoint_3 cut short mid-upload, checkpoint_4 is named by a tag,
    # checkpoint_5 is newer than the record (a rerun uploading it), checkpoint_6 registered.
    # X's record lists only a folder since deleted.
    for trial, listed in (("p2-A-attempt2", "checkpoint_1"), ("p3-A", "checkpoint_1"), ("p2-X", "checkpoint_9")):
        result = {"version": 0, "checkpoint_dir_name": listed, "metrics": {"epoch": 0}}
        (storage / trial / "checkpoint_manager_snapshot.json").write_text(json.dumps(
            {"ray_version": "2.x", "checkpoint_results": [result], "checkpoint_report_indices": [0],
             "latest_checkpoint_result": result, "pending_training_results": [], "current_report_index": 1}))
    torn = Path(ck["p2-A-attempt2:3"]) / WEIGHTS_FILE
    torn.write_bytes(torn.read_bytes()[:1000])
    now = time.time()  # the order of writes, as Ray Train makes it: checkpoints, then the record, then a rerun's
    for f in storage.rglob("*"):
        age = 100 if Path(ck["p2-A-attempt2:5"]) in f.parents else 200 if f.name.endswith(".json") else 300
        os.utime(f, (now - age, now - age))
    plan_run("p3", "RUNNING")  # the oldest, but a driver may still be resuming it
    stage_run("p3", "A", "p3-A", "RUNNING")
    plan_run("p1", "FINISHED")
    a1 = stage_run("p1", "A", "p1-A", "FINISHED", checkpoint=ck["p1-A:2"])
    stage_run("p1", "B", "p1-B", "FINISHED", checkpoint=ck["p1-B:2"])  # its version was deleted: nothing needs it
    plan_run("p2", "FAILED")  # the newest: a failed attempt, then a retry from its last good checkpoint
    stage_run("p2", "A", "p2-A", "FAILED", last_good_checkpoint=ck["p2-A:1"])
    stage_run("p2", "A", "p2-A-attempt2", "FAILED", attempt=2, init_checkpoint=ck["p2-A:1"],
              last_good_checkpoint=ck["p2-A-attempt2:4"])
    stage_run("p2", "X", "p2-X", "FINISHED")
    client.create_registered_model("prune-A")
    client.create_model_version("prune-A", source=f"runs:/{a1}/model", run_id=a1)
    other = client.create_run(exp, tags={"checkpoint": ck["p2-A-attempt2:6"]}).info.run_id  # not a stage run
    client.create_registered_model("prune-other")
    client.create_model_version("prune-other", source=f"runs:/{other}/model", run_id=other)

    said: list[str] = []
    verdicts = prune(str(storage), 1, mlflow_uri, say=said.append)  # a dry run: nothing goes
    removed = {v.path: v.why for v in verdicts if v.remove}
    assert set(removed) == {ck["p1-A:1"], str(storage / "p1-B"), ck["p2-A:2"], ck["p2-A-attempt2:2"],
                            ck["p2-A-attempt2:3"], ck["p2-X:1"]}, said
    assert "older than the last 1 plan run(s)" in removed[ck["p1-A:1"]]
    assert "the whole Ray Train run" in removed[str(storage / "p1-B")]
    assert "a later attempt exists" in removed[ck["p2-A:2"]]
    for orphan in ("p2-A-attempt2:2", "p2-A-attempt2:3", "p2-X:1"):  # inside runs that stay, their records too
        assert "not in Ray Train's record of the run" in removed[ck[orphan]], said
    kept = {v.path: v.why for v in verdicts if not v.remove}
    assert kept[ck["p1-A:2"]] == "registered as prune-A v1"
    assert "the plan run is RUNNING" in kept[ck["p3-A:1"]]
    assert "the plan run is RUNNING" in kept[ck["p3-A:2"]]  # unlisted, but it may be uploading now
    assert "named by stage run p2/A (attempt 2)" in kept[ck["p2-A:1"]]
    assert "one of the last 1 plan run(s)" in kept[ck["p2-A-attempt2:1"]]
    assert "one of the last 1 plan run(s)" in kept[ck["p2-A-attempt2:4"]]  # unlisted, but a tag names it
    assert "one of the last 1 plan run(s)" in kept[ck["p2-A-attempt2:5"]]  # unlisted, but newer than the record
    assert "one of the last 1 plan run(s)" in kept[ck["p2-A-attempt2:6"]]  # unlisted, but registered
    assert "no MLflow stage run" in kept[ck["stray:1"]]
    size = sum(f.stat().st_size for p in removed for f in Path(p).rglob("*") if f.is_file())
    assert all(Path(p).exists() for p in removed)
    assert said[-1].startswith("prune: 6 folder(s)") and "would be freed" in said[-1] and "--yes" in said[-1]
    assert any(line.startswith(f"would remove {ck['p1-A:1']} (") for line in said)
    assert size > 0 and verdicts and sum(v.bytes for v in verdicts if v.remove) == size

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    assert cli_main(["prune", "--storage", str(storage), "--keep-last", "1", "--yes"]) == 0
    assert "6 folder(s)" in capsys.readouterr().out
    left = {str(p.parent) if p.name == CHECKPOINT_FILE else None for p in storage.rglob(CHECKPOINT_FILE)}
    assert left == {ck[k] for k in ("p3-A:1", "p3-A:2", "p1-A:2", "p2-A:1", "p2-A-attempt2:1", "p2-A-attempt2:4",
                                    "p2-A-attempt2:5", "p2-A-attempt2:6", "stray:1")}
    assert not (storage / "p1-B").exists()
    for trial in ("p2-A-attempt2", "p2-X"):  # the records stay, even one that lists no folder left
        assert (storage / trial / "checkpoint_manager_snapshot.json").is_file()
    # a tracking store that does not answer: nothing is judged, nothing deleted
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert cli_main(["prune", "--storage", str(storage), "--keep-last", "1", "--yes"]) == 2
    assert "nothing was removed" in capsys.readouterr().err


def test_a_rerun_that_starts_while_prune_reads_the_storage_keeps_its_folders(tmp_path, mlflow_uri, monkeypatch):
    """The facts are read again after the storage: a plan run rerun between the two reads
    (a driver started with its --run-name) keeps the folder Ray Train's record does not
    list, which it may be uploading; without the rerun that folder goes."""
    from mlflow.tracking import MlflowClient

    import pipeline.tracking

    storage = tmp_path / "runs"
    listed, orphan = _checkpoint(storage / "p-A" / "checkpoint_1"), _checkpoint(storage / "p-A" / "checkpoint_2", 1)
    result = {"version": 0, "checkpoint_dir_name": "checkpoint_1", "metrics": {"epoch": 0}}
    (storage / "p-A" / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoint_results": [result]}))
    os.utime(storage / "p-A" / "checkpoint_manager_snapshot.json", (time.time() + 60, time.time() + 60))
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("prune-race")
    runs = [client.create_run(exp, tags={"plan_run": "p", **tags}).info.run_id
            for tags in ({"kind": "plan"}, {"kind": "stage", "stage": "A", "trial": "p-A", "checkpoint": listed})]
    for run_id in runs:
        client.set_terminated(run_id, "FINISHED")
    assert {v.path for v in prune(str(storage), 1, mlflow_uri, say=[].append) if v.remove} == {orphan}

    facts = pipeline.tracking.checkpoint_references

    def rerun_meanwhile(uri: str) -> dict:
        """The store's facts; on the first read, a driver reruns plan run p just after."""
        got = facts(uri)
        if not reads:
            client.update_run(runs[0], status="RUNNING")  # as pipeline/tracking.py resumes a plan run
        reads.append(uri)
        return got

    reads: list[str] = []
    monkeypatch.setattr(pipeline.tracking, "checkpoint_references", rerun_meanwhile)
    said: list[str] = []
    verdicts = prune(str(storage), 1, mlflow_uri, yes=True, say=said.append)
    assert len(reads) == 2 and not any(v.remove for v in verdicts), said
    assert "the plan run is RUNNING" in {v.path: v.why for v in verdicts}[orphan]
    assert Path(orphan).is_dir()


def test_init_from_and_booking_read_the_weights_file_alone(tmp_path):
    """The weights file is all that is read: a checkpoint whose training state is
    unreadable still gives its weights; a resume reads both files; and a checkpoint from
    before the split (everything in state.pt) still loads."""
    import ray.train

    from pipeline.worker import _load_state, load_checkpoint_model

    folder = _checkpoint(tmp_path / "ck")
    state = _load_state(ray.train.Checkpoint(folder))
    assert {"model", "optimizer", "epoch", "mean_rgb"} <= set(state)
    weights = torch.load(f"{folder}/{WEIGHTS_FILE}", weights_only=False)
    assert "optimizer" not in weights and "model" not in torch.load(f"{folder}/{CHECKPOINT_FILE}",
                                                                    weights_only=False)
    (tmp_path / "ck" / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    got = load_checkpoint_model(ray.train.Checkpoint(folder))
    assert set(got) == {"model", "arch", "num_classes", "mean_rgb"}
    assert all(torch.equal(got["model"][k], v) for k, v in state["model"].items())
    old = tmp_path / "old"
    old.mkdir()
    torch.save(state, old / CHECKPOINT_FILE)  # one file, as every checkpoint was before
    last = sorted(state["model"])[-1]
    assert torch.equal(load_checkpoint_model(ray.train.Checkpoint(str(old)))["model"][last], state["model"][last])
