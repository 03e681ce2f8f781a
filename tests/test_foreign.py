"""Shards other tools wrote, used as they are: `shard.py --index` over tars written by
webdataset's own TarWriter (.jpg/.jpeg images, .cls or .json labels), then the real
DALI graphs, a short train and an evaluation on them. The tars are never rewritten."""

from __future__ import annotations

import csv
import hashlib
import io
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.shard import main as shard_main
from data_prep.synth import draw
from pipeline.data import DatasetInfo, eval_loader, train_loader
from pipeline.protocols import rank_keys


def write_wds(root: Path, style: str) -> dict[str, int]:
    """2 train and 1 val tar by webdataset.TarWriter; returns key -> label of the good
    samples. Train shard 0 also holds a sample with no label, one with label 9 (out of
    range for --num-classes 6) and, for .json, one whose label is not an integer."""
    import webdataset as wds

    rng, labels = random.Random(0), {}
    for split, shards, n in (("train", 2, 36), ("val", 1, 18)):
        (root / split).mkdir(parents=True)
        for shard in range(shards):
            with wds.TarWriter(str(root / split / f"{split}-{shard:04d}.tar")) as w:
                for i in range(n):
                    key, cls = f"{split}{shard}_{i:04d}", (i + shard) % 6
                    buf = io.BytesIO()
                    draw(cls, rng, rng.randint(60, 100), rng.randint(60, 100)).save(buf, "JPEG", quality=90)
                    sample = {"__key__": key, ("jpeg" if i % 2 else "jpg"): buf.getvalue()}
                    sample.update({"cls": cls} if style == "cls" else {"json": {"label": cls, "wnid": f"n{cls}"}})
                    w.write(sample)
                    labels[key] = cls
                if split == "train" and shard == 0:
                    w.write({"__key__": "nolabel", "jpg": buf.getvalue()})
                    w.write({"__key__": "toobig", "jpg": buf.getvalue(),
                             **({"cls": 9} if style == "cls" else {"json": {"label": 9}})})
                    if style == "json":
                        w.write({"__key__": "notint", "jpg": buf.getvalue(), "json": {"label": "cat"}})
    return labels


def digests(root: Path) -> dict[str, str]:
    return {str(t): hashlib.sha256(t.read_bytes()).hexdigest() for t in sorted(root.rglob("*.tar"))}


@pytest.mark.parametrize("style", ["cls", "json"])
def test_index_makes_foreign_shards_usable_in_place(tmp_path, style, capsys):
    labels = write_wds(tmp_path, style)
    before = digests(tmp_path)
    assert shard_main(["--index", str(tmp_path), "--num-classes", "6", "--stats-sample", "40", "--workers", "2"]) == 0
    assert f"indexed train 72, val 18 images in {tmp_path} ({style} labels, 6 classes" in capsys.readouterr().out
    assert digests(tmp_path) == before  # never rewritten

    rejects = {Path(r["source"]).name.split(":")[-1]: r["reason"]
               for r in csv.DictReader(open(tmp_path / "rejects.csv"))}
    expected = {"nolabel": "no label member (.cls or .json)", "toobig": "label 9 out of range [0, 6)"}
    if style == "json":
        expected["notint"] = "notint.json: label 'cat' is not an integer"
    assert rejects == expected

    info = DatasetInfo.load(tmp_path)
    assert info.counts == {"train": 72, "val": 18} and info.num_classes == 6 and info.label_format == style
    assert len(info.mean_rgb) == 3 and all(v > 0 for v in info.rgb_eigval)  # from the stats sample
    manifest = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    assert {r["key"]: r["label"] for r in manifest} == labels and all(r["width"] >= 60 for r in manifest)

    # The real DALI graphs read the tars through the new indexes, .jpeg members included:
    # evaluation over 2 uneven ranks gives every val label once, in index order.
    seen = []
    for rank in range(2):
        got = [int(v) for _, y in eval_loader(info, "val", rank=rank, world_size=2, batch_size=4, scale=72, crop=64,
                                              threads=1) for v in y]
        assert got == [labels[k] for k in rank_keys(info, "val", rank, 2)]
        seen += got
    assert len(seen) == 18
    images, y = next(iter(train_loader(info, "train", rank=0, world_size=1, batch_size=8, scale_range=(72, 96),
                                       crop=64, threads=1)))
    assert images.shape == (8, 3, 64, 64) and all(0 <= int(v) < 6 for v in y)


def test_index_refuses_a_folder_without_tars(tmp_path, capsys):
    assert shard_main(["--index", str(tmp_path)]) == 2
    assert "no <split>/*.tar shards" in capsys.readouterr().err


@pytest.mark.slow
def test_train_and_evaluate_on_indexed_json_shards(tmp_path, ray_cluster, mlflow_uri):
    from services import tiny_plan

    from pipeline.evaluate import evaluate_run
    from pipeline.runner import run_plan
    from pipeline.stages import load_plan

    root = tmp_path / "wds"
    write_wds(root, "json")
    assert shard_main(["--index", str(root), "--num-classes", "6", "--workers", "1"]) == 0
    plan = load_plan(tiny_plan(tmp_path, root, name="wds", experiment="wds-test", epochs=2,
                               optim={"lr": 0.05, "patience": 50}, stall_epochs=0,
                               stages={"A": {"arch": "A", "scale": 36}}),
                     ["resources.num_workers=1"])  # the shards are under test here, not DDP
    (result,) = run_plan(plan, run_name="wds-1", tracking_uri=mlflow_uri)
    assert result.status == "finished" and 0 <= result.top1_error <= 100
    ev = evaluate_run(result.run_id, tracking_uri=mlflow_uri, protocol="dense", scales=[36], workers=1)
    assert ev["images"] == 18
