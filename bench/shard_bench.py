"""Sharding throughput per worker, beside the raw rate of copying the same bytes.

    python bench/shard_bench.py [--images 400] [--out bench/results/shard-cpu.json]

Makes ImageNet-like JPEGs (natural-looking content; "typical": longer side 500 as
in most of ILSVRC-2012; "large": shorter side 600-900, which --resize-shorter 512
re-encodes), then times, on one worker:
- tar: `tar -cf` of the same files (the raw cost of reading and writing the bytes);
- repack: data_prep/shard.py's build (DCT-scaled decode check, tar, index, stats);
- repack_full_decode: the same with --full-decode (the full-resolution check it replaced);
- resize512: the same with --resize-shorter 512.
Prints one JSON line and writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.shard import build  # noqa: E402
from data_prep.synth import make_natural_images as make_images  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "shard-cpu.json"))
    a = p.parse_args()
    result = {"bench": "shard", "images": a.images, "workers": 1, "machine": f"{platform.node()} "
              f"({platform.machine()}, {__import__('os').cpu_count()} cores)", "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "warmup", 20, large=False, seed=1)  # imports and first-call costs, not timed
        build(tmp / "warmup", tmp / "warmup-out", splits=["train"], workers=1, resize_shorter=512, progress=False)
        for kind in ("typical", "large"):
            src = tmp / kind
            nbytes = make_images(src, a.images, large=kind == "large")
            t_tar = timed(lambda: subprocess.run(["tar", "-cf", str(tmp / f"{kind}.tar"), "-C", str(src), "."],
                                                 check=True))
            t_repack = timed(lambda: build(src, tmp / f"{kind}-repack", splits=["train"], samples_per_shard=100,
                                           workers=1, progress=False))
            t_full = timed(lambda: build(src, tmp / f"{kind}-full", splits=["train"], samples_per_shard=100,
                                         workers=1, progress=False, full_decode=True))
            t_resize = timed(lambda: build(src, tmp / f"{kind}-resize", splits=["train"], samples_per_shard=100,
                                           workers=1, resize_shorter=512, progress=False))
            shard_bytes = sum(f.stat().st_size for f in (tmp / f"{kind}-resize" / "train").glob("*.tar"))
            result[kind] = {
                "mean_kb": round(nbytes / a.images / 1024, 1),
                "tar_img_s": round(a.images / t_tar, 1),
                "repack_img_s": round(a.images / t_repack, 1),
                "repack_full_decode_img_s": round(a.images / t_full, 1),
                "repack_vs_full_decode": round(t_full / t_repack, 2),
                "resize512_img_s": round(a.images / t_resize, 1),
                "repack_vs_tar": round(t_tar / t_repack, 4),
                "resize512_bytes_ratio": round(shard_bytes / nbytes, 3),
            }
            shutil.rmtree(src)
    line = json.dumps(result)
    print(line)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
