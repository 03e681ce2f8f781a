"""`python -m pipeline bench train`: training steps per second of one net on one device,
fed by synthetic batches already on the device (the compute ceiling) and, with --shards,
by the real DALI loader in the same run: the ratio and the data-wait share say whether
the loader keeps up."""

from __future__ import annotations

import os
import platform

import torch

from pipeline.bench.common import for_seconds, resolve, train_rate
from pipeline.data import train_loader


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
        info, split, tars = resolve(shards)
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
    syn = train_rate(net, for_seconds(synthetic, seconds, warmup), optimizer, dev, precision, channels_last,
                      warmup)
    result = {"bench": "train", "arch": arch, "width_mult": width_mult, "crop": crop, "batch_size": batch_size,
              "device": device, "precision": precision, "compile": compile, "seconds": seconds,
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
              "synthetic_img_s": round(syn.images_per_sec, 1), "synthetic_steps": syn.steps}
    if info is not None:
        threads = threads or os.cpu_count() or 1
        loader = train_loader(info, split, rank=0, world_size=1, batch_size=batch_size, scale_range=scale_range,
                              crop=crop, device=dev, threads=threads)
        real = train_rate(net, for_seconds(loader, seconds, warmup), optimizer, dev, precision, channels_last,
                           warmup)
        result.update(loader_img_s=round(real.images_per_sec, 1), loader_steps=real.steps,
                      data_wait_fraction=round(real.data_wait_fraction, 4),
                      loader_vs_synthetic=round(real.images_per_sec / syn.images_per_sec, 3),
                      shards=len(tars), scale_range=list(scale_range), threads=threads)
    return result
