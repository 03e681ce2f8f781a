"""DALI input pipelines: the paper's training augmentation and evaluation crops.

The only module that imports DALI. One graph builder serves the GPU
(`device="mixed"` decoding on the hardware JPEG decoder) and the CPU (no GPU,
no driver: `device_id=None` and CPU operators only).

Training (Section 3.1): isotropic rescale so the shorter side is S (fixed, or
drawn per image from [Smin, Smax]), a random crop, a random horizontal flip,
AlexNet's PCA colour shift, and subtraction of the training mean RGB. The crop
window is computed in source pixels and only that window is decoded and resized
(`decoders.image_slice`): the same geometry as resize-to-S-then-crop, without
resizing the whole image and discarding most of it (DESIGN.md measured 2.2x).
On a GPU there is a second way to the same geometry: decode the whole image with
`decoders.image` (which can use the A100/H100 hardware JPEG decoder; ROI decoding
cannot) and resize the same sub-pixel window on the GPU. `decode="roi" | "whole"`
picks one; `python -m pipeline bench gpu` times both on the machine.

Training reads the split in a global order that depends on (seed, epoch) only
(pipeline/order.py): `fn.external_source` hands the graph each micro-batch's JPEG and
label bytes, read from the tars at the offsets in the DALI index files, with the
augmentation's draws for those positions; the graph decodes and augments them as
above. Evaluation reads each rank's slice with `fn.readers.webdataset`. The built
graphs go to pipeline/loader.py's `Loader` (torch batches; no DALI there), with
`decode_errors`, a one-image DALI decode that judges which sample of a failing batch
cannot be decoded.

GPU decoders get their memory hints from the data (`decode_hints`): buffers sized for
the split's largest image, so nvJPEG never reallocates mid-epoch, and chroma upsampled
as libjpeg-turbo does on the CPU, so a GPU batch matches the CPU one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali import __version__ as _dali_version
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from pipeline.dataset import DatasetInfo
from pipeline.loader import LOOKAHEAD, Loader

DALI_VERSION = _dali_version  # for benchmark records
READER = "Reader"


def _label(raw, info: DatasetInfo, gpu: bool = False):
    """The label inside the graph, on the GPU when the graph runs there (DALI hands the
    iterator device memory: no copy from pageable host memory, which would wait). `.cls`:
    ASCII digits, zero-padded to `label_digits` (data_prep/writer.py) or not (other tools' shards: "7", "7\\n"), parsed to int64 as
    sum(digit_i * 10^(n-1-i)) over the n leading digits. `.json`: the raw bytes,
    zero-padded to a fixed width, for the Loader to parse on the host."""
    if info.label_format == "json":
        return fn.pad(raw, axes=[0], shape=[max(info.label_bytes, 1)], fill_value=0)
    width = max(info.label_digits, info.label_bytes, 1)
    values = fn.cast(fn.pad(raw, axes=[0], shape=[width], fill_value=0), dtype=types.FLOAT)
    is_digit = fn.cast((values >= 48.0) & (values <= 57.0), dtype=types.FLOAT)
    count = fn.reductions.sum(is_digit, axes=[0])
    place = dmath.pow(10.0, count - 1.0 - types.Constant(np.arange(width, dtype=np.float32)))
    value = fn.reductions.sum((values - 48.0) * is_digit * place, axes=[0])
    label = fn.cast(dmath.floor(value + 0.5), dtype=types.INT64)
    return label.gpu() if gpu else label


def _crop_window(shape, scale, crop: int, pos_x, pos_y):
    """Where resize-to-S-then-crop takes its crop from, in source pixels (floats).

    Rescaling by S / shorter_side and cutting a crop x crop window at relative
    position (pos_x, pos_y) equals cutting a (crop * shorter / S)-pixel window at
    the same relative position in the source and resizing it to crop x crop.
    Returns (x, y, side)."""
    hw = fn.cast(shape, dtype=types.FLOAT)
    h, w = hw[0], hw[1]
    side = crop * dmath.min(h, w) / scale
    return pos_x * (w - side), pos_y * (h - side), side


def _decoder_args(hints: dict | None, gpu: bool) -> dict:
    """CPU decoders take none; GPU ones take the data's memory hints and decode chroma
    like libjpeg-turbo (fancy upsampling), so the GPU graph reproduces the CPU one."""
    return {"jpeg_fancy_upsampling": True, **(hints or {})} if gpu else {}


def _decode_window(jpegs, shape, window, crop: int, gpu: bool, decode: str = "roi", hints: dict | None = None):
    """The exact sub-pixel window resized to crop x crop. "roi": decode only the pixels
    around the window, with a margin that gives the antialiasing filter the context it
    has when the whole image is resized (its support is about one output pixel,
    side / crop source pixels, each way). "whole": decode the whole image (on a GPU, the
    hardware decoder can take it) and resize the same window out of it."""
    x, y, side = window
    if decode == "whole":
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                   **_decoder_args(hints, gpu))
        return fn.resize(images, size=[crop, crop], antialias=True, roi_relative=False,
                         roi_start=fn.stack(y, x), roi_end=fn.stack(y + side, x + side))
    hw = fn.cast(shape, dtype=types.FLOAT)
    margin = dmath.ceil(side / crop) + 1.0
    x0, y0 = dmath.max(dmath.floor(x - margin), 0.0), dmath.max(dmath.floor(y - margin), 0.0)
    x1 = dmath.min(dmath.ceil(x + side + margin), hw[1])
    y1 = dmath.min(dmath.ceil(y + side + margin), hw[0])
    images = fn.decoders.image_slice(
        jpegs, fn.stack(x0, y0), fn.stack(x1 - x0, y1 - y0), device="mixed" if gpu else "cpu",
        output_type=types.RGB, normalized_anchor=False, normalized_shape=False, axis_names="WH",
        **_decoder_args(hints, gpu),
    )
    # roi_* follow the tensor's (H, W) order and are relative to the decoded window.
    return fn.resize(images, size=[crop, crop], antialias=True, roi_relative=False,
                     roi_start=fn.stack(y - y0, x - x0), roi_end=fn.stack(y - y0 + side, x - x0 + side))


def _reader(info: DatasetInfo, split: str, shard_id: int, num_shards: int):
    """Evaluation: each rank reads its contiguous slice of the split in shard order, the
    last batch padded (the iterator drops the padding). Training reads the global order
    through `EpochSource` instead."""
    paths, index_paths = info.shards(split)
    return fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=["jpg", info.label_format], missing_component_behavior="error",
        dtypes=[types.UINT8, types.UINT8], shard_id=shard_id, num_shards=num_shards, name=READER,
        random_shuffle=False, initial_fill=1, pad_last_batch=True,
    )


@dataclass(frozen=True)
class Draws:
    """The training graph's random draws, fixed: samples in shard order, every image at
    scale S, crop position (pos_x, pos_y) in [0, 1], mirrored or not, no colour shift.
    For comparing the GPU graph with the CPU one on identical work."""

    scale: float
    pos_x: float = 0.5
    pos_y: float = 0.5
    mirror: int = 0


@pipeline_def
def train_pipeline(info: DatasetInfo, source, crop: int, color_shift: float, normalize_std: bool, gpu: bool,
                   decode: str = "roi", hints: dict | None = None, layout: str = "CHW"):
    """The paper's augmentation on the samples and random draws an `order.EpochSource`
    gives (the global order); DALI draws nothing itself."""
    jpegs, cls, index, scale, pos_x, pos_y, mirror, alpha = fn.external_source(
        source=source, num_outputs=8, batch=True, batch_info=True,
        dtype=[types.UINT8, types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.FLOAT, types.INT32,
               types.FLOAT])
    shape = fn.peek_image_shape(jpegs)
    images = _decode_window(jpegs, shape, _crop_window(shape, scale, crop, pos_x, pos_y), crop, gpu, decode, hints)
    # AlexNet's lighting noise: add eigvec @ (alpha * sqrt(eigval)), alpha ~ N(0, color_shift),
    # folded into the subtracted mean. sqrt: stats.json's eigenvalues are variances (0-255).
    weighted = alpha * float(color_shift) * types.Constant(
        np.sqrt(np.maximum(info.rgb_eigval, 0)).astype(np.float32))
    shift = fn.coord_transform(fn.reshape(weighted, shape=[1, 3]),
                               M=np.asarray(info.rgb_eigvec, dtype=np.float32).flatten().tolist())
    mean = types.Constant(np.asarray(info.mean_rgb, dtype=np.float32)) - fn.reshape(shift, shape=[3])
    out = fn.crop_mirror_normalize(
        images, mean=mean, std=list(info.std_rgb) if normalize_std else [1.0, 1.0, 1.0], mirror=mirror,
        output_layout=layout, dtype=types.FLOAT16 if gpu else types.FLOAT,
    )
    return out, _label(cls, info, gpu), index


@pipeline_def
def center_crop_pipeline(info: DatasetInfo, split: str, shard_id: int, num_shards: int, scale: int, crop: int,
                         normalize_std: bool, gpu: bool, hints: dict | None = None, layout: str = "CHW"):
    """Single-scale test protocol: rescale to Q, centre crop (Section 3.2, Table 3)."""
    jpegs, cls = _reader(info, split, shard_id, num_shards)
    shape = fn.peek_image_shape(jpegs)
    images = _decode_window(jpegs, shape, _crop_window(shape, float(scale), crop, 0.5, 0.5), crop, gpu, "roi", hints)
    return _normalize(images, info, normalize_std, gpu, layout), _label(cls, info, gpu), _source(jpegs)


def _normalize(images, info: DatasetInfo, normalize_std: bool, gpu: bool, layout: str = "CHW", **crop):
    return fn.crop_mirror_normalize(
        images, mean=list(info.mean_rgb), std=list(info.std_rgb) if normalize_std else [1.0, 1.0, 1.0],
        output_layout=layout, dtype=types.FLOAT16 if gpu else types.FLOAT, **crop,
    )


def _rescaled(jpegs, scale: int, gpu: bool, hints: dict | None = None):
    """The whole image, isotropically rescaled so its shorter side is Q."""
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                               **_decoder_args(hints, gpu))
    return fn.resize(images, resize_shorter=float(scale), antialias=True)


@pipeline_def
def dense_pipeline(info: DatasetInfo, split: str, shard_id: int, num_shards: int, scale: int, normalize_std: bool,
                   gpu: bool, hints: dict | None = None):
    """Dense evaluation (Section 3.2): the whole image rescaled to Q, for the fully
    convolutional net. Sizes vary per image, so run it with batch_size=1."""
    jpegs, cls = _reader(info, split, shard_id, num_shards)
    return (_normalize(_rescaled(jpegs, scale, gpu, hints), info, normalize_std, gpu), _label(cls, info, gpu),
            _source(jpegs))


@pipeline_def
def multi_crop_pipeline(info: DatasetInfo, split: str, shard_id: int, num_shards: int, scale: int, crop: int,
                        grid: int, normalize_std: bool, gpu: bool, hints: dict | None = None):
    """Multi-crop evaluation (Section 3.2): a grid x grid regular grid of crops of the
    image rescaled to Q, as (grid*grid, C, crop, crop) per image, row by row. Their
    horizontal flips (the other 25 of the paper's 50) are taken by the consumer."""
    jpegs, cls = _reader(info, split, shard_id, num_shards)
    images = _rescaled(jpegs, scale, gpu, hints)
    steps = [i / (grid - 1) if grid > 1 else 0.5 for i in range(grid)]
    crops = [_normalize(images, info, normalize_std, gpu, crop=(crop, crop), crop_pos_x=x, crop_pos_y=y)
             for y in steps for x in steps]
    return fn.stack(*crops), _label(cls, info, gpu), _source(jpegs)


def _source(jpegs):
    """Where each sample came from, as the reader saw it ("<tar>:<offset>:<member>", zero-
    padded bytes): evaluation counts the keys its loaders returned, not the index's."""
    return fn.pad(fn.get_property(jpegs, key="source_info"), axes=[0], fill_value=0)


@pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False,
              exec_pipelined=False)
def _decode_probe():
    jpeg = fn.external_source(name="jpeg", dtype=types.UINT8, ndim=1)
    return fn.peek_image_shape(jpeg), fn.decoders.image(jpeg, output_type=types.RGB)


def _decode_error(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return next((ln for ln in lines if "failure" in ln.lower()), lines[-1] if lines else "")


def decode_errors(jpegs: list[bytes]) -> list[str | None]:
    """Each image decoded alone by DALI's decoder on the CPU (the loaders' `judge`): None,
    or why it cannot be. One probe pipeline while images decode (a failed one is no
    longer valid)."""
    probe, out = None, []
    for jpeg in jpegs:
        if probe is None:
            probe = _decode_probe()
            probe.build()
        try:
            probe.feed_input("jpeg", [np.frombuffer(jpeg, dtype=np.uint8)])
            probe.run()
            out.append(None)
        except RuntimeError as exc:
            out.append(_decode_error(exc))
            probe = None
    return out


def _device_id(device: torch.device) -> int | None:
    return device.index if device.type == "cuda" else None


def train_loader(info: DatasetInfo, split: str, *, rank: int, world_size: int, batch_size: int,
                 scale_range: tuple[int, int], crop: int, color_shift: float = 0.1, normalize_std: bool = False,
                 device: torch.device = torch.device("cpu"), seed: int = 0, epoch: int = 0, threads: int = 2,
                 decode: str = "roi", draws: Draws | None = None, channels_last: bool = False,
                 layout=None, start_step: int = 0, skip_corrupt: bool = False,
                 skip_samples: tuple[tuple[str, str], ...] = ()) -> Loader:
    """One rank's micro-batches of one epoch in the global order (pipeline/order.py).
    `layout`: how a step's global batch lies on the ranks (an `order.Split`); by default
    `batch_size` images per worker, one micro-batch a step. The order and the augmentation
    draws are a function of (seed, epoch) only, never of the rank or the world size:
    build one loader per epoch. `start_step`: the first micro-step to read (a resume; the
    ones before are not read at all). `decode`: "roi" or "whole" (see the module's
    docstring); `draws` fixes the draws and keeps shard order (GPU-versus-CPU checks).
    `channels_last`: NHWC from the graph, NCHW views out. `skip_corrupt`: read past a
    sample DALI cannot decode (pipeline/loader.py) instead of ending the pass on it;
    `skip_samples`: (shard, key) of samples already known to be corrupt, read past
    from the start without a word."""
    from pipeline.order import EpochSource, epoch_draws, epoch_order, sample_table, split_batch, steps_per_epoch

    if decode not in ("roi", "whole"):
        raise ValueError(f"decode: expected 'roi' or 'whole', got {decode!r}")
    gpu = device.type == "cuda"
    layout = layout or split_batch(batch_size * world_size, world_size)
    if layout.world != world_size:
        raise ValueError(f"layout is for {layout.world} workers, the loader for {world_size}")
    table = sample_table(*(tuple(p) for p in info.shards(split)), info.label_format)
    micro_steps = steps_per_epoch(len(table), layout.global_batch, split) * layout.accumulate
    if not 0 <= start_step <= micro_steps:
        raise ValueError(f"cannot start at micro-step {start_step} of {micro_steps}")
    n = len(table)
    if draws is None:
        order, drawn = epoch_order(n, seed, epoch), epoch_draws(n, seed, epoch, scale_range)
    else:  # shard order, the same draws for every image, no colour shift
        order, color_shift = np.arange(n), 0.0
        drawn = {"scale": np.full(n, draws.scale, np.float32), "pos_x": np.full(n, draws.pos_x, np.float32),
                 "pos_y": np.full(n, draws.pos_y, np.float32), "mirror": np.full(n, draws.mirror, np.int32),
                 "alpha": np.zeros((n, 3), np.float32)}
    known = set(skip_samples)
    bad = frozenset(i for i in range(n) if (table.tars[table.tar[i]], table.keys[i]) in known) if known else frozenset()
    source = EpochSource(table, order, drawn, split=layout, rank=rank, start=start_step, stop=micro_steps, bad=bad)

    def build(source: EpochSource):
        pipe = train_pipeline(info, source, crop, color_shift, normalize_std, gpu, decode,
                              info.decode_hints(split) if gpu else None, "HWC" if channels_last else "CHW",
                              batch_size=layout.micro, num_threads=threads, device_id=_device_id(device),
                              seed=(seed * 100_003 + epoch) * 1000 + rank + 1, prefetch_queue_depth=2)
        pipe.build()
        # Nothing is read before the first batch is asked; the source ends the epoch.
        return DALIGenericIterator(pipe, ["images", "labels", "index"], prepare_first_batch=False, auto_reset=True)

    placeholder = ((layout.micro, 3, crop, crop), torch.float16 if gpu else torch.float32)
    return Loader(build(source), len(source), device, f"train pipeline over {info.root / split}", info,
                  channels_last, judge=decode_errors, epoch=source, rebuild=build if skip_corrupt else None,
                  placeholder=placeholder)


def _build_eval(pipe, info: DatasetInfo, split: str, rank: int, world_size: int, device: torch.device, what: str,
                nhwc: bool = False) -> Loader:
    """Evaluation's Loader: `_reader`'s slice of the split for this rank, in shard order,
    which is how a failing batch's samples are found (`suspects`) without reading again."""
    from pipeline.order import sample_table

    pipe.build()
    size = pipe.max_batch_size

    def suspects(position: int):
        table = sample_table(*(tuple(p) for p in info.shards(split)), info.label_format)
        n = len(table)  # DALI's shard of the reader: rows [n * id // shards, n * (id + 1) // shards)
        rows = range(n * rank // world_size, n * (rank + 1) // world_size)
        return table, list(rows[position * size:(position + LOOKAHEAD) * size])

    it = DALIGenericIterator(pipe, ["images", "labels", "keys"], reader_name=READER, prepare_first_batch=False,
                             last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
    return Loader(it, None, device, f"{what} pipeline over {info.root / split}", info, nhwc,
                  judge=decode_errors, suspects=suspects)


def dense_loader(info: DatasetInfo, split: str, *, rank: int, world_size: int, scale: int,
                 normalize_std: bool = False, device: torch.device = torch.device("cpu"), threads: int = 2) -> Loader:
    """One whole rescaled image per batch: (1, C, H, W) with min(H, W) == Q."""
    gpu = device.type == "cuda"
    pipe = dense_pipeline(info, split, rank, world_size, scale, normalize_std, gpu,
                          info.decode_hints(split) if gpu else None, batch_size=1,
                          num_threads=threads, device_id=_device_id(device), seed=1)
    return _build_eval(pipe, info, split, rank, world_size, device, "dense")


def multi_crop_loader(info: DatasetInfo, split: str, *, rank: int, world_size: int, batch_size: int, scale: int,
                      crop: int, grid: int = 5, normalize_std: bool = False,
                      device: torch.device = torch.device("cpu"), threads: int = 2) -> Loader:
    """Batches of (N, grid*grid, C, crop, crop)."""
    gpu = device.type == "cuda"
    pipe = multi_crop_pipeline(info, split, rank, world_size, scale, crop, grid, normalize_std, gpu,
                               info.decode_hints(split) if gpu else None, batch_size=batch_size,
                               num_threads=threads, device_id=_device_id(device), seed=1)
    return _build_eval(pipe, info, split, rank, world_size, device, "multi-crop")


def eval_loader(info: DatasetInfo, split: str, *, rank: int, world_size: int, batch_size: int, scale: int,
                crop: int, normalize_std: bool = False, device: torch.device = torch.device("cpu"),
                threads: int = 2, channels_last: bool = False) -> Loader:
    gpu = device.type == "cuda"
    pipe = center_crop_pipeline(info, split, rank, world_size, scale, crop, normalize_std, gpu,
                                info.decode_hints(split) if gpu else None, "HWC" if channels_last else "CHW",
                                batch_size=batch_size, num_threads=threads, device_id=_device_id(device), seed=1)
    return _build_eval(pipe, info, split, rank, world_size, device, "eval", channels_last)
