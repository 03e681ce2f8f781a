"""The command line as users run it: every verb's --help, `models`, and `demo` end to end
(real shards, Ray, DALI, MLflow), then `report` and `evaluate` on what it made."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VERBS = ["demo", "train", "evaluate", "ensemble", "report", "bench", "models"]


def run(args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_every_verb_has_help(capsys):
    out = run(["--help"])  # the real entry point once; each verb's parser in this process (a torch import each)
    assert out.returncode == 0 and all(verb in out.stdout for verb in VERBS)
    from pipeline.cli import main

    for verb in VERBS + ["bench loader", "bench train", "bench eval", "bench shard", "bench gpu"]:
        with pytest.raises(SystemExit) as exit_:
            main([*verb.split(), "--help"])
        assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: python -m pipeline {verb}")


def test_shard_help_documents_every_option():
    out = subprocess.run([sys.executable, str(REPO / "data_prep" / "shard.py"), "--help"], capture_output=True,
                         text=True)
    for option in ("--src", "--out", "--splits", "--samples-per-shard", "--workers", "--resize-shorter", "--seed",
                   "--strict", "--verify"):
        assert option in out.stdout


def test_models_table(capsys):
    out = in_process(["models"], capsys)
    assert out.returncode == 0
    assert re.search(r"^D\s+16\s+138,357,544\s+15\.47", out.stdout, re.M)
    assert re.search(r"^E\s+19\s+143,667,240", out.stdout, re.M)


def test_train_dry_run_prints_the_papers_order(capsys):
    out = in_process(["train", "--plan", str(REPO / "pipeline/plans/paper.yaml"), "--dry-run"], capsys)
    assert out.returncode == 0
    lines = [line.split(":")[0] for line in out.stdout.splitlines()]
    assert lines[0] == "plan paper, recipe" and "recipe: paper (deviation from the paper: bf16_autocast:" in out.stdout
    assert "float16_batches:" in out.stdout.splitlines()[0]  # every declared deviation, where the plan is shown
    assert lines.index("A") < lines.index("D-256") < lines.index("D-384") < lines.index("D-multi")
    assert "D-384: D S=384 <- D-256" in out.stdout and "warmup" not in out.stdout
    # 12 stages, 4 waves deep: what a parallel schedule runs side by side
    assert "  wave 1: A, A-LRN\n  wave 2: B-256, C-256, D-256, E-256\n  wave 3: C-384, D-384, E-384\n" \
           "  wave 4: C-multi, D-multi, E-multi\n" in out.stdout


def test_dry_run_estimates_the_plan_on_n_gpus(tmp_path, capsys):
    from pipeline.schedule import estimate, measured_throughput
    from pipeline.stages import PLANS_DIR, load_plan

    out = in_process(["train", "--plan", str(REPO / "pipeline/plans/paper.yaml"), "--dry-run", "--gpus", "32",
                      "--throughput", "D=1500"], capsys)
    assert out.returncode == 0, out.stderr
    assert "estimate on 32 GPUs, 1,281,167 training images, throughput from --throughput" in out.stdout
    assert "critical path A -> E-256 -> E-384 -> E-multi" in out.stdout
    plan = load_plan(PLANS_DIR / "paper.yaml")
    e = estimate(plan, 32, {"D": 1500.0}, 1_281_167)
    hours = {s.stage: s for s in e["stages"]}
    d = hours["D-256"]
    assert d.hours == pytest.approx(74 * 1_281_167 / (1500 * 8) / 3600) and not d.scaled
    assert hours["E-256"].scaled and hours["E-256"].img_s_per_gpu < 1500  # E costs more GMACs than D
    # on 32 GPUs the 4 waves overlap: the critical path bounds it; one stage at a time is the sum
    assert e["parallel_hours"] == pytest.approx(e["critical_path_hours"])
    assert e["sequential_hours"] == pytest.approx(sum(s.hours for s in e["stages"]))
    assert e["sequential_hours"] > 2 * e["parallel_hours"]
    # on 8 GPUs nothing runs side by side: parallel = sequential
    assert estimate(plan, 8, {"D": 1500.0}, 1_281_167)["parallel_hours"] == pytest.approx(e["sequential_hours"])
    # a bench gpu result is read when no figure is given
    results = tmp_path / "results"
    results.mkdir()
    (results / "gpu-h100.json").write_text(json.dumps({
        "environment": {"device": "cuda:0", "device_name": "NVIDIA H100", "date": "2026-11-23"},
        "train": {"crop": 224, "batch_256": {"loader_fed": {"img_s": 1234.0}},
                  "batch_128": {"loader_fed": {"img_s": 1100.0}}}}))
    rates, source = measured_throughput(results)
    assert rates == {"D": 1234.0} and "NVIDIA H100" in source
    assert in_process(["train", "--plan", str(REPO / "pipeline/plans/paper.yaml"), "--dry-run", "--gpus", "4",
                       "--throughput", "D=1"], capsys).returncode == 2  # a stage of 8 GPUs cannot fit on 4


def test_paper_fast_is_the_paper_plan_at_batch_2048_with_warmup_and_says_so(capsys):
    from pipeline.engine import effective_lr
    from pipeline.stages import PLANS_DIR, load_plan

    paper, fast = load_plan(PLANS_DIR / "paper.yaml"), load_plan(PLANS_DIR / "paper-fast.yaml")
    assert list(fast.stages) == list(paper.stages) and fast.experiment == "vgg-paper-fast"
    a = fast.stages["A"].recipe
    assert a.batch_size == 2048 and a.optim.warmup_epochs == 5 and effective_lr(a.optim, 2048) == 0.08
    assert fast.stages["D-384"].recipe.optim.lr == 0.001  # per-stage overrides of the base plan survive
    assert "; global_batch: global batch 2048" in fast.recipe_label  # added to paper.yaml's own items
    assert paper.deviation in fast.recipe_label and paper.recipe_label.startswith("paper (deviation from the paper: ")
    out = in_process(["train", "--plan", str(REPO / "pipeline/plans/paper-fast.yaml"), "--dry-run"], capsys)
    assert out.returncode == 0 and "deviation from the paper" in out.stdout
    assert "A: A S=256, 74 epochs, batch 2048, lr 0.01, warmup 5 epochs" in out.stdout


def in_process(argv, capsys):
    """A command as `python -m pipeline` runs it, in this process (no torch/MLflow import
    to pay again), with what it printed and its exit status."""
    from types import SimpleNamespace

    from pipeline.cli import main

    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:  # what Python prints and returns for an uncaught SystemExit
        rc = exc.code if isinstance(exc.code, int) else 1
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    out = capsys.readouterr()
    return SimpleNamespace(returncode=rc, stdout=out.out, stderr=out.err)


@pytest.mark.slow
def test_demo_end_to_end_then_report_and_evaluate(tmp_path, mlflow_uri, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri, RAY_TRAIN_ENABLE_PREEMPTION_WATCHER="1")  # as users run
    out = run(["demo", "--workdir", str(tmp_path / "demo"), "--set", "stages.A.recipe.epochs=2",
               "--set", "stages.B.recipe.epochs=1"], env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "data_prep/shard.py" in out.stdout and "sharded train 600, val 150 images" in out.stdout
    console = out.stdout + out.stderr  # no Ray-internal chatter (pipeline/rayconsole.py), no traceback
    assert "'PreemptionWatcher'" not in console and "Traceback" not in console, console[-3000:]
    training = out.stdout.split("== the paper's test protocols")[0]
    table = [line for line in training.splitlines() if line.startswith("| A ") or line.startswith("| B ")]
    assert len(table) == 2
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in out.stdout

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("vgg-demo")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("kind") == "plan"]
    nested = [r for r in runs if r.data.tags.get("kind") == "stage"]
    assert len(parent) == 1 and len(nested) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in nested)
    assert all({"top1_error", "top5_error"} <= set(r.data.metrics) for r in nested)

    # the demo evaluated both nets under the paper's protocols, ensembled them, reported
    for r in nested:
        assert {"dense_Q64-72-81/top1_error", "multicrop_Q64-72-81/top1_error",
                "dense_multicrop_Q64-72-81/top1_error", "dense_Q72/top1_error"} <= set(r.data.metrics)
        stored = [f.path for f in client.list_artifacts(r.info.run_id, "posteriors")]
        assert "posteriors/dense_multicrop_Q64-72-81.parquet" in stored
    [ens] = [r for r in runs if r.data.tags.get("kind") == "ensemble"]
    assert set(ens.data.tags["members"].split(",")) == {r.info.run_id for r in nested}
    import mlflow
    import torch

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    ensemble = mlflow.pytorch.load_model(f"runs:/{ens.info.run_id}/model")  # averaged softmax of A and B
    probs = ensemble(torch.randn(3, 3, 64, 64))
    torch.testing.assert_close(probs.sum(1), torch.ones(3), atol=1e-4, rtol=0)
    # the registered ensemble (the champion's kind) classifies JPEG files on its own
    import mlflow.pyfunc

    jpegs = sorted((tmp_path / "demo" / "imagenet" / "val").rglob("*.JPEG"))[:3]
    rows = mlflow.pyfunc.load_model("models:/vgg-demo-ensemble/1").predict([p.read_bytes() for p in jpegs])
    assert list(rows["class_name"]) and all(len(t) == 5 for t in rows["top5_ids"])
    assert "## Table 6: ensembles" in out.stdout and "| ensemble-A+B (A,B) | - |" in out.stdout

    # the commands a user runs next, each as `python -m pipeline` runs it (in this process)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)

    def cli(argv, env=None):
        return in_process(argv, capsys)

    report = cli(["report", "--experiment", "vgg-demo", "--out", str(tmp_path / "report")], env=env)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| D | [256,512] | 25.6 / 8.1 | not trained |" in report.stdout
    # Table 3 of ours is dense at Q = S; the centre crop only in its own section
    table3 = report.stdout.split("## Table 3")[1].split("## Table 4")[0]
    assert re.search(r"\| A \(stage A\) \| 72 \| - \| [\d.]+ / [\d.]+ \(dense_Q72\) \[R\d+\] \|", table3)
    assert "(single_Q72)" in report.stdout.split("## Ours only")[1]
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"report.md", "report.html", "curves-A.png",
                                                                 "curves-B.png"}

    stage_a = next(r for r in nested if r.data.tags["stage"] == "A")
    ev = cli(["evaluate", "--run-id", stage_a.info.run_id, "--scale", "80"], env=env)  # the paper's dense by default
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "dense_Q80: top-1 error" in ev.stdout and "over 150 images" in ev.stdout
    metrics = client.get_run(stage_a.info.run_id).data.metrics
    assert "dense_Q80/top1_error" in metrics
    # our centre crop again at the training Q: the stage's own number comes back
    ev72 = cli(["evaluate", "--experiment", "vgg-demo", "--stage", "A", "--protocol", "single"], env=env)
    assert ev72.returncode == 0
    assert client.get_run(stage_a.info.run_id).data.metrics["single_Q72/top1_error"] == pytest.approx(
        metrics["top1_error"], abs=1e-6)
    # an ensemble named by stages, from the posteriors the demo stored
    en = cli(["ensemble", "A", "B", "--experiment", "vgg-demo", "--protocol", "dense", "--no-register"], env=env)
    assert en.returncode == 0, en.stderr[-2000:]
    assert "members A, B; dense_Q64-72-81: top-1 error" in en.stdout and "made before" not in en.stdout
    # the same ensemble again (now registered): found, not made a second time
    again = cli(["ensemble", "A", "B", "--experiment", "vgg-demo", "--protocol", "dense"], env=env)
    assert "ensemble: reading the stored dense_Q64-72-81 posteriors of 2 members" in en.stdout
    assert again.returncode == 0 and "made before: the same members, protocol and selection" in again.stdout
    assert "ensemble: registering vgg-demo-ensemble: loading 2 nets" in again.stdout
    assert again.stdout.split("(run ")[1][:32] == en.stdout.split("(run ")[1][:32]
    ensembles = client.search_runs([exp.experiment_id], "tags.kind = 'ensemble'")
    assert len(ensembles) == 2 and all(r.data.tags.get("registered") for r in ensembles)
    assert len(client.search_model_versions("name = 'vgg-demo-ensemble'")) == 2
    missing = cli(["ensemble", "A", "Z", "--experiment", "vgg-demo"], env=env)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "experiment vgg-demo: no finished run of stage 'Z'; finished stages there: A, B" in missing.stderr


def test_bench_loader_reports_both_loaders_on_the_same_shards(shards, tmp_path):
    out = tmp_path / "loader.json"
    res = run(["bench", "loader", "--shards", str(shards / "train" / "*.tar"), "--seconds", "1", "--batch-size", "8",
               "--scale", "72", "96", "--crop", "64", "--out", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    line = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    assert line["pipeline_img_s"] > 0 and line["baseline_img_s"] > 0
    assert line["ratio"] == pytest.approx(line["pipeline_img_s"] / line["baseline_img_s"], rel=1e-2)
    assert __import__("json").loads(out.read_text())["command"].startswith("python -m pipeline bench loader")


def test_bench_train_times_synthetic_and_loader_fed_steps(shards):
    res = run(["bench", "train", "--arch", "vgg16", "--shards", str(shards / "train" / "*.tar"), "--seconds", "1",
               "--batch-size", "8", "--width-mult", "0.125", "--scale", "36", "44", "--crop", "32"])
    assert res.returncode == 0, res.stderr[-2000:]
    line = __import__("json").loads(res.stdout.strip().splitlines()[-1])
    assert line["arch"] == "vgg16" and line["synthetic_steps"] > 0 and line["loader_steps"] > 0
    assert 0 <= line["data_wait_fraction"] < 1
    # the ratio comes from the unrounded rates, the rates are printed to 0.1 img/s (a slow
    # hour here gives a few img/s, where that rounding alone moves their ratio by 2%)
    loader, synthetic = line["loader_img_s"], line["synthetic_img_s"]
    assert (loader - 0.05) / (synthetic + 0.05) - 1e-3 <= line["loader_vs_synthetic"] <= \
        (loader + 0.05) / (synthetic - 0.05) + 1e-3


def test_bench_eval_times_both_memory_orders_and_their_outputs_agree(tmp_path, capsys):
    out = tmp_path / "eval.json"
    res = in_process(["bench", "eval", "--arch", "A", "--width-mult", "0.125", "--crop", "32", "--batch-size", "16",
                      "--seconds", "0.3", "--out", str(out)], capsys)
    assert res.returncode == 0, res.stderr[-2000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert line["nchw_img_s"] > 0 and line["channels_last_img_s"] > 0 and min(line["images"].values()) >= 16
    assert line["channels_last_vs_nchw"] == pytest.approx(line["channels_last_img_s"] / line["nchw_img_s"], rel=1e-2)
    assert line["max_abs_logit_diff"] < 1e-4  # the same posteriors in either order
    assert json.loads(out.read_text())["command"].startswith("python -m pipeline bench eval --arch A")
