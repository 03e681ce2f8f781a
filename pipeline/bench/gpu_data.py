"""`bench gpu`'s data: the given shards, or ImageNet-like JPEGs made here (about 500x375,
cut from scikit-image's sample photos, at a quality that lands near ImageNet's ~110 KB)
and sharded with data_prep/shard.py."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

from pipeline.bench.common import resolve
from pipeline.dataset import DatasetInfo

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "motorcycle_left", "colorwheel", "logo")



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


def has_split(info: DatasetInfo, split: str) -> bool:
    """Whether the set has shards for `split` (a set given with --shards may have one split)."""
    try:
        return bool(info.shards(split)[0])
    except FileNotFoundError:
        return False


def bench_data(shards: str | None, workdir: Path, sizes: dict) -> tuple[DatasetInfo, dict]:
    """(dataset, description): the given shards, or ImageNet-like ones made here."""
    if shards:
        info, split, tars = resolve(shards)
        return info, {"source": shards, "split": split, "shards": len(tars), "val_split": has_split(info, "val")}
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


