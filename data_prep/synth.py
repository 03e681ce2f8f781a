"""The built-in small dataset: real JPEG files in ImageNet's folder layout.

Each class is a shape (disc, square, triangle, stripes, ...) drawn in a colour
family over a noisy background, at varied image sizes and aspect ratios, so a
narrow VGG learns it in a few CPU epochs. Folder names are wnid-style
(n0000000k) and LOC_synset_mapping.txt names the classes, as in Kaggle's copy.

    python -m data_prep.synth --out data/demo/imagenet [--train-per-class 80]
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (name, base hue in degrees)
CLASSES = [
    ("disc", 0),
    ("square", 60),
    ("triangle", 120),
    ("horizontal stripes", 180),
    ("vertical stripes", 240),
    ("ring", 300),
]


def wnid(index: int) -> str:
    return f"n{90000000 + index:08d}"  # outside WordNet's noun range: clearly synthetic


def _colour(rng: random.Random, hue: float) -> tuple[int, int, int]:
    h = (hue + rng.uniform(-25, 25)) % 360 / 60
    s, v = rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    r, g, b = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    m = v - c
    return tuple(int(255 * (ch + m)) for ch in (r, g, b))


def draw(cls: int, rng: random.Random, width: int, height: int) -> Image.Image:
    nprng = np.random.default_rng(rng.getrandbits(32))
    base = nprng.integers(40, 120, size=3)
    bg = np.clip(base + nprng.normal(0, 18, size=(height, width, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(img)
    name, hue = CLASSES[cls]
    fill = _colour(rng, hue)
    side = min(width, height)
    r = side * rng.uniform(0.25, 0.4)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    box = (cx - r, cy - r, cx + r, cy + r)
    if name == "disc":
        d.ellipse(box, fill=fill)
    elif name == "square":
        d.rectangle(box, fill=fill)
    elif name == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        d.polygon(pts, fill=fill)
    elif name == "ring":
        d.ellipse(box, outline=fill, width=max(2, int(r / 3)))
    else:
        step = max(4, int(side / rng.uniform(6, 10)))
        for k in range(0, max(width, height), 2 * step):
            if name == "horizontal stripes":
                d.rectangle((0, k, width, k + step - 1), fill=fill)
            else:
                d.rectangle((k, 0, k + step - 1, height), fill=fill)
    return img


def make_dataset(out: str | Path, train_per_class: int = 100, val_per_class: int = 25, seed: int = 0,
                 min_side: int = 80, max_side: int = 200) -> Path:
    """Write OUT/train/<wnid>/*.JPEG, OUT/val/<wnid>/*.JPEG and LOC_synset_mapping.txt."""
    out = Path(out)
    rng = random.Random(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(len(CLASSES)):
            folder = out / split / wnid(c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
                img = draw(c, rng, w, h)
                img.save(folder / f"{wnid(c)}_{split}_{i:05d}.JPEG", "JPEG", quality=rng.randint(75, 95))
    (out / "LOC_synset_mapping.txt").write_text(
        "".join(f"{wnid(i)} {name}\n" for i, (name, _) in enumerate(CLASSES))
    )
    return out


def make_natural_images(root: Path, n: int, large: bool = False, seed: int = 0, classes: int = 10) -> int:
    """ImageNet-sized JPEGs with natural-image statistics (smooth content plus sensor
    noise) in ROOT/train/<wnid>/, for benchmarks. "typical": longer side 500, as most of
    ILSVRC-2012; large: shorter side 600-900. Returns the bytes written."""
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        wnid = f"n{90000000 + i % classes:08d}"
        folder = root / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        if large:
            short = int(rng.integers(600, 900))
            w, h = (int(short * rng.uniform(1.2, 1.5)), short) if i % 2 else (short, int(short * 1.33))
        else:
            w, h = (500, int(rng.integers(330, 400))) if i % 3 else (int(rng.integers(330, 400)), 500)
        base = rng.integers(0, 255, size=(h // 24 + 2, w // 24 + 2, 3)).astype(np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(1.5))
        noise = rng.normal(0, 6, size=(h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))
        path = folder / f"{wnid}_{i:06d}.JPEG"
        img.save(path, quality=90)
        total += path.stat().st_size
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(make_dataset(a.out, a.train_per_class, a.val_per_class, a.seed))


if __name__ == "__main__":
    main()
