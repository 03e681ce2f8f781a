"""Benchmarks; each prints one JSON line (and writes it with --out).

`bench loader`: the DALI training pipeline against the loader a user would otherwise
write (webdataset + PIL + torch DataLoader, same augmentation), on the same shards
and cores, in the same run.

`bench train`: training steps per second of one net on one device, fed by synthetic
batches already on the device (the compute ceiling) and, with --shards, by the real
DALI loader in the same run: the ratio and the data-wait share say whether the
loader keeps up.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.data import DatasetInfo, train_loader


def _resolve(shards_glob: str) -> tuple[DatasetInfo, str, list[str]]:
    tars = sorted(glob.glob(shards_glob))
    if not tars:
        raise FileNotFoundError(f"{shards_glob}: no shards match")
    split_dirs = {Path(t).parent for t in tars}
    if len(split_dirs) != 1:
        raise ValueError(f"{shards_glob}: shards from one split folder, please (got {sorted(split_dirs)})")
    split_dir = split_dirs.pop()
    return DatasetInfo.load(split_dir.parent), split_dir.name, tars


class PilAugment:
    """The paper's augmentation as a torchvision-style user writes it, in PIL and NumPy:
    rescale the shorter side to S ~ U[Smin, Smax], random crop, flip, PCA colour shift,
    mean subtraction."""

    def __init__(self, info: DatasetInfo, scale_range: tuple[int, int], crop: int, color_shift: float):
        self.info, self.scale_range, self.crop, self.color_shift = info, scale_range, crop, color_shift
        self.eigvec = np.asarray(info.rgb_eigvec, dtype=np.float32)
        self.sqrt_eigval = np.sqrt(np.maximum(info.rgb_eigval, 0)).astype(np.float32)
        self.mean = np.asarray(info.mean_rgb, dtype=np.float32)

    def __call__(self, sample):
        from PIL import Image

        img, label = sample
        if isinstance(label, dict):  # a .json label (shards indexed in place)
            label = label[self.info.label_field]
        img = img.convert("RGB")
        s = random.uniform(*self.scale_range)
        w, h = img.size
        r = s / min(w, h)
        img = img.resize((max(self.crop, round(w * r)), max(self.crop, round(h * r))), Image.Resampling.BILINEAR)
        x = random.randint(0, img.size[0] - self.crop)
        y = random.randint(0, img.size[1] - self.crop)
        img = img.crop((x, y, x + self.crop, y + self.crop))
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        shift = self.eigvec @ (np.random.normal(0, self.color_shift, 3).astype(np.float32) * self.sqrt_eigval)
        arr = np.asarray(img, dtype=np.float32) - (self.mean - shift)
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()), int(label)


def baseline_loader(tars: list[str], augment: PilAugment, batch_size: int, workers: int):
    import webdataset as wds

    dataset = (wds.WebDataset(tars, shardshuffle=len(tars), nodesplitter=wds.split_by_node)
               .shuffle(1000).select(lambda s: "cls" in s or "json" in s)  # unlabelled samples: skipped
               .decode("pil").to_tuple("jpg;jpeg;JPEG", "cls;json").map(augment))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


def _rate(batches, seconds: float, warmup: int = 3) -> tuple[float, int]:
    """Images per second over `seconds`, after `warmup` batches."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            x, _ = next(it)
        except StopIteration:
            it = iter(batches)
            continue
        images += x.shape[0]
    return images / (time.perf_counter() - start), images


def bench_loader(shards: str, device: str = "cpu", batch_size: int = 64, seconds: float = 20.0,
                 scale_range: tuple[int, int] = (256, 512), crop: int = 224, threads: int | None = None) -> dict:
    info, split, tars = _resolve(shards)
    threads = threads or os.cpu_count() or 1
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device gpu: no CUDA device visible")
    torch.set_num_threads(1)  # the loaders own the cores; no intra-op threads competing
    ours = train_loader(info, split, rank=0, world_size=1, batch_size=batch_size, scale_range=scale_range, crop=crop,
                        device=dev, threads=threads, shuffle_buffer=1000)
    pipeline_img_s, pipeline_images = _rate(ours, seconds)
    del ours
    base = baseline_loader(tars, PilAugment(info, scale_range, crop, 0.1), batch_size, threads)
    if dev.type == "cuda":
        base = ((x.to(dev, non_blocking=True), y) for x, y in base)
    baseline_img_s, baseline_images = _rate(base, seconds)
    return {
        "bench": "loader", "pipeline_img_s": round(pipeline_img_s, 1), "baseline_img_s": round(baseline_img_s, 1),
        "ratio": round(pipeline_img_s / baseline_img_s, 3), "device": device,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "threads": threads, "batch_size": batch_size, "crop": crop, "scale_range": list(scale_range),
        "seconds": seconds, "images_timed": {"pipeline": pipeline_images, "baseline": baseline_images},
        "shards": len(tars), "baseline": "webdataset + PIL + torch DataLoader (num_workers=threads)",
    }


def _train_rate(model, batches, optimizer, device, precision: str, channels_last: bool, warmup: int):
    """EpochStats of training on `batches` after `warmup` untimed steps."""
    from pipeline.engine import train_one_epoch

    it = iter(batches)
    train_one_epoch(model, (next(it) for _ in range(warmup)), optimizer, device, precision=precision,
                    channels_last=channels_last, log_every=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return train_one_epoch(model, it, optimizer, device, precision=precision, channels_last=channels_last,
                           log_every=0)


def _for_seconds(batches, seconds: float, warmup: int):
    """Yield from `batches` (cycled) for `warmup` batches plus `seconds` of wall time."""
    def forever():
        while True:
            yield from batches

    start = None
    for i, batch in enumerate(forever()):
        if i == warmup:
            start = time.perf_counter()
        if start is not None and time.perf_counter() - start > seconds:
            return
        yield batch


def bench_train(arch: str, shards: str | None = None, device: str = "cpu", batch_size: int = 32,
                seconds: float = 20.0, width_mult: float = 1.0, crop: int = 224,
                scale_range: tuple[int, int] = (256, 512), precision: str = "auto", compile: bool = False,
                threads: int | None = None, warmup: int = 3) -> dict:
    from pipeline.engine import make_optimizer
    from pipeline.models import build_model
    from pipeline.stages import Optim

    dev = torch.device("cuda" if device == "gpu" else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device gpu: no CUDA device visible")
    info = tars = None
    if shards:
        info, split, tars = _resolve(shards)
    classes = info.num_classes if info else 1000
    model = build_model(arch, num_classes=classes, width_mult=width_mult, input_size=crop, init="kaiming").to(dev)
    channels_last = dev.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile else model
    optimizer = make_optimizer(net, Optim(lr=1e-3), batch_size)
    gen = torch.Generator().manual_seed(0)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32  # what DALI emits there
    synthetic = [(torch.randn(batch_size, 3, crop, crop, generator=gen).to(dev, dtype),
                  torch.randint(0, classes, (batch_size,), generator=gen).to(dev)) for _ in range(4)]
    syn = _train_rate(net, _for_seconds(synthetic, seconds, warmup), optimizer, dev, precision, channels_last,
                      warmup)
    result = {"bench": "train", "arch": arch, "width_mult": width_mult, "crop": crop, "batch_size": batch_size,
              "device": device, "precision": precision, "compile": compile, "seconds": seconds,
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
              "synthetic_img_s": round(syn.images_per_sec, 1), "synthetic_steps": syn.steps}
    if info is not None:
        threads = threads or os.cpu_count() or 1
        loader = train_loader(info, split, rank=0, world_size=1, batch_size=batch_size, scale_range=scale_range,
                              crop=crop, device=dev, threads=threads, shuffle_buffer=1000)
        real = _train_rate(net, _for_seconds(loader, seconds, warmup), optimizer, dev, precision, channels_last,
                           warmup)
        result.update(loader_img_s=round(real.images_per_sec, 1), loader_steps=real.steps,
                      data_wait_fraction=round(real.data_wait_fraction, 4),
                      loader_vs_synthetic=round(real.images_per_sec / syn.images_per_sec, 3),
                      shards=len(tars), scale_range=list(scale_range), threads=threads)
    return result


def main(args) -> int:
    if args.what == "gpu":
        from pipeline.gpubench import run

        return run(args.shards, args.seconds, args.out, args.device, args.workdir, args.command)
    if args.what == "train":
        result = bench_train(args.arch, args.shards, args.device, args.batch_size, args.seconds, args.width_mult,
                             args.crop, tuple(args.scale), args.precision, args.compile, args.threads)
    else:
        result = bench_loader(args.shards, args.device, args.batch_size, args.seconds, tuple(args.scale),
                              args.crop, args.threads)
    result.update(command=args.command, date=time.strftime("%Y-%m-%d"),
                  machine=f"{platform.node()} ({os.cpu_count()} cores)",
                  versions={"torch": torch.__version__, "dali": __import__("nvidia.dali").dali.__version__})
    print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0
