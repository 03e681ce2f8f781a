"""The DALI graphs on the CPU: labels, geometry, epoch lengths, exactly-once evaluation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFilter

from data_prep.layouts import Source
from data_prep.writer import Sample, write_shard
from pipeline.data import DatasetInfo, dense_loader, eval_loader, multi_crop_loader, train_loader
from pipeline.dataset import _index_keys


def test_train_batches_shape_dtype_and_exact_epochs(shards):
    info = DatasetInfo.load(shards)
    loaders = [train_loader(info, "train", rank=r, world_size=3, batch_size=8, scale_range=(72, 96), crop=64,
                            threads=1) for r in range(3)]
    assert {len(ld) for ld in loaders} == {144 // 24}  # same step count on every rank
    for epoch in range(2):  # resets cleanly: the second epoch is as long as the first
        batches = list(loaders[1])
        assert len(batches) == len(loaders[1])
        images, labels = batches[0]
        assert images.shape == (8, 3, 64, 64) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and labels.shape == (8,)
        assert labels.min() >= 0 and labels.max() < info.num_classes
    # mean subtraction: the centred pixels average near zero over a batch
    assert abs(float(torch.cat([b[0] for b in batches]).mean())) < 25


def test_epoch_order_is_a_function_of_seed_and_epoch_and_a_start_step_resumes_it(shards):
    """A mid-epoch checkpoint stores its position: rebuilding the epoch's loader at that
    micro-step must give exactly the batches the interrupted run had not seen."""
    info = DatasetInfo.load(shards)
    args = dict(world_size=2, batch_size=8, scale_range=(40, 56), crop=32, threads=1, seed=7)

    def epoch_batches(rank, epoch, skip=0):
        ld = train_loader(info, "train", rank=rank, epoch=epoch, start_step=skip, **args)
        return [(x.clone(), y.clone()) for x, y in ld]

    first = epoch_batches(0, epoch=3)
    assert len(first) == 144 // 16
    again = epoch_batches(0, epoch=3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    tail = epoch_batches(0, epoch=3, skip=4)
    assert len(tail) == len(first) - 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first[4:], tail))
    # another epoch is another order, and the two ranks read different samples
    other = epoch_batches(0, epoch=4)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other))
    rank1 = epoch_batches(1, epoch=3)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, rank1))
    with pytest.raises(ValueError, match="cannot start at micro-step 100 of 9"):
        train_loader(info, "train", rank=0, start_step=100, **args)


def test_eval_counts_every_image_once_for_uneven_worlds(shards):
    info = DatasetInfo.load(shards)
    truth = Counter(r["label"] for r in pq.read_table(shards / "manifest.parquet").to_pylist() if r["split"] == "val")
    assert sum(truth.values()) == 48  # 3 shards of 20, 20, 8
    for world in (1, 2, 3, 5):
        seen: Counter = Counter()
        for rank in range(world):
            for _, labels in eval_loader(info, "val", rank=rank, world_size=world, batch_size=7, scale=72, crop=64,
                                         threads=1):
                seen.update(labels.tolist())
        assert seen == truth, f"world size {world}"


def _smooth_jpegs(tmp_path: Path, labels: list[int], digits: int) -> DatasetInfo:
    """Natural-looking (smooth) images of several sizes in a one-shard split, with the
    given labels written at `digits` width."""
    rng = np.random.default_rng(0)
    samples = []
    for i, label in enumerate(labels):
        # Rescaled sides are whole pixels at the tested S for the first three: resize_shorter
        # rounds the long side (400x300 -> 133x100 at S=100 is 0.25% anisotropic, a half-pixel
        # shift that the reference has and the exact crop window does not).
        w, h = [(450, 300), (300, 420), (512, 512), (333, 257)][i % 4]
        base = rng.integers(0, 255, size=(h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        path = tmp_path / f"img{i}.JPEG"
        img.save(path, quality=95)
        samples.append(Sample(f"img{i}", Source(str(path), "n00000000"), label))
    (tmp_path / "val").mkdir()
    write_shard(str(tmp_path / "val"), "val-000000", samples, digits)
    stats = {"counts": {"val": len(samples)}, "num_classes": 1000, "label_digits": digits,
             "mean_rgb": [0.0, 0.0, 0.0], "rgb_eigval": [1.0, 1.0, 1.0],
             "rgb_eigvec": [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    return DatasetInfo.load(tmp_path)


def test_multi_digit_labels_round_trip_through_the_graph(tmp_path):
    labels = [0, 7, 42, 999, 100, 5]
    info = _smooth_jpegs(tmp_path, labels, digits=3)
    got = [int(v) for _, lab in eval_loader(info, "val", rank=0, world_size=1, batch_size=4, scale=256, crop=224,
                                              threads=1) for v in lab]
    assert sorted(got) == sorted(labels)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


@pytest.mark.parametrize("scale, crop", [(256, 224), (384, 224), (100, 64)])
def test_crop_window_matches_resize_then_crop(tmp_path, scale, crop):
    """The graph decodes only the crop window and resizes it; the reference resizes the
    whole image to S and crops the centre. Same geometry: PSNR above 30 dB."""
    from nvidia.dali import fn, pipeline_def, types

    info = _smooth_jpegs(tmp_path, [1, 2, 3, 4], digits=1)
    ours = [img for img, _ in eval_loader(info, "val", rank=0, world_size=1, batch_size=4, scale=scale, crop=crop,
                                          threads=1)][0]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def reference():
        jpegs, _ = fn.readers.webdataset(paths=[str(tmp_path / "val" / "val-000000.tar")],
                                         index_paths=[str(tmp_path / "val" / "val-000000.idx")], ext=["jpg", "cls"])
        images = fn.decoders.image(jpegs, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=scale, antialias=True)
        return fn.crop_mirror_normalize(images, crop=(crop, crop), crop_pos_x=0.5, crop_pos_y=0.5,
                                        output_layout="CHW", dtype=types.FLOAT)

    pipe = reference()
    pipe.build()
    (ref,) = pipe.run()
    for i in range(4):
        expected = np.asarray(ref[i])
        assert expected.shape == (3, crop, crop)
        assert _psnr(ours[i].numpy(), expected) > 30, f"image {i}"


def test_colour_shift_changes_pixels_only_by_a_per_image_offset(shards):
    info = DatasetInfo.load(shards)
    args = dict(rank=0, world_size=1, batch_size=16, scale_range=(72, 72), crop=64, threads=1, seed=3)
    plain = next(iter(train_loader(info, "train", color_shift=0.0, **args)))[0]
    shifted = next(iter(train_loader(info, "train", color_shift=0.1, **args)))[0]
    diff = (shifted - plain).flatten(2)  # (N, 3, H*W): one constant per image and channel
    assert float(diff.std(dim=2).max()) < 1e-3
    offsets = diff.mean(dim=2)
    assert float(offsets.abs().max()) > 0.1  # it did shift
    # the offsets follow the RGB covariance's scale: std of eigvec @ (0.1 * sqrt(eigval) * N(0,1))
    assert float(offsets.abs().max()) < 0.1 * 6 * max(info.rgb_eigval) ** 0.5


def test_undecodable_sample_is_named_by_shard_and_key(shards, tmp_path):
    """A JPEG that went bad after sharding (bit rot): the rank whose slice holds it names
    shard and key (found from its reader's slice, decoded one image at a time); the
    other ranks read theirs to the end. A DataFailure: evaluate() stops every rank on it."""
    import shutil

    from pipeline.engine import DataFailure

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    tar = copy / "val" / "val-000001.tar"
    line = (copy / "val" / "val-000001.idx").read_text().splitlines()[4].split()
    offset, size, name = int(line[5]), int(line[6]), line[7]
    data = bytearray(tar.read_bytes())
    data[offset + 100 : offset + size] = b"\0" * (size - 100)
    tar.write_bytes(bytes(data))
    info = DatasetInfo.load(copy)
    failed = []
    for rank in range(3):
        try:
            for _ in eval_loader(info, "val", rank=rank, world_size=3, batch_size=4, scale=72, crop=64, threads=1):
                pass
        except DataFailure as err:
            failed.append((rank, str(err)))
    assert len(failed) == 1, failed
    message = failed[0][1]
    assert f"sample {name.split('.')[0]!r} in shard {tar}" in message and "cannot be decoded" in message


def test_dense_pipeline_gives_whole_rescaled_images_once_each(shards):
    info = DatasetInfo.load(shards)
    manifest = {r["key"]: r for r in pq.read_table(shards / "manifest.parquet").to_pylist() if r["split"] == "val"}
    longs = sorted(max(r["width"], r["height"]) * 80 / min(r["width"], r["height"]) for r in manifest.values())
    for world in (1, 3):
        seen, got = Counter(), []
        for rank in range(world):
            for images, labels in dense_loader(info, "val", rank=rank, world_size=world, scale=80, threads=1):
                assert images.shape[0] == 1 and images.shape[1] == 3 and min(images.shape[2:]) == 80
                got.append(max(images.shape[2:]))
                seen.update(labels.tolist())
        assert sum(seen.values()) == 48 and len(got) == 48
        # the long side is the isotropic one, to rounding
        assert all(abs(g - e) <= 1 for g, e in zip(sorted(got), longs))


def test_multi_crop_grid_matches_the_centre_crop(tmp_path):
    info = _smooth_jpegs(tmp_path, [1, 2, 3, 4], digits=1)
    crops = next(iter(multi_crop_loader(info, "val", rank=0, world_size=1, batch_size=4, scale=256, crop=224,
                                        threads=1)))[0]
    assert crops.shape == (4, 25, 3, 224, 224)
    centre = next(iter(eval_loader(info, "val", rank=0, world_size=1, batch_size=4, scale=256, crop=224,
                                   threads=1)))[0]
    for i in range(3):  # whole-pixel rescaled sizes: the grid's middle crop is the centre crop
        assert _psnr(crops[i, 12].numpy(), centre[i].numpy()) > 30
    # corners are different regions of the same image
    assert _psnr(crops[0, 0].numpy(), crops[0, 24].numpy()) < 30


def test_fixed_draws_and_both_decode_paths_give_the_same_crops(shards):
    """The training graph with its draws fixed reads samples in shard order and is
    reproducible; decoding the whole image and resizing the window out of it (the GPU's
    hardware-decoder path) gives the ROI path's crop: same geometry, same pixels up to
    the resampling context at the window's edge."""
    from pipeline.data import Draws

    info = DatasetInfo.load(shards)
    args = dict(rank=0, world_size=1, batch_size=8, scale_range=(80, 80), crop=64, threads=1,
                draws=Draws(scale=80.0, pos_x=0.3, pos_y=0.7, mirror=1))
    roi, labels = next(iter(train_loader(info, "train", **args)))
    again, labels2 = next(iter(train_loader(info, "train", seed=5, epoch=3, **args)))
    assert torch.equal(roi, again) and torch.equal(labels, labels2)  # no random draw left
    first_keys = _index_keys(info.shards("train")[1][0])[:8]
    manifest = pq.read_table(shards / "manifest.parquet").to_pandas().set_index("key")
    assert labels.tolist() == [int(manifest.loc[k, "label"]) for k in first_keys]  # shard order
    whole, labels3 = next(iter(train_loader(info, "train", decode="whole", **args)))
    assert torch.equal(labels, labels3) and whole.shape == roi.shape == (8, 3, 64, 64)
    assert float((whole - roi).abs().mean()) < 0.05  # of 255; a window off by one pixel gives several
    with pytest.raises(ValueError, match="decode: expected 'roi' or 'whole'"):
        train_loader(info, "train", decode="gpu", **args)


def test_gpu_decoder_hints_fit_the_largest_image_of_the_split(shards):
    info = DatasetInfo.load(shards)
    hints = info.decode_hints("train")
    table = pq.read_table(shards / "manifest.parquet").to_pandas()
    train = table[table["split"] == "train"]
    assert hints["preallocate_width_hint"] == train["width"].max()
    assert hints["preallocate_height_hint"] == train["height"].max()
    assert hints["device_memory_padding"] == max(16 << 20, int((train["width"] * train["height"]).max()) * 3)
    assert info.decode_hints("nosuchsplit") == {}


def test_channels_last_batches_come_from_the_graph_and_the_step_copies_none(shards):
    """recipe.channels_last: the graph emits HWC and the loader hands over NCHW views in
    channels_last memory, the same values as the CHW graph's; the training step then feeds
    the net that very memory (before, every step copied each batch into channels_last)."""
    from pipeline.data import Draws
    from pipeline.engine import make_optimizer, train_one_epoch
    from pipeline.models import build_model
    from pipeline.stages import Optim

    info = DatasetInfo.load(shards)
    args = dict(rank=0, world_size=1, batch_size=8, scale_range=(40, 40), crop=32, threads=1,
                draws=Draws(scale=40.0, pos_x=0.3, pos_y=0.7, mirror=1))
    (chw, y1), (nhwc, y2) = (next(iter(train_loader(info, "train", channels_last=c, **args))) for c in (False, True))
    assert nhwc.shape == chw.shape == (8, 3, 32, 32) and torch.equal(nhwc, chw) and torch.equal(y1, y2)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not chw.is_contiguous(
        memory_format=torch.channels_last)
    ev = [next(iter(eval_loader(info, "val", rank=0, world_size=1, batch_size=8, scale=40, crop=32, threads=1,
                                channels_last=c))) for c in (False, True)]
    assert torch.equal(ev[0][0], ev[1][0]) and ev[1][0].is_contiguous(memory_format=torch.channels_last)

    model = build_model("A", num_classes=info.num_classes, width_mult=0.125, input_size=32)
    model = model.to(memory_format=torch.channels_last)
    handed, fed = [], []
    model.features.conv1_1.register_forward_pre_hook(lambda m, a: fed.append(a[0].data_ptr()))
    loader = train_loader(info, "train", channels_last=True, **args)
    batches = ((x, y) for x, y in loader if not handed.append(x.data_ptr()))
    train_one_epoch(model, batches, make_optimizer(model, Optim(lr=0.001), 8), torch.device("cpu"),
                    channels_last=True, log_every=0)
    assert len(fed) == len(loader) and fed == handed
