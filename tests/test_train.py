"""A reduced plan on a real local Ray cluster (2 CPU workers, gloo DDP) with a real
MLflow SQLite store: runs nest, metrics land, the loss falls, B starts from A, a worker
SIGKILLed mid-stage resumes from its checkpoint (mid-epoch ones included) in the same
run with no gap or duplicate in any curve, and a rerun of the same plan run skips
finished stages. (A killed driver, resumed by rerunning the same command:
tests/test_parallel.py.)

It runs with the GPU recipe turned on, rehearsed on the CPU (issue 20): bf16 autocast,
channels_last (NHWC from the DALI graph), torch.compile (compile(DDP(net)), aot_eager backend: see below),
the fused SGD step and DDP's gradient_as_bucket_view, through a killed worker and its
resume, dense and multi-crop evaluation, registration and pyfunc classification. A GPU
run then has only CUDA's and DALI's GPU operators' own calls left to find fault with."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from services import own_train_workers, signal_processes, stage_history, step_records, tiny_plan, wait_for

from pipeline.stages import load_plan

pytestmark = pytest.mark.slow


def test_staged_plan_on_ray_tracks_everything_and_resumes(tmp_path, shards, ray_cluster, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pipeline.runner import run_plan
    from pipeline.worker import checkpoint_from_uri, load_checkpoint_model

    plan = load_plan(tiny_plan(
        tmp_path, shards, name="tiny", experiment="tiny-test", epochs=4, log_every_steps=2, max_failures=1,
        checkpoint_every_steps=4,  # mid-epoch checkpoints (steps 4 and 8 of 9) besides the epoch ends
        # compile through Dynamo, DDP's graph splitting and AOTAutograd without inductor's code
        # generation: on 2 shared cores inductor's CPU codegen cost 330 s of this test (694 s
        # cold against 363 s), and the code a GPU runs is Triton's, which only a GPU can show.
        precision="bf16", channels_last=True, compile="aot_eager",
        optim={"lr": 0.05, "patience": 5, "impl": "fused"},
        stages={"A": {"arch": "A", "scale": 36},
                # an lr of ~0 keeps B where init_from put it: A's tensors, by name (from A's
                # compiled, DDP-wrapped checkpoint, as the resume and the evaluation load it).
                # B itself is not compiled and runs on one worker: what it checks is the load
                # (DDP is A's part), and a second worker would pay torch's, DALI's and Dynamo's
                # start again.
                "B": {"arch": "B", "scale": [36, 48], "init_from": {"stage": "A"},
                      "resources": {"num_workers": 1, "cpus_per_worker": 1},
                      "recipe": {"epochs": 1, "compile": False,
                                 "optim": {"lr": 1.0e-12, "momentum": 0.0, "weight_decay": 0.0}}}}))
    outcome = {}

    def drive():
        try:
            outcome["results"] = run_plan(plan, run_name="tiny-1", tracking_uri=mlflow_uri)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    storage, steps_seen, streams = tmp_path / "runs", set(), []  # the checkpoints' steps and generators

    def a_epochs() -> int:
        for ckpt in sorted((storage / "tiny-1-A").glob("checkpoint_*")):
            try:
                state = torch.load(ckpt / "state.pt", weights_only=False)
                steps_seen.add(state["step"])
                streams.append(state["rng"])
            except Exception:  # noqa: BLE001 - being written or already rotated away
                pass
        try:
            return len(stage_history(mlflow_uri, "tiny-test", "A", "train_loss")[1])
        except Exception:  # noqa: BLE001 - the store or the run may not exist yet
            return 0

    driver = threading.Thread(target=drive)
    driver.start()
    # A worker dies once A's first epoch is registered; Ray Train restarts the group from
    # that checkpoint (saved from compile(DDP(net)): its keys must load back). A's two
    # workers are held still (SIGSTOP) for each check, so the kill lands mid-stage however
    # far MLflow's figures lag the workers.
    def held_mid_a() -> list[int]:
        """A's two workers, held, once A has a registered epoch and more to train."""
        workers = signal_processes(own_train_workers(), signal.SIGSTOP)
        if len(workers) == 2 and 1 <= a_epochs() < 4:  # B (after A) runs on one worker
            return workers
        signal_processes(workers, signal.SIGCONT)
        return []

    victims = wait_for(held_mid_a, 600, "stage A's first registered epoch, A's two workers held")
    os.kill(victims[-1], signal.SIGKILL)
    signal_processes(victims[:-1], signal.SIGCONT)
    driver.join(timeout=900)
    assert not driver.is_alive() and "error" not in outcome, outcome.get("error")
    # and the checkpoints A kept at its end: the ones polled above may all have been mid-epoch
    # (an epoch-end one can be rotated away before its epoch's figures reach MLflow)
    a_epochs()
    results = outcome["results"]
    assert [r.stage for r in results] == ["A", "B"] and not any(r.skipped for r in results)

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("tiny-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "plan"]
    stages = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("kind") == "stage"}
    assert len(parents) == 1 and set(stages) == {"A", "B"}
    parent = parents[0]
    assert parent.info.status == "FINISHED" and "best_top1_error" in parent.data.metrics
    for name, run in stages.items():
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["stage_status"] == "finished"
        assert 0 <= run.data.metrics["top1_error"] <= 100 and 0 <= run.data.metrics["top5_error"] <= 100
        assert run.data.tags["arch"] == name
    assert stages["B"].data.tags["init_from"] == "A" and stages["B"].data.tags["train_scale"] == "[36,48]"
    assert stages["A"].data.params["recipe.optim.lr"] == "0.05"

    # per-epoch metrics from rank 0; the loss falls over A's epochs
    history = client.get_metric_history(stages["A"].info.run_id, "train_loss")
    assert [m.step for m in history] == [0, 1, 2, 3]
    resumed = client.get_metric_history(stages["A"].info.run_id, "resumed_from_epoch")
    assert max(m.value for m in resumed) >= 0  # the restarted workers started from a checkpoint
    assert history[-1].value < history[0].value
    for key in ("val_top1_error", "val_top5_error", "lr", "images_per_sec", "data_wait_fraction"):
        assert len(client.get_metric_history(stages["A"].info.run_id, key)) == 4, key
    assert client.get_metric_history(stages["A"].info.run_id, "val_images")[0].value == 48  # each val image once
    # per-step curves every 2 steps (and at each epoch's end): 144 images / 16 = 9 steps an epoch
    # (and at the mid-epoch checkpoints, 4 and 8), each once across the kill and the resume
    per_step = sorted(client.get_metric_history(stages["A"].info.run_id, "step/train_loss"), key=lambda m: m.step)
    assert [m.step for m in per_step] == step_records(4, 9, 2, checkpoint_every=4)
    assert steps_seen & {4, 8} and 9 in steps_seen, steps_seen  # mid-epoch checkpoints besides the epoch ends
    ranks = streams[-1]["ranks"]  # every rank's own generator (each rank draws its own dropout masks)
    assert len(ranks) == 2 and not torch.equal(ranks[0]["cpu"], ranks[1]["cpu"])
    at_step = client.get_metric_history(stages["A"].info.run_id, "resumed_at_step")
    assert {m.value for m in at_step} <= {0, 4, 8}
    lrs = client.get_metric_history(stages["A"].info.run_id, "step/lr")
    assert all(m.value == pytest.approx(0.05 * 16 / 256) for m in lrs)  # the lr scaled to the global batch
    for key in ("step/lr", "step/images_per_sec", "step/data_wait_fraction"):
        assert len(client.get_metric_history(stages["A"].info.run_id, key)) == len(per_step), key
    # the node's machine figures beside them (one sampling worker per node; both workers share this one)
    system = [k for k in stages["A"].data.metrics if k.startswith("system/")]
    assert len({k.split("/")[1] for k in system}) == 1 and any(k.endswith("/cpu_utilization_percentage")
                                                               for k in system), system
    assert stages["A"].data.tags["recipe"] == "tiny; global batch 16, lr 0.05 at batch 256, no warmup"
    # as a training user expects the UI: the model-training view, descriptions, the data as an input
    from data_prep.store import data_hash

    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    described = stages["B"].data.tags["mlflow.note.content"]
    assert "VGG B trained at S=[36,48], initialised from A" in described
    assert "Final validation error: top-1" in described
    (inp,) = stages["A"].inputs.dataset_inputs
    assert inp.dataset.digest == data_hash(shards)[:32] and inp.dataset.name == f"shards:{shards.name}"
    assert [(t.key, t.value) for t in inp.tags] == [("mlflow.data.context", "training")]

    # B started from A's named tensors (conv1_1, conv2_1, conv3_1, conv3_2, fc6-fc8)
    a = load_checkpoint_model(checkpoint_from_uri(stages["A"].data.tags["checkpoint"]))["model"]
    b = load_checkpoint_model(checkpoint_from_uri(stages["B"].data.tags["checkpoint"]))["model"]
    assert torch.allclose(b["features.conv1_1.weight"], a["features.conv1_1.weight"], atol=1e-6)
    assert torch.allclose(b["features.conv3_2.weight"], a["features.conv3_2.weight"], atol=1e-6)
    assert torch.allclose(b["classifier.fc6.weight"], a["classifier.fc6.weight"], atol=1e-6)
    assert "features.conv1_2.weight" in b and "features.conv1_2.weight" not in a  # B's own layers stay random
    # dense and multi-crop evaluation of the compiled, DDP-wrapped net's checkpoint
    from pipeline.evaluate import evaluate_run

    both = evaluate_run(stages["A"].info.run_id, tracking_uri=mlflow_uri, protocol="dense+multicrop", scales=[36])
    assert both["images"] == 48 and 0 <= both["top1_error"] <= 100
    logged = client.get_run(stages["A"].info.run_id).data.metrics
    assert logged["dense_multicrop_Q36/top1_error"] == pytest.approx(both["top1_error"])
    # no Ray Data DatasetManager was started for these DALI-fed stages (one process fewer at
    # every worker-group start; pipeline/worker.py), while Ray Train's own helpers were
    # (the GCS's own table: this session's Ray runs without the dashboard the State API needs)
    actors = ray_cluster._private.state.actors().values()
    started = {a["ActorClassName"] for a in actors}
    assert "TrainController" in started and "DatasetManager" not in started, started
    # and every plan run ended its desk (its stages' MLflow sinks): none left in this process
    assert "_Desk" in started and not [a for a in actors if a["ActorClassName"] == "_Desk" and a["State"] == "ALIVE"]
    # the trained model is logged to MLflow and loads back
    import mlflow.pytorch

    model = mlflow.pytorch.load_model(f"runs:/{stages['A'].info.run_id}/model")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 6)
    # one registered model per arch; the version says which stage made it
    for arch in ("A", "B"):
        versions = client.search_model_versions(f"name='tiny-test-{arch}'")
        assert len(versions) == 1 and versions[0].tags["stage"] == arch
        assert versions[0].tags["recipe"].startswith("tiny; global batch 16")
        assert f"VGG {arch}" in versions[0].description
        assert versions[0].run_id == stages[arch].info.run_id

    # The registered version classifies images on its own, in a fresh process through MLflow's
    # own loader: real JPEG files in, class ids, names and top-5 out; its top-1 is the
    # pipeline's own single-scale evaluation of the same images.

    import pyarrow.parquet as pq

    from pipeline.dataset import DatasetInfo
    from pipeline.evaluate import load_stage_model, stage_from_run
    from pipeline.protocols import posteriors

    stage_a = stage_from_run(stages["A"])
    info = DatasetInfo.load(shards)
    ours = posteriors(load_stage_model(stage_a, stages["A"].data.tags["checkpoint"]), info, "val", "single",
                      [stage_a.eval_scale], crop=32, normalize_std=True, batch_size=8, threads=1)
    source = {r["key"]: r["source"] for r in pq.read_table(shards / "manifest.parquet").to_pylist()}
    files = [source[k] for k in ours.keys]
    script = ("import json, sys, mlflow.pyfunc; m = mlflow.pyfunc.load_model('models:/tiny-test-A/1'); "
              "out = m.predict([open(f, 'rb').read() for f in json.load(sys.stdin)]); "
              "print(json.dumps(out.to_dict('records')))")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(files), capture_output=True, text=True,
                          env=dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri), cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    names = {c["index"]: c["name"] for c in json.loads((shards / "classes.json").read_text())}
    assert len(rows) == 48 and all(r["class_name"] == names[r["class_id"]] and len(r["top5_ids"]) == 5 for r in rows)
    assert all(r["top5_probs"] == sorted(r["top5_probs"], reverse=True) and 0 < sum(r["top5_probs"]) <= 1 + 1e-5
               and r["top5_ids"][0] == r["class_id"] for r in rows), rows[0]
    agree = sum(r["class_id"] == int(p.argmax()) for r, p in zip(rows, ours.probs))
    assert agree == 48, f"top-1 agrees with the pipeline's evaluation on {agree} of 48 images"
    # MLflow's own CLI, offline, with JSON as a scoring request carries it (base64 images)
    request = {"dataframe_split": {"columns": ["image"],
                                   "data": [[base64.b64encode(Path(f).read_bytes()).decode()] for f in files[:6]]}}
    (tmp_path / "request.json").write_text(json.dumps(request))
    cli = subprocess.run([str(Path(sys.executable).parent / "mlflow"), "models", "predict", "-m",
                          "models:/tiny-test-A/1", "-i", str(tmp_path / "request.json"), "-t", "json",
                          "-o", str(tmp_path / "predictions.json"), "--env-manager", "local"],
                         capture_output=True, text=True, env=dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri),
                         cwd=tmp_path, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    predicted = json.loads((tmp_path / "predictions.json").read_text())["predictions"]
    assert [p["class_id"] for p in predicted] == [r["class_id"] for r in rows[:6]]
    assert mlflow.pytorch.load_model(f"runs:/{stages['A'].info.run_id}/model") is not None  # the plain module too

    # the same plan run again: both stages skipped, no new MLflow runs
    again = run_plan(plan, run_name="tiny-1", tracking_uri=mlflow_uri)
    assert all(r.skipped for r in again)
    assert [r.top1_error for r in again] == [r.top1_error for r in results]
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
