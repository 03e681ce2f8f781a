"""What the benchmark commands share: the shard glob they are given, the loader a user
would otherwise write (webdataset + PIL + torch DataLoader with the paper's augmentation),
and the timing helpers."""

from __future__ import annotations

import glob
import random
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.dataset import DatasetInfo


def resolve(shards_glob: str) -> tuple[DatasetInfo, str, list[str]]:
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

    # webdataset hands each DataLoader worker whole shards: a worker with none raises
    # "No samples found", so there are never more workers than shards.
    workers = min(workers, len(tars))
    dataset = (wds.WebDataset(tars, shardshuffle=len(tars), nodesplitter=wds.split_by_node)
               .shuffle(1000).select(lambda s: "cls" in s or "json" in s)  # unlabelled samples: skipped
               .decode("pil").to_tuple("jpg;jpeg;JPEG", "cls;json").map(augment))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


def rate(batches, seconds: float, warmup: int = 3) -> tuple[float, int]:
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


def train_rate(model, batches, optimizer, device, precision: str, channels_last: bool, warmup: int):
    """EpochStats of training on `batches` after `warmup` untimed steps."""
    from pipeline.engine import train_one_epoch

    it = iter(batches)
    train_one_epoch(model, (next(it) for _ in range(warmup)), optimizer, device, precision=precision,
                    channels_last=channels_last, log_every=0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return train_one_epoch(model, it, optimizer, device, precision=precision, channels_last=channels_last,
                           log_every=0)


def for_seconds(batches, seconds: float, warmup: int):
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
