"""`python -m pipeline bench gpu`: the one-command GPU check, rehearsed on the CPU at toy
size so it cannot rot before a GPU runs it (same code; the "GPU" graphs are the CPU
ones, CUDA-only parts say skipped)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.cli import main as cli_main
from pipeline.bench.gpu_checks import PIXEL_TOLERANCE, _compare


def test_bench_gpu_on_cpu_checks_and_measures_every_part(tmp_path, capsys):
    out = tmp_path / "gpu-cpu.json"
    rc = cli_main(["bench", "gpu", "--device", "cpu", "--seconds", "0.3", "--out", str(out),
                   "--workdir", str(tmp_path)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    doc = json.loads(out.read_text())
    assert json.loads(printed.out.strip().splitlines()[-1])["ok"] is True and doc["ok"] is True
    assert doc["errors"] == {} and "GPU check on" in printed.err and "PASS" in printed.err
    env = doc["environment"]
    assert env["torch"] == torch.__version__ and env["dali"] and "bench gpu --device cpu" in env["command"]
    # ImageNet-like JPEGs cut from real photos, sharded by data_prep/shard.py, unevenly
    assert doc["data"]["source"].startswith("crops of scikit-image sample photos")
    assert doc["data"]["train_images"] == 60 and doc["data"]["val_images"] == 31
    checks = {c.get("graph") or c.get("check"): c for c in doc["correctness"]}
    for graph in ("train (draws fixed, roi decode)", "train (draws fixed, whole decode)", "centre crop", "dense",
                  "multi-crop", "evaluation over 3 ranks, uneven shards"):
        assert checks[graph]["ok"] is True, checks[graph]
    assert checks["evaluation over 3 ranks, uneven shards"]["unique"] == 31
    assert checks["torchvision key map"]["ok"] is None  # no torchvision on this machine: said, not passed
    loader = doc["loader"]
    for key in ("dali_roi_img_s", "dali_whole_img_s", "webdataset_pil_img_s"):
        assert loader[key] > 0, key
    assert loader["faster_decode"] in ("roi", "whole")
    assert loader["torchvision_decode_jpeg_cuda_img_s"] == "skipped: needs CUDA"
    for batch in (4, 8):
        row = doc["train"][f"batch_{batch}"]
        assert row["synthetic_eager"]["img_s"] > 0 and row["loader_fed"]["img_s"] > 0
        assert 0 <= row["loader_fed"]["data_wait_fraction"] <= 1 and row["synthetic_tflop_s"] > 0
    ev = doc["eval"]
    assert all(ev[f"{p}_Q{q}_img_s"] > 0 for p in ("dense", "multicrop_50") for q in (36, 48, 64))
    assert 0 < ev["multicrop_150_img_s"] < min(ev[f"multicrop_50_Q{q}_img_s"] for q in (36, 48, 64))


def test_the_comparison_fails_a_shifted_crop_or_swapped_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 255
    y = torch.tensor([0, 1, 2, 3])
    assert _compare("same", [(x, y)], [(x + 0.5, y)])["ok"]  # decoder-sized noise passes
    shifted = _compare("shifted", [(x, y)], [(x.roll(1, dims=3), y)])
    assert not shifted["ok"] and shifted["mean_abs_diff"] > PIXEL_TOLERANCE
    assert not _compare("labels", [(x, y)], [(x, y.flip(0))])["ok"]
    assert not _compare("shape", [(x, y)], [(x[:, :, :31], y)])["ok"]


def test_bench_gpu_without_cuda_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli_main(["bench", "gpu"]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def _one_split(shards, tmp_path):
    """The test shards without their val split: a set given as 'DIR/train/*.tar' may have no other."""
    import shutil

    root = tmp_path / "train-only"
    shutil.copytree(shards, root, ignore=lambda d, names: ["val"] if d == str(shards) else [])
    assert not (root / "val").exists()
    return root


def test_bench_gpu_on_a_set_with_one_split_skips_what_needs_val_and_keeps_its_order(shards, tmp_path, capsys):
    out = tmp_path / "one-split.json"
    root = _one_split(shards, tmp_path)
    rc = cli_main(["bench", "gpu", "--device", "cpu", "--shards", str(root / "train" / "*.tar"), "--seconds", "0.1",
                   "--budget", "600", "--out", str(out), "--workdir", str(tmp_path)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    doc = json.loads(out.read_text())
    assert doc["ok"] is True and doc["errors"] == {} and doc["data"]["val_split"] is False
    checks = {c["graph"]: c for c in doc["correctness"] if "graph" in c}
    assert checks["train (draws fixed, roi decode)"]["ok"] is True
    for graph in ("centre crop", "dense", "multi-crop", "evaluation over 3 ranks, uneven shards"):
        assert checks[graph] == {"graph": graph, "ok": None, "skipped": "skipped: no val split"}
    assert doc["eval"] == "skipped: no val split" and "eval: skipped: no val split" in printed.err
    assert doc["loader"]["dali_roi_img_s"] > 0 and doc["train"]["batch_4"]["loader_fed"]["img_s"] > 0
    # correctness first, then the loader, training, evaluation; each section's JSON written as it ends
    assert list(doc["section_seconds"]) == ["correctness", "loader", "train", "eval"]
    assert set(doc["budget_plan"]) == {"loader", "train"} and doc["budget_seconds"] == 600


def test_the_budget_trims_repetitions_then_sections():
    from pipeline.bench.gpu import Budget

    assert Budget(None, 1.0).plan("train", 2, 3, 10.0) == (3, 10.0)  # no budget: as asked
    n, each = Budget(1000, 1.0).plan("loader", 3, 1, 10.0)
    assert (n, each) == (1, 10.0)  # plenty left: full length
    # train gets 2/3 of 10 s, halved for overheads: 3.3 s over 2 measurements a batch size
    n, each = Budget(10, 1.0).plan("train", 2, 3, 5.0)
    assert n == 1 and 1.5 < each <= 1.67
    n, each = Budget(10, 1.0).plan("eval", 2, 3, 5.0)  # the last section takes all that is left
    assert n == 2 and 1.2 < each <= 1.25
    assert Budget(1, 1.0).plan("loader", 3, 1, 5.0) is None  # not even one measurement fits


def test_bench_loader_on_a_set_of_one_shard(shards, tmp_path, capsys):
    """Two DataLoader workers asked for, one shard: webdataset gave the second worker no
    shard and the baseline died with 'No samples found in dataset'."""
    one = sorted((shards / "train").glob("*.tar"))[0]
    rc = cli_main(["bench", "loader", "--shards", str(one), "--seconds", "0.3", "--batch-size", "4", "--threads", "2",
                   "--scale", "36", "48", "--crop", "32"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and line["shards"] == 1 and line["pipeline_img_s"] > 0 and line["baseline_img_s"] > 0
