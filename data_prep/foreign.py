"""Shards written elsewhere, used as they are: `python data_prep/shard.py --index DIR`.

Public ImageNet WebDataset sets (and anything written with webdataset's TarWriter)
hold `<key>.jpg`, `.jpeg` or `.JPEG` images with `<key>.cls` (an ASCII integer) or
`<key>.json` (an object with a label field) labels, and no DALI index. This module
reads DIR/<split>/*.tar without rewriting a byte of them and writes beside them what
the pipeline needs: one DALI `.idx` per tar that presents each good sample as the
pipeline's canonical (jpg, label) pair, pointing at the tar's own members; and
DIR/classes.json, manifest.parquet, stats.json (mean RGB and the RGB eigen
decomposition from a seeded sample of training images) and rejects.csv. A sample
with no image, no label, a label that is not an integer, or one out of range is left
out of the index and listed in rejects.csv with the reason.
"""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from data_prep import store
from data_prep.manifest import finalise
from data_prep.writer import IDX_VERSION, ShardResult, _accumulate, _digest_bytes, prepare_image

IMAGE_EXTS = ("jpg", "jpeg", "JPEG", "JPG")
HEADER_BYTES = 1 << 16  # enough of a JPEG to read its size (SOF comes before the scan data)
_CLS = re.compile(rb"(\d+)\s*")


@dataclass
class Entry:
    key: str
    label: int
    image: tuple[int, int, str]  # data offset, size, member name
    label_part: tuple[str, int, int, str]  # ext ("cls" or "json"), offset, size, member name
    width: int
    height: int


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext if dot else ""


def scan_tar(path: str, label_field: str) -> tuple[list[Entry], list[dict], int]:
    """(entries, rejects, largest label member) of one tar (a file or an s3:// object),
    reading member headers, labels and the first bytes of each image only."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    entries, rejects, label_bytes = [], [], 0
    with store.open_random(path) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        for m in tar:
            if m.isfile():
                key, ext = _split_name(m.name)
                groups.setdefault(key, {})[ext] = m
        raw = tar.fileobj
        for key, parts in groups.items():
            where = f"{path}:{key}"
            image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            if image is None:
                rejects.append({"source": where, "reason": "no image member (.jpg, .jpeg or .JPEG)"})
                continue
            if "cls" in parts:
                m = parts["cls"]
                raw.seek(m.offset_data)
                match = _CLS.fullmatch(raw.read(m.size))
                if not match:
                    rejects.append({"source": where, "reason": f"label {m.name} is not an ASCII integer"})
                    continue
                label, part = int(match.group(1)), ("cls", m.offset_data, m.size, m.name)
                label_bytes = max(label_bytes, m.size)
            elif "json" in parts:
                m = parts["json"]
                raw.seek(m.offset_data)
                try:
                    label = json.loads(raw.read(m.size))[label_field]
                except (ValueError, KeyError, TypeError):
                    rejects.append({"source": where, "reason": f"{m.name} has no {label_field!r} field"})
                    continue
                if isinstance(label, bool) or not isinstance(label, int):
                    rejects.append({"source": where, "reason": f"{m.name}: {label_field} {label!r} is not an integer"})
                    continue
                part, label_bytes = ("json", m.offset_data, m.size, m.name), max(label_bytes, m.size)
            else:
                rejects.append({"source": where, "reason": "no label member (.cls or .json)"})
                continue
            if label < 0:
                rejects.append({"source": where, "reason": f"label {label} is negative"})
                continue
            raw.seek(image.offset_data)
            try:
                from PIL import Image

                with Image.open(io.BytesIO(raw.read(min(image.size, HEADER_BYTES)))) as probe:
                    width, height = probe.size
            except Exception as exc:  # noqa: BLE001 - any unreadable header is a reject with its reason
                rejects.append({"source": where, "reason": f"image header unreadable ({type(exc).__name__})"})
                continue
            entries.append(Entry(key, label, (image.offset_data, image.size, image.name), part, width, height))
    return entries, rejects, label_bytes


def _scan(job):
    """Scan one tar and hash it (so a copy of the set can be verified file by file)."""
    from data_prep.store import digest

    return (*scan_tar(*job), digest(job[0]))


def _index_line(e: Entry) -> str:
    off, size, name = e.image
    ext, loff, lsize, lname = e.label_part
    return f"jpg {off} {size} {name} {ext} {loff} {lsize} {lname}"


def index(root: str | Path, splits: list[str] | None = None, *, label_field: str = "label",
          num_classes: int | None = None, stats_sample: int = 10_000, seed: int = 0, workers: int = 1) -> dict:
    """Index DIR/<split>/*.tar in place; returns counts, rejects and the label format."""

    if stats_sample < 1:
        raise ValueError("--stats-sample must be at least 1 with --index (the colour statistics need images)")
    root = str(root).rstrip("/") if store.is_remote(root) else str(Path(root).resolve())
    listing = [rel for rel, _ in store.listdir(root, recursive=True)]
    found = sorted({rel.split("/")[0] for rel in listing if rel.count("/") == 1 and rel.endswith(".tar")})
    splits = splits or found
    if not splits:
        raise FileNotFoundError(f"{root}: no <split>/*.tar shards")
    tars = {s: [store.join(root, rel) for rel in listing if rel.startswith(f"{s}/") and rel.count("/") == 1
                and rel.endswith(".tar")] for s in splits}
    for split, names in tars.items():
        if not names:
            raise FileNotFoundError(f"{store.join(root, split)}: no .tar shards")
    jobs = [(t, label_field) for s in splits for t in tars[s]]
    if workers > 1 and len(jobs) > 1:
        with get_context("spawn").Pool(workers) as pool:
            scanned = dict(zip([j[0] for j in jobs], pool.map(_scan, jobs)))
    else:
        scanned = {j[0]: _scan(j) for j in jobs}
    formats = {e.label_part[0] for ents, _, _, _ in scanned.values() for e in ents}
    if len(formats) > 1:
        raise ValueError(f"{root}: some samples are labelled by .cls and some by .json; index one kind at a time")
    label_format = formats.pop() if formats else "cls"
    train_split = "train" if "train" in splits else splits[0]
    labels = [e.label for t in tars[train_split] for e in scanned[t][0]]
    if not labels:
        raise ValueError(f"{store.join(root, train_split)}: no usable samples (see the rejects)")
    classes = num_classes or max(labels) + 1
    good: dict[tuple[str, str], list[Entry]] = {}
    bad: dict[tuple[str, str], list[dict]] = {}
    label_bytes = 0
    for split in splits:
        for tar in tars[split]:
            entries, rejects, jb, _ = scanned[tar]
            label_bytes = max(label_bytes, jb)
            key = (split, Path(tar).name[:-len(".tar")])
            bad[key] = list(rejects)
            good[key] = []
            for e in entries:
                if e.label >= classes:
                    reason = f"label {e.label} out of range [0, {classes})"
                    bad[key].append({"source": f"{tar}:{e.key}", "reason": reason})
                else:
                    good[key].append(e)
    stats = _stats_sample(root, train_split, good, bad, stats_sample, seed)
    done = {}
    for (split, stem), entries in good.items():
        tar = store.join(root, split, f"{stem}.tar")
        idx = f"{IDX_VERSION} {len(entries)}\n" + "".join(_index_line(e) + "\n" for e in entries)
        store.write_bytes(store.join(root, split, f"{stem}.idx"), idx.encode())
        result = ShardResult(stem, rejects=bad[(split, stem)])
        result.files = {f"{stem}.tar": scanned[tar][3], f"{stem}.idx": _digest_bytes(idx.encode())}
        result.rows = [{"key": e.key, "label": e.label, "wnid": f"class_{e.label}", "bytes": e.image[1],
                        "width": e.width, "height": e.height, "action": "indexed", "source": f"{stem}.tar:{e.image[2]}"}
                       for e in entries]
        done[(split, stem)] = result
    first = next(key for key in sorted(done) if key[0] == train_split)
    done[first].pixels, done[first].rgb_sum, done[first].rgb_outer = stats.pixels, stats.rgb_sum, stats.rgb_outer
    wnids = [f"class_{i}" for i in range(classes)]
    args = {"indexed": True, "label_field": label_field, "stats_sample": stats_sample, "seed": seed}
    counts, rejects = finalise(root, splits, train_split, done, wnids, {}, len(str(classes - 1)), args,
                                extra_stats={"label_format": label_format, "label_field": label_field,
                                             "label_bytes": label_bytes})
    return {"counts": counts, "rejects": len(rejects), "label_format": label_format, "num_classes": classes}


def _stats_sample(root: Path, train_split: str, good: dict, bad: dict, n: int, seed: int) -> ShardResult:
    """Colour statistics from a seeded sample of `n` training images, decoded at reduced
    scale (a mean and a 3x3 covariance do not need full resolution). A sampled image
    that does not decode is taken out of the index and listed with the reason."""
    pool = [(key, e) for key in sorted(good) if key[0] == train_split for e in good[key]]
    chosen = random.Random(seed).sample(pool, min(n, len(pool)))
    stats = ShardResult("stats")
    handles: dict[tuple[str, str], object] = {}
    try:
        for key, e in sorted(chosen, key=lambda ke: (ke[0], ke[1].image[0])):
            tar = store.join(root, key[0], f"{key[1]}.tar")
            fh = handles.setdefault(key, store.open_random(tar))
            fh.seek(e.image[0])
            try:
                img = prepare_image(fh.read(e.image[1]), None)[4]
            except ValueError as exc:
                good[key].remove(e)
                bad[key].append({"source": f"{tar}:{e.key}", "reason": str(exc)})
                continue
            _accumulate(stats, img)
    finally:
        for fh in handles.values():
            fh.close()
    return stats
