"""`python -m pipeline bench gpu`: the whole GPU check in one command, no Ray, no MLflow.

On a CUDA machine it (1) checks that every DALI graph gives on the GPU what it gives
on the CPU and that evaluation over 3 ranks counts every image once, (2) times the
training loader (our ROI graph, the whole-image hardware-decoder graph, webdataset +
PIL + DataLoader, torchvision's GPU decode_jpeg), (3) times VGG-16 training at batch
128 and 256 (synthetic and loader-fed, bf16 + channels_last, torch.compile off and on,
against torchvision's vgg16) and checks our torchvision key map, and (4) times dense
and 150-crop evaluation. One JSON document (stdout, and --out, rewritten after every
section so a cut-off run still leaves its figures) and a table for people.

`--device cpu` runs the same code at tiny sizes (CI keeps it from rotting); there the
"GPU" graphs are the CPU ones and parts that need CUDA or torchvision say "skipped".
Without --shards it makes ImageNet-like JPEGs (about 500x375, cut from scikit-image's
sample photos, at a quality that lands near ImageNet's ~110 KB) and shards them with
data_prep/shard.py.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from pipeline.bench import PilAugment, _for_seconds, _rate, _resolve, _train_rate, baseline_loader
from pipeline.data import DatasetInfo, Draws, dense_loader, eval_loader, multi_crop_loader, train_loader

H100_BF16_TFLOPS = 790.0  # dense bf16 peak (GPU.md: an 8192^3 matmul measured 798)
# Mean absolute difference (0-255 pixel levels) allowed between a GPU and a CPU batch of
# the same samples. JPEG decoders may differ by about one level per pixel (IEEE 1180
# IDCT accuracy: nvJPEG's IDCT is not libjpeg-turbo's), chroma upsampling may differ by a
# few levels at colour edges, and the GPU graph emits float16 (0.125 steps above 128).
# Measured differences of this kind average well under one level; 2.0 still fails any
# geometric error (a window off by one pixel, a flipped or swapped channel).
PIXEL_TOLERANCE = 2.0

SIZES = {  # per device: the real check on a GPU, the same code at toy size on a CPU
    "cuda": dict(arch="D", width_mult=1.0, crop=224, scale=(256, 512), batches=(128, 256), eval_scales=(256, 384, 512),
                 train_images=3000, val_images=600, classes=10, photo=(500, 375), jpeg_kb=110, loader_batch=256,
                 check_batch=16),
    "cpu": dict(arch="D", width_mult=1 / 16, crop=32, scale=(36, 48), batches=(4, 8), eval_scales=(36, 48, 64),
                train_images=60, val_images=31, classes=3, photo=(100, 75), jpeg_kb=5, loader_batch=8, check_batch=4),
}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "motorcycle_left", "colorwheel", "logo")


def environment(device: torch.device, command: str) -> dict:
    env = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
           "machine": platform.node(), "device": str(device)}
    try:
        import nvidia.dali

        env["dali"] = nvidia.dali.__version__
    except ImportError:  # pragma: no cover - data.py would have failed first
        env["dali"] = None
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except Exception as exc:  # noqa: BLE001 - a CUDA torchvision on a CPU torch raises odd errors
        env["torchvision"] = f"not importable ({type(exc).__name__})"
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, IndexError, subprocess.TimeoutExpired):
            env["driver"] = None
    else:
        env["device_name"] = platform.processor() or "cpu"
    return env


# ---------------------------------------------------------------- data


def _photos() -> tuple[list[np.ndarray], str]:
    """RGB sample photographs from scikit-image (bundled in its wheel), or, where it is
    not installed, the built-in synthetic shapes."""
    try:
        from skimage import data as skdata
    except ImportError:
        return [], "synthetic shapes (scikit-image not importable)"
    photos = []
    for name in PHOTOS:
        try:
            img = np.asarray(getattr(skdata, name)())
        except Exception:  # noqa: BLE001 - a sample that needs a download, or a missing one
            continue
        if img.ndim == 3 and img.shape[2] >= 3 and min(img.shape[:2]) >= 200:
            photos.append(np.ascontiguousarray(img[..., :3]).astype(np.uint8))
    return photos, f"crops of scikit-image sample photos ({len(photos)} photos)"


def make_images(root: Path, sizes: dict, seed: int = 0) -> str:
    """ImageNet's folder layout (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) of JPEGs near
    `photo` pixels, cut at random places and scales from natural photos, each randomly
    flipped, colour-scaled and given sensor grain; one process per core. Returns what
    they were cut from."""
    from concurrent.futures import ProcessPoolExecutor

    from data_prep.synth import wnid

    jobs = []
    for split, count in (("train", sizes["train_images"]), ("val", sizes["val_images"])):
        for i in range(count):
            folder = root / split / wnid(i % sizes["classes"])
            folder.mkdir(parents=True, exist_ok=True)
            jobs.append((folder / f"{split}_{i:06d}.JPEG", i % sizes["classes"], seed * 1_000_003 + len(jobs)))
    workers = min(os.cpu_count() or 1, 16)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_make_image, jobs, [sizes] * len(jobs), chunksize=max(1, len(jobs) // (workers * 4))))
    return _photos()[1]


_PHOTO_CACHE: list = []


def _make_image(job: tuple, sizes: dict) -> None:
    from PIL import Image

    from data_prep.synth import draw

    path, cls, seed = job
    if not _PHOTO_CACHE:
        _PHOTO_CACHE.append(_photos()[0])
    photos = _PHOTO_CACHE[0]
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    w, h = sizes["photo"]
    if photos:
        photo = photos[rng.randrange(len(photos))]
        ph, pw = photo.shape[:2]
        fit = min(pw / w, ph / h)
        f = rng.uniform(1.0, min(fit, 2.0)) if fit > 1 else fit
        cw, ch = max(1, int(w * f)), max(1, int(h * f))
        x, y = rng.randrange(pw - cw + 1), rng.randrange(ph - ch + 1)
        img = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((w, h), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        gain = np.array([rng.uniform(0.8, 1.2) for _ in range(3)], dtype=np.float32)
        # Sensor grain: the sample photos, enlarged, are smoother than camera JPEGs and
        # would encode to far fewer bytes than ImageNet's.
        grain = nprng.normal(0.0, 4.0, size=(h, w, 1)).astype(np.float32)
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) * gain + grain, 0, 255).astype(np.uint8))
    else:
        img = draw(cls % 6, rng, w + rng.randrange(-w // 8, w // 8 + 1), h + rng.randrange(-h // 8, h // 8 + 1))
    path.write_bytes(_jpeg_near(img, sizes["jpeg_kb"]))


def _jpeg_near(img, target_kb: float) -> bytes:
    """The JPEG of `img` at the lowest of a few qualities that reaches `target_kb`
    (ImageNet's train JPEGs average about 110 KB at about 500x375)."""
    import io

    for quality in (85, 90, 94, 97):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        if buf.tell() >= target_kb * 1024:
            break
    return buf.getvalue()


def bench_data(shards: str | None, workdir: Path, sizes: dict) -> tuple[DatasetInfo, dict]:
    """(dataset, description): the given shards, or ImageNet-like ones made here."""
    if shards:
        info, split, tars = _resolve(shards)
        return info, {"source": shards, "split": split, "shards": len(tars)}
    from data_prep.shard import build

    src = workdir / "imagenet"
    source = make_images(src, sizes)
    # Uneven shards (a short last one), as real splits have.
    per_shard = max(7, sizes["val_images"] // 3 - 3)
    build(src, workdir / "shards", samples_per_shard=per_shard, workers=os.cpu_count() or 1, progress=False)
    info = DatasetInfo.load(workdir / "shards")
    sizes_kb = [p.stat().st_size / 1024 for p in (src / "train").rglob("*.JPEG")]
    return info, {"source": source, "made_here": True, "train_images": info.counts["train"],
                  "val_images": info.counts["val"], "mean_jpeg_kb": round(float(np.mean(sizes_kb)), 1),
                  "pixels": list(sizes["photo"]), "samples_per_shard": per_shard}


# ---------------------------------------------------------------- correctness


def _compare(name: str, ref: list, got: list) -> dict:
    """Batches of the same samples from the CPU graph (`ref`) and the device graph."""
    shapes = [tuple(x.shape) for x, _ in ref] == [tuple(x.shape) for x, _ in got]
    labels = all(torch.equal(a.cpu(), b.cpu()) for (_, a), (_, b) in zip(ref, got)) and len(ref) == len(got)
    diffs = [(a.float() - b.cpu().float()).abs() for (a, _), (b, _) in zip(ref, got)] if shapes else []
    mean = float(torch.cat([d.flatten() for d in diffs]).mean()) if diffs else float("inf")
    worst = float(max(float(d.max()) for d in diffs)) if diffs else float("inf")
    ok = shapes and labels and mean <= PIXEL_TOLERANCE
    return {"graph": name, "ok": bool(ok), "shapes_equal": shapes, "labels_equal": labels,
            "mean_abs_diff": round(mean, 4), "max_abs_diff": round(worst, 3), "tolerance": PIXEL_TOLERANCE,
            "batches": len(ref)}


def _first(loader, n: int) -> list:
    out = []
    for x, y in loader:
        out.append((x.cpu(), y.cpu()))
        if len(out) == n:
            break
    return out


def check_graphs(info: DatasetInfo, device: torch.device, sizes: dict) -> list[dict]:
    cpu, crop, b = torch.device("cpu"), sizes["crop"], sizes["check_batch"]
    lo, hi = sizes["scale"]
    q = sizes["eval_scales"][0]
    draws = Draws(scale=float((lo + hi) // 2), pos_x=0.3, pos_y=0.6, mirror=1)
    results = []
    for decode in ("roi", "whole"):
        kw = dict(rank=0, world_size=1, batch_size=b, scale_range=(lo, hi), crop=crop, threads=2, draws=draws)
        ref = _first(train_loader(info, "train", device=cpu, **kw), 3)
        got = _first(train_loader(info, "train", device=device, decode=decode, **kw), 3)
        results.append(_compare(f"train (draws fixed, {decode} decode)", ref, got))
    kw = dict(rank=0, world_size=1, batch_size=b, scale=q, crop=crop, threads=2)
    results.append(_compare("centre crop", _first(eval_loader(info, "val", device=cpu, **kw), 3),
                            _first(eval_loader(info, "val", device=device, **kw), 3)))
    kw = dict(rank=0, world_size=1, scale=q, threads=2)
    results.append(_compare("dense", _first(dense_loader(info, "val", device=cpu, **kw), 8),
                            _first(dense_loader(info, "val", device=device, **kw), 8)))
    kw = dict(rank=0, world_size=1, batch_size=b, scale=q, crop=crop, threads=2)
    results.append(_compare("multi-crop", _first(multi_crop_loader(info, "val", device=cpu, **kw), 2),
                            _first(multi_crop_loader(info, "val", device=device, **kw), 2)))
    results.append(check_exactly_once(info, device, sizes, world=3))
    return results


def check_exactly_once(info: DatasetInfo, device: torch.device, sizes: dict, world: int) -> dict:
    """Evaluation on the device graph over `world` ranks reads each validation image
    once: per-rank counts and labels equal the shard index's slices, in order."""
    import pyarrow.parquet as pq

    from pipeline.protocols import rank_keys

    table = pq.read_table(info.root / "manifest.parquet", columns=["split", "key", "label"]).to_pylist()
    label_of = {r["key"]: r["label"] for r in table if r["split"] == "val"}
    seen, ok = [], True
    for rank in range(world):
        keys = rank_keys(info, "val", rank, world)
        loader = eval_loader(info, "val", rank=rank, world_size=world, batch_size=sizes["check_batch"],
                             scale=sizes["eval_scales"][0], crop=sizes["crop"], device=device, threads=2)
        labels = [int(v) for _, y in loader for v in y.cpu()]
        ok &= labels == [label_of[k] for k in keys]
        seen += keys
    ok &= len(seen) == len(set(seen)) == info.counts["val"]
    return {"graph": f"evaluation over {world} ranks, uneven shards", "ok": bool(ok), "images": len(seen),
            "unique": len(set(seen)), "expected": info.counts["val"]}


# ---------------------------------------------------------------- loaders


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
              threads=threads, shuffle_buffer=1024)
    out = {"batch_size": b, "threads": threads, "seconds": seconds}
    for decode in ("roi", "whole"):
        out[f"dali_{decode}_img_s"] = round(_rate(train_loader(info, "train", decode=decode, **kw), seconds)[0], 1)
    augment = PilAugment(info, sizes["scale"], crop, 0.1)
    out["webdataset_pil_img_s"] = round(_rate(_On(device, baseline_loader(tars, augment, b, threads)), seconds)[0], 1)
    if device.type == "cuda":
        try:
            tv = torchvision_gpu_loader(tars, info, device, b, crop, sizes["scale"], min(8, threads))
            out["torchvision_decode_jpeg_cuda_img_s"] = round(_rate(tv, seconds)[0], 1)
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
    stats = _train_rate(net, _for_seconds(batches, seconds, warmup), optimizer, device, "auto", channels_last,
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


def check_torchvision_keys(device: torch.device) -> list[dict]:
    """Our key map against real torchvision: random vgg16 and vgg16_bn weights loaded
    into our nets give torchvision's outputs."""
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001
        return [{"check": "torchvision key map", "ok": None, "skipped": f"torchvision not importable ({exc})"}]
    from pipeline.models import build_model, load_torchvision_state

    results = []
    for name, bn in (("vgg16", False), ("vgg16_bn", True)):
        torch.manual_seed(0)
        theirs = getattr(torchvision.models, name)(weights=None).eval().to(device)
        ours = build_model("D", num_classes=1000, batch_norm=bn).eval().to(device)
        load_torchvision_state(ours, theirs.state_dict())
        x = torch.randn(2, 3, 224, 224, device=device)
        with torch.no_grad():
            a, b = theirs(x).float(), ours(x).float()
        diff = float((a - b).abs().max())
        results.append({"check": f"torchvision {name} key map", "ok": diff <= 1e-4 * max(1.0, float(a.abs().max())),
                        "max_abs_diff": diff})
    return results


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
                for probs, _ in run(model, info, "val", q, sizes["crop"], False, 0, 1, device, sizes["check_batch"], 4):
                    images += probs.shape[0]
                    if time.perf_counter() - start > seconds:
                        break
            if device.type == "cuda":
                torch.cuda.synchronize()
            out[f"{name}_Q{q}_img_s"] = round(images / (time.perf_counter() - start), 1)
    out["multicrop_150_img_s"] = round(1 / sum(1 / out[f"multicrop_50_Q{q}_img_s"] for q in sizes["eval_scales"]), 1)
    return out


# ---------------------------------------------------------------- the command


def table(doc: dict) -> str:
    lines = [f"GPU check on {doc['environment'].get('device_name')} ({doc['environment']['device']}): "
             f"{'PASS' if doc.get('ok') else 'FAIL'}"]
    for c in doc.get("correctness", []):
        figures = f"mean |diff| {c['mean_abs_diff']} (tol {c['tolerance']})" if "mean_abs_diff" in c else \
            f"{c.get('images')} images, {c.get('unique')} unique of {c.get('expected')}" if "images" in c else \
            c.get("skipped", f"max |diff| {c.get('max_abs_diff')}")
        name = c.get("graph") or c.get("check")
        lines.append(f"  {'ok  ' if c.get('ok') else 'skip' if c.get('ok') is None else 'FAIL'} {name}: {figures}")
    ld = doc.get("loader", {})
    if isinstance(ld, dict) and "dali_roi_img_s" in ld:
        lines.append(f"  loader img/s: DALI roi {ld['dali_roi_img_s']}, DALI whole {ld['dali_whole_img_s']}, "
                     f"webdataset+PIL {ld['webdataset_pil_img_s']}, torchvision GPU "
                     f"{ld['torchvision_decode_jpeg_cuda_img_s']} (faster: {ld['faster_decode']})")
    tr = doc.get("train", {})
    for key, row in tr.items() if isinstance(tr, dict) else ():
        if key.startswith("batch_"):
            syn = ", ".join(f"{k.removeprefix('synthetic_')} {v['img_s']}" for k, v in row.items()
                            if k.startswith("synthetic_") and isinstance(v, dict))
            tv = row["torchvision_vgg16"]
            tv = f", torchvision vgg16 {tv['img_s']}" if isinstance(tv, dict) else ""
            lines.append(f"  {tr['arch']} train {key}: synthetic {syn}{tv} img/s; loader-fed "
                         f"{row['loader_fed']['img_s']} ({row['loader_vs_synthetic']:.1%}), data wait "
                         f"{row['loader_fed']['data_wait_fraction']:.1%}, {row['synthetic_tflop_s']} TFLOP/s")
    ev = doc.get("eval", {})
    if isinstance(ev, dict) and ev:
        lines.append("  eval img/s: " + ", ".join(f"{k.removesuffix('_img_s')} {v}" for k, v in ev.items()))
    for section, error in doc.get("errors", {}).items():
        lines.append(f"  ERROR in {section}: {error.splitlines()[-1] if error else ''}")
    return "\n".join(lines)


def run(shards: str | None, seconds: float | None, out: str | None, device_name: str, workdir: str | None = None,
        command: str | None = None) -> int:
    if device_name == "cuda" and not torch.cuda.is_available():
        print("bench gpu: no CUDA device is visible (use --device cpu for the CPU rehearsal)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if device_name == "cuda" else torch.device("cpu")
    sizes = SIZES[device_name]
    seconds = seconds if seconds is not None else (10.0 if device.type == "cuda" else 1.0)
    command = command or "python -m pipeline " + " ".join(sys.argv[1:])
    doc: dict = {"bench": "gpu", "environment": environment(device, command),
                 "sizes": sizes, "seconds": seconds, "errors": {}}

    def save():
        doc["ok"] = all(c.get("ok") is not False for c in doc.get("correctness", [])) and not doc["errors"]
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(doc, indent=1, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=workdir) as tmp:
        info, doc["data"] = bench_data(shards, Path(tmp), sizes)
        tars = info.shards("train")[0]
        save()
        sections = [("correctness", lambda: check_graphs(info, device, sizes) + check_torchvision_keys(device)),
                    ("loader", lambda: loader_throughput(info, tars, device, sizes, seconds)),
                    ("train", lambda: train_throughput(info, device, sizes, seconds,
                                                       doc.get("loader", {}).get("faster_decode", "roi"))),
                    ("eval", lambda: eval_throughput(info, device, sizes, seconds))]
        for name, section in sections:
            t0 = time.monotonic()
            try:
                doc[name] = section()
            except Exception:  # noqa: BLE001 - one broken section must not hide the others' figures
                doc["errors"][name] = traceback.format_exc()[-3000:]
            doc.setdefault("section_seconds", {})[name] = round(time.monotonic() - t0, 1)
            save()
    print(json.dumps(doc, default=str))
    print(table(doc), file=sys.stderr)
    return 0 if doc["ok"] else 1
