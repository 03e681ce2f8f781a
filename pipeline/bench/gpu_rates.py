"""`bench gpu`'s throughput sections: the training loaders (our ROI graph, the whole-image
hardware-decoder graph, webdataset + PIL + DataLoader, torchvision's GPU decode_jpeg),
VGG training (synthetic and loader-fed, compile off and on, against torchvision's vgg16)
and evaluation (dense, 50 and 150 crops)."""

from __future__ import annotations

import os
import random
import time

import torch

from pipeline.bench.common import PilAugment, baseline_loader, for_seconds, rate, train_rate
from pipeline.data import DatasetInfo, train_loader

H100_BF16_TFLOPS = 790.0  # dense bf16 peak (GPU.md: an 8192^3 matmul measured 798)



class _On:
    """Batches moved to `device` (re-iterable, as the loaders it wraps)."""

    def __init__(self, device: torch.device, batches):
        self.device, self.batches = device, batches

    def __iter__(self):
        for x, y in self.batches:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


class _RawJpegs(torch.utils.data.IterableDataset):
    """(jpeg bytes, label) from the shards, for torchvision's GPU decoder."""

    def __init__(self, tars: list[str]):
        self.tars = tars

    def __iter__(self):
        import webdataset as wds

        for sample in wds.WebDataset(self.tars, shardshuffle=False, nodesplitter=wds.split_by_node,
                                     workersplitter=wds.split_by_worker):
            yield torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8), int(sample["cls"])


def torchvision_gpu_loader(tars: list[str], info: DatasetInfo, device: torch.device, batch: int, crop: int,
                           scale_range: tuple[int, int], workers: int):
    """What a user writes with torchvision on a GPU: a DataLoader of raw bytes,
    `decode_jpeg(device="cuda")` per batch, then the same augmentation in torch ops."""
    import torch.nn.functional as F
    import torchvision.io

    loader = torch.utils.data.DataLoader(_RawJpegs(tars), batch_size=batch, num_workers=workers,
                                         collate_fn=lambda s: ([x for x, _ in s], torch.tensor([y for _, y in s])),
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    mean = torch.tensor(info.mean_rgb, device=device).view(3, 1, 1)
    lo, hi = scale_range
    while True:
        for datas, labels in loader:
            images = torchvision.io.decode_jpeg(datas, device=device, mode=torchvision.io.ImageReadMode.RGB)
            out = []
            for img in images:
                h, w = img.shape[1:]
                side = crop * min(h, w) / random.uniform(lo, hi)
                x, y = int(random.uniform(0, w - side)), int(random.uniform(0, h - side))
                s = max(1, int(side))
                patch = F.interpolate(img[None, :, y:y + s, x:x + s].float(), size=(crop, crop), mode="bilinear",
                                      antialias=True, align_corners=False)[0]
                out.append(patch.flip(2) if random.random() < 0.5 else patch)
            yield (torch.stack(out) - mean).half(), labels.to(device, non_blocking=True)


def loader_throughput(info: DatasetInfo, tars: list[str], device: torch.device, sizes: dict, seconds: float) -> dict:
    b, crop, threads = sizes["loader_batch"], sizes["crop"], os.cpu_count() or 1
    kw = dict(rank=0, world_size=1, batch_size=b, scale_range=sizes["scale"], crop=crop, device=device,
              threads=threads)
    out = {"batch_size": b, "threads": threads, "seconds": seconds}
    for decode in ("roi", "whole"):
        out[f"dali_{decode}_img_s"] = round(rate(train_loader(info, "train", decode=decode, **kw), seconds)[0], 1)
    augment = PilAugment(info, sizes["scale"], crop, 0.1)
    out["webdataset_pil_img_s"] = round(rate(_On(device, baseline_loader(tars, augment, b, threads)), seconds)[0], 1)
    if device.type == "cuda":
        try:
            tv = torchvision_gpu_loader(tars, info, device, b, crop, sizes["scale"], min(8, threads, len(tars)))
            out["torchvision_decode_jpeg_cuda_img_s"] = round(rate(tv, seconds)[0], 1)
        except Exception as exc:  # noqa: BLE001 - the comparison must not sink the rest
            out["torchvision_decode_jpeg_cuda_img_s"] = f"failed: {type(exc).__name__}: {exc}"
    else:
        out["torchvision_decode_jpeg_cuda_img_s"] = "skipped: needs CUDA"
    best = max(("roi", "whole"), key=lambda d: out[f"dali_{d}_img_s"])
    out["faster_decode"] = best
    out["ours_vs_webdataset_pil"] = round(out[f"dali_{best}_img_s"] / max(out["webdataset_pil_img_s"], 1e-9), 2)
    return out


# ---------------------------------------------------------------- training


def _synthetic(batch: int, crop: int, classes: int, device: torch.device) -> list:
    g = torch.Generator().manual_seed(0)
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # what DALI emits there
    return [(torch.randn(batch, 3, crop, crop, generator=g).to(device, dtype),
             torch.randint(0, classes, (batch,), generator=g).to(device)) for _ in range(4)]


def _time_net(net, batches, device: torch.device, seconds: float, warmup: int = 5) -> dict:
    from pipeline.engine import make_optimizer
    from pipeline.stages import Optim

    optimizer = make_optimizer(net, Optim(lr=1e-4), 256)
    channels_last = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = train_rate(net, for_seconds(batches, seconds, warmup), optimizer, device, "auto", channels_last,
                        warmup)
    out = {"img_s": round(stats.images_per_sec, 1), "steps": stats.steps,
           "data_wait_fraction": round(stats.data_wait_fraction, 4)}
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def _our_net(sizes: dict, classes: int, device: torch.device, compile_: bool):
    from pipeline.models import build_model

    model = build_model(sizes["arch"], num_classes=classes, width_mult=sizes["width_mult"], input_size=sizes["crop"],
                        init="kaiming").to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile_ else model


def train_throughput(info: DatasetInfo, device: torch.device, sizes: dict, seconds: float, decode: str) -> dict:
    from pipeline.archs import get_arch
    from pipeline.models import gmacs

    torch.backends.cudnn.benchmark = device.type == "cuda"
    classes = 1000 if device.type == "cuda" else info.num_classes
    flop_per_image = gmacs(get_arch(sizes["arch"]), sizes["crop"], classes, sizes["width_mult"]) * 1e9 * 2 * 3
    out = {"arch": sizes["arch"], "crop": sizes["crop"], "width_mult": sizes["width_mult"], "classes": classes,
           "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
           "channels_last": device.type == "cuda", "gflop_per_image_fwd_bwd": round(flop_per_image / 1e9, 2)}
    compiles = (False, True) if device.type == "cuda" else (False,)
    for batch in sizes["batches"]:
        row = {}
        synthetic = _synthetic(batch, sizes["crop"], classes, device)
        for compile_ in compiles:
            net = _our_net(sizes, classes, device, compile_)
            key = "compiled" if compile_ else "eager"
            row[f"synthetic_{key}"] = _time_net(net, synthetic, device, seconds)
            del net
        if device.type != "cuda":
            row["synthetic_compiled"] = "skipped: torch.compile is timed on CUDA only"
        best = max((k for k in row if isinstance(row[k], dict)), key=lambda k: row[k]["img_s"])
        net = _our_net(sizes, classes, device, best == "synthetic_compiled")  # the same net as synthetic
        loader = train_loader(info, "train", rank=0, world_size=1, batch_size=batch, scale_range=sizes["scale"],
                              crop=sizes["crop"], device=device, threads=os.cpu_count() or 1, decode=decode)
        row["loader_fed"] = _time_net(net, loader, device, seconds)
        row["loader_fed"]["net"] = best.removeprefix("synthetic_")
        row["loader_vs_synthetic"] = round(row["loader_fed"]["img_s"] / row[best]["img_s"], 3)
        tflops = row[best]["img_s"] * flop_per_image / 1e12
        row["synthetic_tflop_s"] = round(tflops, 1) if tflops >= 1 else round(tflops, 4)
        if device.type == "cuda":
            row["share_of_790_tflop_s"] = round(tflops / H100_BF16_TFLOPS, 3)
        row["torchvision_vgg16"] = _torchvision_rate(synthetic, device, seconds, sizes)
        if isinstance(row["torchvision_vgg16"], dict):
            row["ours_vs_torchvision"] = round(row["synthetic_eager"]["img_s"] / row["torchvision_vgg16"]["img_s"], 3)
        out[f"batch_{batch}"] = row
        del net, loader, synthetic
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _torchvision_rate(synthetic, device: torch.device, seconds: float, sizes: dict):
    if device.type != "cuda" or sizes["arch"] != "D" or sizes["width_mult"] != 1.0:
        return "skipped: torchvision's vgg16 is compared on CUDA at full size only"
    import torchvision

    net = torchvision.models.vgg16(weights=None).to(device).to(memory_format=torch.channels_last)
    return _time_net(net, synthetic, device, seconds)


# ---------------------------------------------------------------- evaluation


def eval_throughput(info: DatasetInfo, device: torch.device, sizes: dict, seconds: float) -> dict:
    """Images/s of dense evaluation and of 50 crops (25 + flips) per scale; 150-crop is
    the three scales together, 1 / sum(1 / rate)."""
    from pipeline.protocols import _dense, _multicrop

    model = _our_net(sizes, info.num_classes, device, False).eval()
    out = {}
    for name, run in (("dense", _dense), ("multicrop_50", _multicrop)):
        for q in sizes["eval_scales"]:
            images, start = 0, time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.no_grad():
                for probs, *_ in run(model, info, "val", q, sizes["crop"], False, 0, 1, device, sizes["check_batch"], 4):
                    images += probs.shape[0]
                    if time.perf_counter() - start > seconds:
                        break
            if device.type == "cuda":
                torch.cuda.synchronize()
            out[f"{name}_Q{q}_img_s"] = round(images / (time.perf_counter() - start), 1)
    out["multicrop_150_img_s"] = round(1 / sum(1 / out[f"multicrop_50_Q{q}_img_s"] for q in sizes["eval_scales"]), 1)
    return out
