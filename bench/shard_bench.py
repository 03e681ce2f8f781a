"""Sharding throughput per worker, beside the raw rate of copying the same bytes.

    python bench/shard_bench.py [--images 400] [--out bench/results/shard-cpu.json]

Makes ImageNet-like JPEGs (natural-looking content; "typical": longer side 500 as
in most of ILSVRC-2012; "large": shorter side 600-900, which --resize-shorter 512
re-encodes), then times, on one worker:
- tar: `tar -cf` of the same files (the raw cost of reading and writing the bytes);
- repack: data_prep/shard.py's build as it runs by default (every JPEG checked by its
  structure, --check scan; colour statistics from a sample at ImageNet's ratio,
  10,000 of 1,281,167 training images; tar, index);
- repack_decode: --check decode --stats-sample 0 (a DCT-scaled decode of every image,
  statistics from every image);
- repack_full_decode: --check full --stats-sample 0 (a full-resolution decode of every
  image, statistics from every image: the repack as it was before either);
- resize512: the default with --resize-shorter 512.
Each figure is the median of --repeats interleaved rounds. Prints one JSON line and
writes it to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.shard import build  # noqa: E402
from data_prep.synth import make_natural_images as make_images  # noqa: E402


IMAGENET_STATS_RATIO = 10_000 / 1_281_167  # shard.py's default --stats-sample over ILSVRC-2012's train set


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--repeats", type=int, default=3, help="rounds; each figure is the median (default: 3)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "shard-cpu.json"))
    a = p.parse_args()
    result = {"bench": "shard", "images": a.images, "repeats": a.repeats, "workers": 1, "machine": f"{platform.node()} "
              f"({platform.machine()}, {__import__('os').cpu_count()} cores)", "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "warmup", 20, large=False, seed=1)  # imports and first-call costs, not timed
        build(tmp / "warmup", tmp / "warmup-out", splits=["train"], workers=1, resize_shorter=512, progress=False)
        build(tmp / "warmup", tmp / "warmup-scan", splits=["train"], workers=1, stats_sample=1, progress=False)
        for kind in ("typical", "large"):
            src = tmp / kind
            nbytes = make_images(src, a.images, large=kind == "large")
            def repack(name, **opts):
                opts.setdefault("stats_sample", max(1, round(a.images * IMAGENET_STATS_RATIO)))
                shutil.rmtree(tmp / f"{kind}-{name}", ignore_errors=True)
                return timed(lambda: build(src, tmp / f"{kind}-{name}", splits=["train"], samples_per_shard=100,
                                           workers=1, progress=False, **opts))

            rounds = []  # interleaved, so a slow spell of a shared machine hits every variant alike
            for _ in range(a.repeats):
                rounds.append({
                    "tar": timed(lambda: subprocess.run(["tar", "-cf", str(tmp / f"{kind}.tar"), "-C", str(src), "."],
                                                        check=True)),
                    "repack": repack("repack"),
                    "decode": repack("decode", check="decode", stats_sample=0),
                    "full": repack("full", check="full", stats_sample=0),
                    "resize": repack("resize", resize_shorter=512),
                })
            t_tar, t_repack, t_decode, t_full, t_resize = (statistics.median(r[k] for r in rounds)
                                                           for k in ("tar", "repack", "decode", "full", "resize"))
            shard_bytes = sum(f.stat().st_size for f in (tmp / f"{kind}-resize" / "train").glob("*.tar"))
            result[kind] = {
                "mean_kb": round(nbytes / a.images / 1024, 1),
                "tar_img_s": round(a.images / t_tar, 1),
                "repack_img_s": round(a.images / t_repack, 1),
                "repack_decode_img_s": round(a.images / t_decode, 1),
                "repack_full_decode_img_s": round(a.images / t_full, 1),
                "repack_vs_full_decode": round(t_full / t_repack, 2),
                "repack_vs_decode": round(t_decode / t_repack, 2),
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
