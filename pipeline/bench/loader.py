"""`python -m pipeline bench loader`: the DALI training pipeline against the loader a user
would otherwise write (webdataset + PIL + torch DataLoader, same augmentation), on the
same shards and cores, in the same run."""

from __future__ import annotations

import os
import platform

import torch

from pipeline.bench.common import PilAugment, baseline_loader, rate, resolve
from pipeline.data import train_loader


def bench_loader(shards: str, device: str = "cpu", batch_size: int = 64, seconds: float = 20.0,
                 scale_range: tuple[int, int] = (256, 512), crop: int = 224, threads: int | None = None) -> dict:
    info, split, tars = resolve(shards)
    threads = threads or os.cpu_count() or 1
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device gpu: no CUDA device visible")
    torch.set_num_threads(1)  # the loaders own the cores; no intra-op threads competing
    ours = train_loader(info, split, rank=0, world_size=1, batch_size=batch_size, scale_range=scale_range, crop=crop,
                        device=dev, threads=threads)
    pipeline_img_s, pipeline_images = rate(ours, seconds)
    del ours
    base = baseline_loader(tars, PilAugment(info, scale_range, crop, 0.1), batch_size, threads)
    if dev.type == "cuda":
        base = ((x.to(dev, non_blocking=True), y) for x, y in base)
    baseline_img_s, baseline_images = rate(base, seconds)
    return {
        "bench": "loader", "pipeline_img_s": round(pipeline_img_s, 1), "baseline_img_s": round(baseline_img_s, 1),
        "ratio": round(pipeline_img_s / baseline_img_s, 3), "device": device,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "threads": threads, "batch_size": batch_size, "crop": crop, "scale_range": list(scale_range),
        "seconds": seconds, "images_timed": {"pipeline": pipeline_images, "baseline": baseline_images},
        "shards": len(tars), "baseline": "webdataset + PIL + torch DataLoader (num_workers=threads)",
    }
