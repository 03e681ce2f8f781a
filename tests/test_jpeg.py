"""The structure check (`data_prep.jpeg`) against libjpeg's own verdict (Pillow's decode)."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from data_prep import jpeg


def _corpus(tmp_path) -> list[bytes]:
    """Natural-looking JPEGs in the encodings ImageNet has: baseline 4:2:0, 4:4:4 with
    optimised tables, progressive, greyscale, and with restart markers."""
    from data_prep.synth import make_natural_images

    make_natural_images(tmp_path, 8)
    files = []
    for path in sorted(tmp_path.rglob("*.JPEG")):
        img = Image.open(path)
        img = img.resize((img.width // 2, img.height // 2))
        for opts in ({"quality": 90}, {"quality": 95, "subsampling": 0, "optimize": True},
                     {"quality": 85, "progressive": True}, {"quality": 90, "restart_marker_blocks": 3}):
            buf = io.BytesIO()
            img.save(buf, "JPEG", **opts)
            files.append(buf.getvalue())
        buf = io.BytesIO()
        img.convert("L").save(buf, "JPEG", quality=90, progressive=True)
        files.append(buf.getvalue())
    return files


def _libjpeg_accepts(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft(img.mode, (img.width // 8, img.height // 8))
            img.load()
        return True
    except Exception:
        return False


def _scan_accepts(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data))  # the header parse prepare_image does first
        return jpeg.check(data)
    except Exception:
        return False


def _mutate(data: bytes, kind: str, rng: random.Random) -> bytes:
    m = bytearray(data)
    sos = data.find(b"\xff\xda")
    if kind == "truncate":
        return bytes(m[:rng.randrange(2, len(m) - 1)])
    if kind == "truncate, then EOI":
        return bytes(m[:rng.randrange(sos + 20, len(m) - 2)]) + b"\xff\xd9"
    if kind == "flip bits in scan data":
        for _ in range(rng.choice((1, 5))):
            i = rng.randrange(sos + 20, len(m) - 2)
            m[i] ^= 1 << rng.randrange(8)
    elif kind == "flip a header bit":
        i = rng.randrange(2, sos + 14)
        m[i] ^= 1 << rng.randrange(8)
    elif kind == "delete a run":
        i = rng.randrange(2, len(m) - 600)
        del m[i:i + rng.randrange(1, 500)]
    return bytes(m)


def test_the_scan_rejects_every_file_libjpeg_rejects(tmp_path):
    corpus = _corpus(tmp_path)
    for data in corpus:
        assert jpeg.check(data) is True and _libjpeg_accepts(data)
    rng = random.Random(0)
    verdicts: dict[str, dict[tuple[bool, bool], int]] = {}
    false_accepts = []
    for data in corpus:
        for kind in ("truncate", "truncate, then EOI", "flip bits in scan data", "flip a header bit", "delete a run"):
            for _ in range(6):
                m = _mutate(data, kind, rng)
                lib, scan = _libjpeg_accepts(m), _scan_accepts(m)
                counts = verdicts.setdefault(kind, {})
                counts[lib, scan] = counts.get((lib, scan), 0) + 1
                if scan and not lib:
                    false_accepts.append((kind, m[:64].hex()))
    assert not false_accepts, false_accepts
    rejected_by_lib = {k: sum(n for (lib, _), n in v.items() if not lib) for k, v in verdicts.items()}
    # the corpus exercises what matters: cut files, broken scan data, broken headers
    assert rejected_by_lib["truncate"] == 6 * len(corpus)
    assert rejected_by_lib["flip bits in scan data"] > 0 and rejected_by_lib["flip a header bit"] > 10
    # and the scan is not simply stricter: it keeps what libjpeg keeps, bar a handful
    wrongly_rejected = sum(n for v in verdicts.values() for (lib, scan), n in v.items() if lib and not scan)
    kept_by_lib = sum(n for v in verdicts.values() for (lib, _), n in v.items() if lib)
    assert wrongly_rejected <= 0.01 * kept_by_lib, verdicts


def _baseline() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((48, 64, 3)) * 255).astype("uint8")).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_defects_are_named():
    data = _baseline()
    with pytest.raises(ValueError, match="truncated JPEG: scan 1 runs to the end"):
        jpeg.check(data[:-2])
    sos = data.find(b"\xff\xda")
    broken = data[:sos + 40] + b"\xff\x79" + data[sos + 42:]
    with pytest.raises(ValueError, match="unknown marker 0xFF79"):
        jpeg.check(broken)
    with pytest.raises(ValueError, match="no SOI"):
        jpeg.check(b"\x89PNG" + data[4:])
    dqt = data.find(b"\xff\xdb")
    no_quant = data[:dqt] + data[dqt + 2 + int.from_bytes(data[dqt + 2:dqt + 4], "big"):]
    with pytest.raises(ValueError, match="quantisation table 0, which is not defined"):
        jpeg.check(no_quant)


def test_processes_it_does_not_parse_are_left_to_libjpeg():
    data = _baseline()
    sof = data.find(b"\xff\xc0")
    arithmetic = data[:sof] + b"\xff\xc9" + data[sof + 2:]
    assert jpeg.check(arithmetic) is False
    twelve_bit = data[:sof + 4] + b"\x0c" + data[sof + 5:]
    assert jpeg.check(twelve_bit) is False
