"""Write one WebDataset shard: images checked and normalised to RGB JPEG, a tar with
deterministic headers, a DALI index (the `wds2idx` v1.2 format) and a metadata file.

A shard is finished when, and only when, `<name>.tar` exists: the tar is written
under a temporary name and renamed last, after its index and metadata.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_prep.layouts import Source

IDX_VERSION = "v1.2"  # what DALI's wds2idx writes and fn.readers.webdataset reads
JPEG_QUALITY = 95
STATS_SIDE = 64  # colour statistics are computed on a reduced copy of each image


@dataclass
class Sample:
    key: str
    source: Source  # a file or an archive member
    label: int

    @property
    def wnid(self) -> str:
        return self.source.wnid


@dataclass
class ShardResult:
    shard: str
    rows: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    # Colour statistics over pixels (0-255 RGB): count, sum, sum of outer products.
    pixels: int = 0
    rgb_sum: list[float] = field(default_factory=lambda: [0.0] * 3)
    rgb_outer: list[list[float]] = field(default_factory=lambda: [[0.0] * 3 for _ in range(3)])


def safe_key(stem: str) -> str:
    """A key that is a safe file name without dots (WebDataset splits at the first dot)."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", stem).strip("_-")
    return key[:100] or "sample"


def prepare_image(data: bytes, resize_shorter: int | None) -> tuple[bytes, int, int, str, Image.Image]:
    """Check that `data` is a whole image; return (jpeg_bytes, width, height, action, image).

    JPEGs in RGB or greyscale are kept byte for byte; CMYK JPEGs, PNGs and others
    are converted to RGB JPEG (real ImageNet has both). Raises ValueError with a
    reason for files that are empty, truncated or not images."""
    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            probe.load()  # a full decode: truncated files fail here
            img = probe.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"not a decodable image ({type(exc).__name__}: {exc})") from None
    width, height = img.size
    action = "kept"
    if fmt != "JPEG" or img.mode not in ("RGB", "L"):
        action = f"converted {fmt} {img.mode} to RGB JPEG"
    if resize_shorter and min(width, height) > resize_shorter:
        scale = resize_shorter / min(width, height)
        img = img.convert("RGB").resize(
            (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC
        )
        action = f"resized shorter side to {resize_shorter}" + ("" if action == "kept" else f"; {action}")
    if action != "kept":
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY)
        data = buf.getvalue()
    return data, width, height, action, img


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> tuple[int, int]:
    """Add a member with fixed metadata; return (data offset, size) for the index."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    header = len(info.tobuf(tar.format, tar.encoding, tar.errors))
    offset = tar.offset + header
    tar.addfile(info, io.BytesIO(payload))
    return offset, len(payload)


def _accumulate(result: ShardResult, img: Image.Image) -> None:
    small = img.convert("RGB")
    small.thumbnail((STATS_SIDE, STATS_SIDE))
    px = np.asarray(small, dtype=np.float64).reshape(-1, 3)
    result.pixels += px.shape[0]
    result.rgb_sum = (np.asarray(result.rgb_sum) + px.sum(0)).tolist()
    result.rgb_outer = (np.asarray(result.rgb_outer) + px.T @ px).tolist()


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_shard(
    out_dir: str,
    shard: str,
    samples: list[Sample],
    label_digits: int,
    resize_shorter: int | None = None,
    collect_stats: bool = False,
) -> ShardResult:
    """Write `out_dir/<shard>.tar`, `.idx` and `.meta.json`; return rows and rejects."""
    result = ShardResult(shard)
    tar_path = os.path.join(out_dir, f"{shard}.tar")
    tmp_tar = f"{tar_path}.tmp"
    index_lines: list[str] = []
    try:
        with open(tmp_tar, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                try:
                    jpeg, width, height, action, img = prepare_image(s.source.read(), resize_shorter)
                except (ValueError, OSError) as exc:
                    result.rejects.append({"source": s.source.label, "reason": str(exc)})
                    continue
                meta = json.dumps(
                    {"wnid": s.wnid, "label": s.label, "width": width, "height": height,
                     "source": s.source.name},
                    sort_keys=True,
                ).encode()
                parts = []
                # .cls is zero-padded to a fixed width so DALI can turn it into an
                # int64 inside the graph; int("007") == 7 for webdataset users.
                for ext, payload in (("cls", f"{s.label:0{label_digits}d}".encode()), ("jpg", jpeg), ("json", meta)):
                    offset, size = _add(tar, f"{s.key}.{ext}", payload)
                    parts.append(f"{ext} {offset} {size} {s.key}.{ext}")
                index_lines.append(" ".join(parts))
                if collect_stats:
                    _accumulate(result, img)
                result.rows.append(
                    {"key": s.key, "label": s.label, "wnid": s.wnid, "source": s.source.label,
                     "bytes": len(jpeg), "width": width, "height": height, "action": action}
                )
            raw.flush()
            os.fsync(raw.fileno())
        index = f"{IDX_VERSION} {len(index_lines)}\n" + "".join(f"{line}\n" for line in index_lines)
        _write_atomic(os.path.join(out_dir, f"{shard}.idx"), index.encode())
        meta = {k: getattr(result, k) for k in ("shard", "rows", "rejects", "pixels", "rgb_sum", "rgb_outer")}
        _write_atomic(os.path.join(out_dir, f"{shard}.meta.json"), json.dumps(meta, sort_keys=True).encode())
        os.replace(tmp_tar, tar_path)  # last: from here on the shard counts as done
    except OSError as exc:
        for leftover in (tmp_tar,):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise OSError(exc.errno, f"writing shard {tar_path}: {exc.strerror or exc}") from exc
    return result


def read_meta(out_dir: str, shard: str) -> ShardResult:
    with open(os.path.join(out_dir, f"{shard}.meta.json")) as fh:
        meta = json.load(fh)
    return ShardResult(**meta)
