"""Write one WebDataset shard: images checked and normalised to RGB JPEG, a tar with
deterministic headers, a DALI index (the `wds2idx` v1.2 format) and a metadata file.

A shard is finished when, and only when, `<name>.tar` exists: the tar is written
under a temporary name and renamed last, after its index and metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_prep import jpeg
from data_prep.layouts import Source

IDX_VERSION = "v1.2"  # what DALI's wds2idx writes and fn.readers.webdataset reads
JPEG_QUALITY = 95
# Colour statistics (mean, RGB eigen-decomposition) come from each sampled image with its
# shorter side at 256: the smallest training scale (Section 3.1: S = 256, and Smin of the
# jittered [256, 512]), so the pixels the statistics describe are those a training crop is
# cut from. Smaller copies average colour detail away: 64-pixel thumbnails put the
# eigenvalues 5-25% low (tests/test_shard.py, on real photos), which weakens the colour shift.
STATS_SHORTER = 256


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
    # name -> {"bytes", "sha256"} of the shard's files, recorded as they are written, so a
    # copy anywhere else (a GPU node's local disk) can be verified against them.
    files: dict = field(default_factory=dict)


def safe_key(stem: str) -> str:
    """A key that is a safe file name without dots (WebDataset splits at the first dot)."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", stem).strip("_-")
    return key[:100] or "sample"


CHECKS = ("scan", "decode", "full")  # how a kept JPEG is checked; see prepare_image


def prepare_image(data: bytes, resize_shorter: int | None, check: str = "scan",
                  pixels: bool = True) -> tuple[bytes, int, int, str, Image.Image | None]:
    """Check that `data` is a whole image; return (jpeg_bytes, width, height, action, image).

    JPEGs in RGB or greyscale are kept byte for byte; CMYK JPEGs, PNGs and others
    are converted to RGB JPEG (real ImageNet has both). Raises ValueError with a
    reason for files that are empty, truncated or not images.

    A kept JPEG is checked by `check`:
    - "scan": its structure, every entropy-coded byte included (`data_prep.jpeg`):
      rejects what a decode rejects, at about a tenth of the cost of a 1/8-scale decode;
      the image is decoded only when `pixels` asks for it, and is None otherwise;
    - "decode": a DCT-scaled decode (libjpeg's 1/8 scaling), which entropy-decodes every
      block but skips most of the inverse DCT, upsampling and colour conversion;
    - "full": a full-resolution decode.
    With `pixels` (the colour statistics want this image), the DCT scaling stops at the
    largest reduction that keeps the shorter side at `STATS_SHORTER` or more; without it,
    "decode" reduces by 1/8. The image returned is the reduced one unless `check` is "full"."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, not {check!r}")
    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt, (width, height) = probe.format, probe.size
            re_encode = fmt != "JPEG" or probe.mode not in ("RGB", "L")
            resize = bool(resize_shorter and min(width, height) > resize_shorter)
            if not (re_encode or resize):
                checked = check == "scan" and jpeg.check(data)  # False: a process it leaves to libjpeg
                if checked and not pixels:
                    return data, width, height, "kept", None
                if check != "full" and pixels:  # libjpeg scales by 1/2, 1/4 or 1/8: the largest that
                    k = STATS_SHORTER / min(width, height)  # keeps the statistics' resolution
                    probe.draft(probe.mode, (math.ceil(width * k), math.ceil(height * k)))
                elif check != "full":  # ask for 1/8 (16 pixels a side at least)
                    probe.draft(probe.mode, (max(16, width // 8), max(16, height // 8)))
            probe.load()  # truncated files fail here
            img = probe.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"not a decodable image ({type(exc).__name__}: {exc})") from None
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


class _Tar:
    """A USTAR tar written straight to a file, byte for byte what `tarfile` writes
    (headers of fixed metadata, 512-byte blocks, two zero blocks and padding to a
    10 KiB record at the end), without its per-member overhead: only a member's name,
    size and checksum vary, so the rest of its header is built once. Its size and
    SHA-256 are taken as it is written (`digest`), not by reading it back."""

    # name(100) mode uid gid size mtime chksum type linkname(100) magic, then NULs for uname,
    # gname, devmajor, devminor and prefix (as tarfile writes them for a regular file)
    _BEFORE_SIZE = b"0000444\0" + b"0000000\0" * 2
    _AFTER_SIZE = (b"00000000000\0", b"        ", b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 247)
    _FIXED_SUM = sum(_BEFORE_SIZE) + sum(_AFTER_SIZE[0]) + sum(_AFTER_SIZE[1]) + sum(_AFTER_SIZE[2])

    def __init__(self, fh):
        self.fh, self.offset, self._sha256 = fh, 0, hashlib.sha256()

    def _write(self, data: bytes) -> None:
        self.fh.write(data)
        self._sha256.update(data)

    @classmethod
    def header(cls, name: str, size: int) -> bytes:
        encoded = name.encode("utf-8")
        if len(encoded) > 100 or size >= 8**11:  # names split into a prefix, huge members: tarfile's way
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        name_field, size_field = encoded + b"\0" * (100 - len(encoded)), b"%011o\0" % size
        checksum = cls._FIXED_SUM + sum(encoded) + sum(size_field)
        mtime, _, rest = cls._AFTER_SIZE
        return b"".join((name_field, cls._BEFORE_SIZE, size_field, mtime, b"%06o\0 " % checksum, rest))

    def add(self, name: str, payload: bytes) -> tuple[int, int]:
        """Append a member; return (data offset, size) for the index."""
        header = self.header(name, len(payload))
        pad = -len(payload) % tarfile.BLOCKSIZE
        self._write(header)
        self._write(payload)
        self._write(b"\0" * pad)
        offset = self.offset + len(header)
        self.offset = offset + len(payload) + pad
        return offset, len(payload)

    def close(self) -> None:
        end = self.offset + 2 * tarfile.BLOCKSIZE
        tail = 2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)
        self._write(b"\0" * tail)
        self.offset += tail

    def digest(self) -> dict:
        """{"bytes", "sha256"} of what was written (after close)."""
        return {"bytes": self.offset, "sha256": self._sha256.hexdigest()}


def in_stats_sample(key: str, fraction: float) -> bool:
    """Whether a sample's pixels go into the colour statistics: a fixed pseudo-random
    `fraction` of keys (a hash of the key, so the same whatever shard or worker has it)."""
    if fraction >= 1:
        return True
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return h < fraction * 2**64


def _accumulate(result: ShardResult, img: Image.Image) -> None:
    """Add an image's pixels to the colour statistics, at shorter side `STATS_SHORTER`
    (bilinear with antialiasing, as DALI rescales for training); a smaller image as it is."""
    small = img if img.mode == "RGB" else img.convert("RGB")
    w, h = small.size
    if min(w, h) > STATS_SHORTER:
        k = STATS_SHORTER / min(w, h)
        small = small.resize((max(1, round(w * k)), max(1, round(h * k))), Image.Resampling.BILINEAR)
    # One product gives all three sums: [px, 1]^T [px, 1] holds the outer products, the
    # channel sums and the count (a third of the time of separate reductions).
    rgb = np.asarray(small).reshape(-1, 3)
    a = np.empty((rgb.shape[0], 4))
    a[:, :3], a[:, 3] = rgb, 1.0
    gram = a.T @ a
    result.pixels += rgb.shape[0]
    result.rgb_sum = np.asarray(result.rgb_sum) + gram[3, :3]
    result.rgb_outer = np.asarray(result.rgb_outer) + gram[:3, :3]


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
    check: str = "scan",
    stats_fraction: float = 1.0,
) -> ShardResult:
    """Write `out_dir/<shard>.tar`, `.idx` and `.meta.json`; return rows and rejects.
    With `collect_stats`, the colour statistics come from the samples `in_stats_sample`
    picks for `stats_fraction`."""
    result = ShardResult(shard)
    tar_path = os.path.join(out_dir, f"{shard}.tar")
    tmp_tar = f"{tar_path}.tmp"
    index_lines: list[str] = []
    try:
        with open(tmp_tar, "wb") as raw:
            tar = _Tar(raw)
            for s in samples:
                try:
                    sampled = collect_stats and in_stats_sample(s.key, stats_fraction)
                    data, width, height, action, img = prepare_image(s.source.read(), resize_shorter, check, sampled)
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
                for ext, payload in (("cls", f"{s.label:0{label_digits}d}".encode()), ("jpg", data), ("json", meta)):
                    offset, size = tar.add(f"{s.key}.{ext}", payload)
                    parts.append(f"{ext} {offset} {size} {s.key}.{ext}")
                index_lines.append(" ".join(parts))
                if sampled:
                    _accumulate(result, img)
                result.rows.append(
                    {"key": s.key, "label": s.label, "wnid": s.wnid, "source": s.source.label,
                     "bytes": len(data), "width": width, "height": height, "action": action}
                )
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        result.rgb_sum, result.rgb_outer = np.asarray(result.rgb_sum).tolist(), np.asarray(result.rgb_outer).tolist()
        index = (f"{IDX_VERSION} {len(index_lines)}\n" + "".join(f"{line}\n" for line in index_lines)).encode()
        _write_atomic(os.path.join(out_dir, f"{shard}.idx"), index)
        result.files = {f"{shard}.tar": tar.digest(), f"{shard}.idx": _digest_bytes(index)}
        meta = {k: getattr(result, k) for k in ("shard", "rows", "rejects", "pixels", "rgb_sum", "rgb_outer", "files")}
        meta_bytes = json.dumps(meta, sort_keys=True).encode()
        _write_atomic(os.path.join(out_dir, f"{shard}.meta.json"), meta_bytes)
        result.files[f"{shard}.meta.json"] = _digest_bytes(meta_bytes)
        os.replace(tmp_tar, tar_path)  # last: from here on the shard counts as done
    except OSError as exc:
        for leftover in (tmp_tar,):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise OSError(exc.errno, f"writing shard {tar_path}: {exc.strerror or exc}") from exc
    return result


def _digest_bytes(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_meta(out_dir: str, shard: str) -> ShardResult:
    """A finished shard's metadata (local folder or object storage)."""
    from data_prep.store import join, read_bytes

    data = read_bytes(join(out_dir, f"{shard}.meta.json"))
    result = ShardResult(**json.loads(data))
    result.files[f"{shard}.meta.json"] = _digest_bytes(data)
    return result
