"""A JPEG checked by its structure: every marker segment parsed and every entropy-coded
byte scanned, without Huffman decoding or inverse DCT.

What a decode with libjpeg (Pillow's, DALI's CPU decoder) refuses, and this catches:
a file cut short anywhere (no EOI after the last scan: the common ImageNet defect),
a byte that makes an unknown marker inside the scan data ("broken data stream"),
malformed or missing tables and frame or scan headers that contradict each other.
What neither catches: bit errors that leave a valid Huffman stream (libjpeg decodes
them to wrong pixels and only warns). `tests/test_jpeg.py` compares the two verdicts
on mutated files.

Sequential and progressive Huffman JPEGs with 8-bit samples (what ImageNet's JPEGs use) are
checked here; any other process (lossless, arithmetic coding, 12-bit, hierarchical)
returns False, and the caller decodes instead.
"""

from __future__ import annotations

import re

# Marker bytes libjpeg's marker reader accepts (jdmarker.c); any other after 0xFF is an error.
_KNOWN = set(range(0xC0, 0xD0)) | set(range(0xD0, 0xDC)) | {0xDD} | set(range(0xE0, 0xF0)) | {0xFE, 0x01}
_STANDALONE = set(range(0xD0, 0xD8)) | {0x01}
_SOF_CHECKED = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman)
# In scan data 0xFF is followed by 0x00 (a stuffed byte) or a restart marker; anything
# else (0xFF fill bytes included) ends the scan. (A literal first byte lets `re` skip
# ahead with a fast search: about 30 us for 50 KB here.)
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def check(data: bytes) -> bool:
    """Raise ValueError naming the defect; return True when the file was checked, False
    when it uses a process this module does not check (decode it instead)."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no SOI marker)")
    pos, frame, quant, huffman, scans = 2, None, set(), set(), 0
    progressive, scanned = False, set()  # scanned: components coded so far (sequential: once each)
    end = len(data)
    while True:
        if pos >= end:
            raise ValueError(f"truncated JPEG: no EOI marker (file ends at byte {end})")
        if data[pos] != 0xFF:  # stray bytes between segments: libjpeg skips them with a warning
            pos = data.find(b"\xff", pos)
            pos = end if pos < 0 else pos
            continue
        while pos < end and data[pos] == 0xFF:
            pos += 1
        if pos >= end:
            raise ValueError(f"truncated JPEG: no EOI marker (file ends at byte {end})")
        marker = data[pos]
        pos += 1
        if marker == 0x00:  # a stuffed 0xFF in stray bytes: skipped as well
            continue
        if marker not in _KNOWN:
            raise ValueError(f"corrupt JPEG: unknown marker 0xFF{marker:02X} at byte {pos - 2}")
        if marker == 0xD9:
            if not scans:
                raise ValueError("corrupt JPEG: EOI before any image data")
            return True
        if marker == 0xD8:
            raise ValueError(f"corrupt JPEG: second SOI at byte {pos - 2}")
        if marker in _STANDALONE:
            continue
        if pos + 2 > end:
            raise ValueError(f"truncated JPEG: segment 0xFF{marker:02X} at byte {pos - 2} is cut short")
        length = int.from_bytes(data[pos:pos + 2], "big")
        body = data[pos + 2:pos + length]
        if length < 2 or pos + length > end:
            raise ValueError(f"truncated JPEG: segment 0xFF{marker:02X} at byte {pos - 2} is cut short")
        pos += length
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            if frame is not None:
                raise ValueError("corrupt JPEG: two frame headers")
            if marker not in _SOF_CHECKED:
                return False
            frame, progressive = _frame(body), marker == 0xC2
            if frame is None:
                return False
        elif marker == 0xC4:
            huffman |= _huffman_tables(body)
        elif marker == 0xDB:
            quant |= _quant_tables(body)
        elif marker == 0xCC:
            _arithmetic_conditioning(body)
        elif marker == 0xDD and length != 4:
            raise ValueError("corrupt JPEG: restart interval segment of the wrong length")
        elif marker == 0xDA:
            comps = _scan_header(body, frame, quant, huffman, progressive)
            if not progressive and comps & scanned:
                raise ValueError(f"corrupt JPEG: component {min(comps & scanned)} is in two scans of a "
                                 "sequential JPEG")
            scanned |= comps
            scans += 1
            hit = _SCAN_END.search(data, pos)
            if hit is None:
                raise ValueError(f"truncated JPEG: scan {scans} runs to the end of the file without an EOI marker")
            pos = hit.start()


def _frame(body: bytes) -> dict[int, tuple[int, int, int]] | None:
    """Component id -> (quantisation table, horizontal and vertical sampling), or None
    for a frame this module does not check."""
    if len(body) < 6:
        raise ValueError("corrupt JPEG: frame header too short")
    precision, height, width, n = body[0], int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
    if precision != 8 or height == 0:
        return None  # 12-bit samples, or the height given later in a DNL segment
    if width == 0 or n == 0 or len(body) != 6 + 3 * n:
        raise ValueError(f"corrupt JPEG: frame header of {width}x{height} with {n} components is malformed")
    comps = {}
    for i in range(n):
        cid, hv, tq = body[6 + 3 * i:9 + 3 * i]
        if not (1 <= hv >> 4 <= 4 and 1 <= hv & 15 <= 4) or tq > 3:
            raise ValueError(f"corrupt JPEG: component {cid} has sampling {hv:#04x} or table {tq} out of range")
        comps[cid] = (tq, hv >> 4, hv & 15)
    max_h, max_v = max(h for _, h, _ in comps.values()), max(v for _, _, v in comps.values())
    for cid, (_, h, v) in comps.items():
        if max_h % h or max_v % v:  # libjpeg upsamples by whole factors only
            raise ValueError(f"corrupt JPEG: component {cid}'s sampling {h}x{v} does not divide the "
                             f"frame's {max_h}x{max_v}")
    return comps


def _huffman_tables(body: bytes) -> set[tuple[int, int]]:
    """The (class, id) of each table in a DHT segment, checked as libjpeg builds them."""
    ids, i = set(), 0
    while i < len(body):
        tc_th = body[i]
        if tc_th >> 4 > 1 or tc_th & 15 > 3 or i + 17 > len(body):
            raise ValueError("corrupt JPEG: malformed Huffman table")
        counts = body[i + 1:i + 17]
        count = sum(counts)
        if count > 256 or i + 17 + count > len(body):
            raise ValueError("corrupt JPEG: Huffman table longer than its segment")
        code = 0  # canonical codes of each length must fit in that many bits, all-ones excluded
        for bits, n in enumerate(counts, 1):
            code += n
            if code >= 1 << bits:
                raise ValueError("corrupt JPEG: Huffman table has more codes than its code lengths allow")
            code <<= 1
        if tc_th >> 4 == 0 and any(v > 15 for v in body[i + 17:i + 17 + count]):
            raise ValueError("corrupt JPEG: DC Huffman table has a symbol above 15")
        ids.add((tc_th >> 4, tc_th & 15))
        i += 17 + count
    return ids


def _quant_tables(body: bytes) -> set[int]:
    ids, i = set(), 0
    while i < len(body):
        pq, tq = body[i] >> 4, body[i] & 15
        size = 64 * (pq + 1)
        if pq > 1 or tq > 3 or i + 1 + size > len(body):
            raise ValueError("corrupt JPEG: malformed quantisation table")
        ids.add(tq)
        i += 1 + size
    return ids


def _arithmetic_conditioning(body: bytes) -> None:
    """A DAC segment (meaningless in a Huffman file, but libjpeg parses and checks it)."""
    if len(body) % 2:
        raise ValueError("corrupt JPEG: malformed arithmetic conditioning segment")
    for index, value in zip(body[::2], body[1::2]):
        if index >= 32 or (index < 16 and value & 15 > value >> 4) or (index >= 16 and not 1 <= value <= 63):
            raise ValueError("corrupt JPEG: arithmetic conditioning value out of range")


def _scan_header(body: bytes, frame: dict | None, quant: set[int], huffman: set[tuple[int, int]],
                 progressive: bool) -> set[int]:
    """Check a scan header against the frame and the tables defined so far, with
    libjpeg's rules; return the scan's components. A missing Huffman table is an error,
    except that a sequential decoder falls back to the standard tables for ids 0 and 1."""
    if frame is None:
        raise ValueError("corrupt JPEG: scan before the frame header")
    n = body[0] if body else 0
    if not 1 <= n <= 4 or len(body) != 4 + 2 * n:
        raise ValueError("corrupt JPEG: malformed scan header")
    comps, tables = list(body[1:1 + 2 * n:2]), list(body[2:2 + 2 * n:2])
    for cid, t in zip(comps, tables):
        if cid not in frame:
            raise ValueError(f"corrupt JPEG: scan names component {cid}, which the frame lacks")
        if frame[cid][0] not in quant:
            raise ValueError(f"corrupt JPEG: component {cid} uses quantisation table {frame[cid][0]}, "
                             "which is not defined")
        if t >> 4 > 3 or t & 15 > 3:
            raise ValueError("corrupt JPEG: scan names a Huffman table out of range")
    if len(set(comps)) != n:
        raise ValueError("corrupt JPEG: scan names a component twice")
    if n > 1 and sum(frame[c][1] * frame[c][2] for c in comps) > 10:
        raise ValueError("corrupt JPEG: more than 10 blocks in an interleaved MCU")
    ss, se, ah, al = body[-3], body[-2], body[-1] >> 4, body[-1] & 15
    if progressive:
        bad = se != 0 if ss == 0 else (ss > se or se > 63 or n != 1)
        if bad or (ah != 0 and al != ah - 1) or al > 13:
            raise ValueError(f"corrupt JPEG: progressive scan parameters Ss={ss} Se={se} Ah={ah} Al={al} are invalid")
        # DC first scans use a DC table; AC scans (first or refinement) an AC table
        needed = {(0, t >> 4) for t in tables} if ss == 0 and ah == 0 else set()
        needed |= {(1, t & 15) for t in tables} if ss > 0 else set()
    else:
        needed = {(c, i) for t in tables for c, i in ((0, t >> 4), (1, t & 15)) if i > 1}
    missing = sorted(needed - huffman)
    if missing:
        raise ValueError(f"corrupt JPEG: scan uses Huffman table {missing[0]} (class, id), which is not defined")
    return set(comps)
