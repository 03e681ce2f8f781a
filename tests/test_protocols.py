"""Section 3.2's test protocols against a straightforward per-image reference written
here, on a tiny net and the tiny shards; keys and labels against the manifest."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data import DatasetInfo, dense_loader
from pipeline.models import build_model
from pipeline.protocols import (Posteriors, default_scales, metric_prefix, posteriors, posteriors_by_scale,
                                read_parquet, write_parquet)

CROP = 32


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model("A", num_classes=6, width_mult=0.125, input_size=CROP, init="kaiming", dropout=0.5).eval()


@pytest.fixture(scope="module")
def info(shards):
    return DatasetInfo.load(shards)


def manifest_labels(shards) -> dict[str, int]:
    rows = pq.read_table(shards / "manifest.parquet").to_pylist()
    return {r["key"]: r["label"] for r in rows if r["split"] == "val"}


def rescaled_images(info, q):
    """The whole validation images rescaled to Q (the one rescale every protocol shares)."""
    return [(x.float(), int(y)) for x, y in dense_loader(info, "val", rank=0, world_size=1, scale=q)]


_REFERENCES: dict = {}  # the module's net and shards: each (protocol, scales) cut by hand once


def reference(net, info, protocol: str, scales: list[int]) -> np.ndarray:
    """Per image, per scale: the crops the paper describes, cut by hand (once per
    protocol and scales for this module's net and images: several tests compare with it)."""
    key = (id(net), id(info), protocol, tuple(scales))
    if key not in _REFERENCES:
        if protocol == "dense+multicrop":  # the two protocols' softmax averaged (Section 3.2), per image and scale
            _REFERENCES[key] = (reference(net, info, "dense", scales) + reference(net, info, "multicrop", scales)) / 2
        else:
            _REFERENCES[key] = _reference(net, info, protocol, scales)
    return _REFERENCES[key].copy()


@torch.no_grad()
def _reference(net, info, protocol: str, scales: list[int]) -> np.ndarray:
    from pipeline.models import dense_form

    dense = dense_form(net)
    per_scale = []
    for q in scales:
        rows = []
        for x, _ in rescaled_images(info, q):
            h, w = x.shape[2:]
            p = []
            if "dense" in protocol:
                maps = [dense(v).mean(dim=(2, 3)) for v in (x, x.flip(3))]
                p.append(sum(torch.softmax(m, 1) for m in maps) / 2)
            if "multicrop" in protocol:
                crops = []
                for i in range(5):
                    for j in range(5):
                        y0, x0 = round(i * (h - CROP) / 4), round(j * (w - CROP) / 4)
                        c = x[:, :, y0:y0 + CROP, x0:x0 + CROP]
                        crops += [c, c.flip(3)]
                p.append(torch.softmax(net(torch.cat(crops)), 1).mean(0, keepdim=True))
            rows.append(sum(p) / len(p))
        per_scale.append(torch.cat(rows).numpy())
    return np.mean(per_scale, axis=0)


@pytest.mark.parametrize("protocol", ["dense", "multicrop", "dense+multicrop"])
def test_protocols_match_the_per_image_reference(net, info, protocol):
    scales = [36, 44]
    ours = posteriors(net, info, "val", protocol, scales, crop=CROP, normalize_std=False, batch_size=5, threads=1)
    ref = reference(net, info, protocol, scales)
    assert ours.probs.shape == ref.shape == (48, 6)
    np.testing.assert_allclose(ours.probs, ref, atol=2e-5)
    truth = Posteriors(ours.keys, ours.labels, ref).errors()
    # The errors agree except where the reference itself is a tie within the tolerance
    # above at the top-k boundary (the 1st/2nd or 5th/6th probability): such an image may
    # rank either way, in ours as in any float reduction order.
    ranked = np.sort(ref, axis=1)[:, ::-1]
    for k, key in ((1, "top1_error"), (5, "top5_error")):
        ties = int((ranked[:, k - 1] - ranked[:, k] < 4e-5).sum())
        assert abs(ours.errors()[key] - truth[key]) <= ties * 100 / 48 + 1e-9, (key, ties)
    assert ours.errors()["images"] == truth["images"] == 48


def test_table_5s_three_protocols_cost_two_passes(net, info):
    """dense, multicrop and dense+multicrop from one dense and one multi-crop pass (each
    image counted once per pass and scale), each equal to the per-image reference."""
    from pipeline.protocols import combine, parts_by_scale, protocol_parts

    protocols, scales, seen = ["dense", "multicrop", "dense+multicrop"], [36, 44], []
    parts = protocol_parts(protocols)
    assert parts == ["dense", "multicrop"]
    passes = parts_by_scale(net, info, "val", parts, scales, crop=CROP, normalize_std=False, batch_size=5,
                            threads=1, on_images=seen.append)
    assert sum(seen) == 48 * len(scales) * 2
    for protocol in protocols:
        by_scale = combine(passes, protocol, scales)
        mean = np.mean([by_scale[q].probs for q in scales], axis=0)
        np.testing.assert_allclose(mean, reference(net, info, protocol, scales), atol=2e-5)
    with pytest.raises(ValueError, match=r"protocol 'dense\+flip'"):
        protocol_parts(["dense+flip"])


def test_each_scale_of_a_multi_scale_run_is_that_scales_own_protocol(net, info):
    """Table 3's number (dense at one Q) comes out of Table 4's run (dense over three Q):
    each scale's posteriors are the per-image reference at that Q alone."""
    by_scale = posteriors_by_scale(net, info, "val", "dense", [36, 44], crop=CROP, normalize_std=False, threads=1)
    assert list(by_scale) == [36, 44]
    for q, post in by_scale.items():
        np.testing.assert_allclose(post.probs, reference(net, info, "dense", [q]), atol=2e-5)
    both = posteriors(net, info, "val", "dense", [36, 44], crop=CROP, normalize_std=False, threads=1)
    np.testing.assert_allclose(both.probs, (by_scale[36].probs + by_scale[44].probs) / 2, atol=1e-6)


def test_evaluate_defaults_to_the_papers_dense_protocol():
    import inspect

    from pipeline.cli import build_parser
    from pipeline.evaluate import evaluate_run

    assert build_parser().parse_args(["evaluate", "--run-id", "x"]).protocol == ["dense"]
    assert inspect.signature(evaluate_run).parameters["protocol"].default == "dense"


def test_single_scale_and_every_image_once_over_uneven_ranks(net, info, shards):
    labels = manifest_labels(shards)
    whole = posteriors(net, info, "val", "single", [40], crop=CROP, normalize_std=False, batch_size=7, threads=1)
    assert sorted(whole.keys) == sorted(labels)
    assert all(labels[k] == y for k, y in zip(whole.keys, whole.labels))  # keys line up with what was read
    assert np.allclose(whole.probs.sum(1), 1, atol=1e-5)
    parts = [posteriors(net, info, "val", "single", [40], crop=CROP, normalize_std=False, rank=r, world=5,
                        batch_size=3, threads=1) for r in range(5)]
    joined = Posteriors.concat(parts)
    assert len(joined.keys) == 48 and len(set(joined.keys)) == 48
    np.testing.assert_allclose(whole.aligned_with(joined).probs, whole.probs, atol=1e-5)


def test_top_k_errors_and_parquet_round_trip(tmp_path):
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]], dtype=np.float32)
    post = Posteriors(["a", "b", "c"], np.array([0, 1, 2]), probs)
    errs = post.errors()
    assert errs["top1_error"] == pytest.approx(100 * 2 / 3) and errs["top5_error"] == 0.0
    write_parquet(post, tmp_path / "p.parquet")
    back = read_parquet(tmp_path / "p.parquet")
    assert back.keys == post.keys and np.array_equal(back.labels, post.labels)
    np.testing.assert_allclose(back.probs, probs, atol=1e-3)  # stored as float16
    assert pq.read_schema(tmp_path / "p.parquet").field("probs").type.value_type == "halffloat"


def test_mismatched_validation_sets_are_named():
    a = Posteriors(["x", "y"], np.array([0, 1]), np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match="validation sets differ"):
        Posteriors.mean([a, Posteriors(["x", "z"], np.array([0, 1]), np.eye(2, dtype=np.float32))])
    with pytest.raises(ValueError, match="labels differ for sample 'y'"):
        Posteriors.mean([a, Posteriors(["y", "x"], np.array([0, 0]), np.eye(2, dtype=np.float32))])
    # the same images in another order are fine, and averaging identical members is the member
    swapped = Posteriors(["y", "x"], np.array([1, 0]), np.eye(2, dtype=np.float32)[::-1].copy())
    np.testing.assert_allclose(Posteriors.mean([a, swapped]).probs, a.probs)


def test_default_scales_follow_the_paper():
    assert default_scales("dense", (256, 512), 384, 224) == [256, 384, 512]
    assert default_scales("dense", (384, 384), 384, 224) == [352, 384, 416]
    assert default_scales("multicrop", (72, 72), 72, 64) == [64, 72, 81]  # step scaled to the crop, Q >= crop
    assert default_scales("single", (256, 512), 384, 224) == [384]
    assert metric_prefix("dense+multicrop", [256, 384, 512]) == "dense_multicrop_Q256-384-512"


def test_every_protocol_makes_no_tensor_at_the_default_dtype_or_device(net, info):
    """Single, dense and multi-crop with a float64 net (torch's default dtype stays
    float32: a module or tensor made at the default dtype fails on a dtype mismatch) and
    with torch's default device `meta` while every module checks that its parameters and
    buffers sit on its input's device. Dense's float64 posteriors equal the float32 ones."""
    from placement import elsewhere_by_default

    wide = build_model("A", num_classes=6, width_mult=0.125, input_size=CROP, init="kaiming").eval()
    wide.load_state_dict(net.state_dict())
    wide = wide.double()
    for protocol in ("single", "dense", "multicrop"):
        with elsewhere_by_default() as checked:
            ours = posteriors(wide, info, "val", protocol, [36], crop=CROP, normalize_std=False, batch_size=8,
                              threads=1)
        assert torch.get_default_dtype() == torch.float32 and {"Conv2d", "MaxPool2d"} <= set(checked)
        assert ours.probs.shape == (48, 6) and np.allclose(ours.probs.sum(1), 1, atol=1e-5)
        if protocol == "dense":  # the one that made layers of its own (conv6-8)
            ref = posteriors(net, info, "val", protocol, [36], crop=CROP, normalize_std=False, threads=1)
            np.testing.assert_allclose(ours.probs, ref.probs, atol=1e-5)


def test_the_exactly_once_check_counts_what_the_loaders_returned(info, shards):
    """Keys come from the DALI reader itself (each sample's source), padding dropped, so the
    check sees a sample read twice or never; checked against the manifest's keys."""
    from pipeline.data import eval_loader
    from pipeline.evaluate import exactly_once

    val = sorted(manifest_labels(shards))
    read = []
    for rank in range(3):  # 48 images over 3 ranks in batches of 7: every rank's last batch is padded
        loader = eval_loader(info, "val", rank=rank, world_size=3, batch_size=7, scale=40, crop=CROP, threads=1)
        for _, labels in loader:
            assert len(loader.batch_keys) == len(labels)
            read += loader.batch_keys
    assert sorted(read) == val
    probs = np.full((len(read), 6), 1 / 6, dtype=np.float32)
    exactly_once(Posteriors(read, np.zeros(len(read), np.int64), probs), info, "val", "single")
    twice = read[:-1] + [read[0]]  # one sample read twice, another never
    with pytest.raises(RuntimeError, match=rf"1 read more than once \(e.g. '{read[0]}'\); 1 never read "
                                           rf"\(e.g. '{read[-1]}'\)"):
        exactly_once(Posteriors(twice, np.zeros(len(read), np.int64), probs), info, "val", "single")
    with pytest.raises(RuntimeError, match=rf"47 images read for 48 expected: 1 never read \(e.g. '{read[5]}'\)"):
        short = read[:5] + read[6:]
        exactly_once(Posteriors(short, np.zeros(47, np.int64), probs[:47]), info, "val", "single")


@pytest.mark.slow
def test_evaluation_tasks_on_ray_and_a_failed_one_names_itself(shards, tmp_path, ray_cluster, net, capsys,
                                                                monkeypatch):
    """Two Ray tasks over the validation split: every image once. Then one JPEG of the last
    val shard (read by the second task only) is overwritten with noise of the same size:
    that task fails, says which it is, and the error carries DALI's reason."""
    import shutil

    from services import tiny_plan

    from pipeline.evaluate import run_posteriors
    from pipeline.stages import load_plan
    from pipeline.stageloop import CHECKPOINT_FILE

    plan = load_plan(tiny_plan(tmp_path, shards, name="ev", experiment="ev", stages={"A": {"arch": "A", "scale": 40}}))
    stage = plan.stages["A"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    model = build_model("A", num_classes=6, width_mult=stage.recipe.width_mult, input_size=stage.recipe.crop,
                        init="kaiming")
    torch.save({"model": model.state_dict(), "num_classes": 6}, ckpt / CHECKPOINT_FILE)
    monkeypatch.setattr("pipeline.evaluate.PROGRESS_EVERY_S", 0.0)  # a progress line at every count
    post = run_posteriors(stage, str(ckpt), str(shards), "val", "single", [40], workers=2, batch_size=8)
    assert sorted(post.keys) == sorted(manifest_labels(shards))
    # the tasks' progress reaches the driver's console, with an ETA
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("evaluate A single Q=40: ")]
    assert lines and all("of 48 images" in x and "ETA" in x for x in lines), lines
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    last = sorted((broken / "val").glob("*.tar"))[-1]
    fields = last.with_suffix(".idx").read_text().splitlines()[1].split()
    ext, offset, size, name = next(fields[i:i + 4] for i in range(0, len(fields), 4) if fields[i] == "jpg")
    with open(last, "r+b") as fh:
        fh.seek(int(offset))
        fh.write(b"\xff\xd8" + bytes(range(256)) * (int(size) // 256) + b"\0" * (int(size) % 256 - 2))
    with pytest.raises(RuntimeError, match=r"evaluation task 2 of 2 \(A, single, val part 2\) failed") as caught:
        run_posteriors(stage, str(ckpt), str(broken), "val", "single", [40], workers=2, batch_size=8)
    assert f"sample {name.split('.')[0]!r} in shard {last} cannot be decoded" in str(caught.value), str(caught.value)


def test_evaluation_in_one_process_says_how_far_it_is(net, shards, capsys, monkeypatch):
    from pipeline.evaluate import Progress, _stage_posteriors
    from pipeline.stages import load_plan
    from pipeline.stageloop import CHECKPOINT_FILE
    from services import tiny_plan

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        plan = load_plan(tiny_plan(Path(tmp), shards, name="p", experiment="p", stages={"A": {"arch": "A", "scale": 40}}))
        torch.save({"model": net.state_dict(), "num_classes": 6}, Path(tmp) / CHECKPOINT_FILE)
        progress = Progress("evaluate A dense+multicrop Q=40-48", 48 * 2 * 2, every=0.0)
        _stage_posteriors(plan.stages["A"], tmp, str(shards), "val", "dense+multicrop", [40, 48], 0, 1, 8, 1, progress)
    lines = capsys.readouterr().out.splitlines()
    assert progress.done == 192 and len(lines) >= 3  # every pass over the split counted: 2 scales x 2 parts
    assert lines[0].startswith("evaluate A dense+multicrop Q=40-48: ") and "of 192 images" in lines[0]
    assert "ETA" in lines[-1] and "(100%)" not in "".join(lines)  # no line once it is done
