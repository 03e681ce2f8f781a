"""`python -m pipeline bench shard`: sharding throughput per worker, beside the raw rate
of copying the same bytes.

    python -m pipeline bench shard [--images 400] [--repeats 3] [--out bench/results/shard-cpu.json]

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
Each figure is the median of --repeats interleaved rounds. Returns the JSON record;
`bench` prints it and writes it to --out.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from data_prep.shard import build
from data_prep.synth import make_natural_images as make_images


IMAGENET_STATS_RATIO = 10_000 / 1_281_167  # shard.py's default --stats-sample over ILSVRC-2012's train set


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_shard(images: int = 400, repeats: int = 3) -> dict:
    result = {"bench": "shard", "images": images, "repeats": repeats, "workers": 1}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "warmup", 20, large=False, seed=1)  # imports and first-call costs, not timed
        build(tmp / "warmup", tmp / "warmup-out", splits=["train"], workers=1, resize_shorter=512, progress=False)
        build(tmp / "warmup", tmp / "warmup-scan", splits=["train"], workers=1, stats_sample=1, progress=False)
        for kind in ("typical", "large"):
            src = tmp / kind
            nbytes = make_images(src, images, large=kind == "large")
            def repack(name, **opts):
                opts.setdefault("stats_sample", max(1, round(images * IMAGENET_STATS_RATIO)))
                shutil.rmtree(tmp / f"{kind}-{name}", ignore_errors=True)
                return timed(lambda: build(src, tmp / f"{kind}-{name}", splits=["train"], samples_per_shard=100,
                                           workers=1, progress=False, **opts))

            rounds = []  # interleaved, so a slow spell of a shared machine hits every variant alike
            for _ in range(repeats):
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
                "mean_kb": round(nbytes / images / 1024, 1),
                "tar_img_s": round(images / t_tar, 1),
                "repack_img_s": round(images / t_repack, 1),
                "repack_decode_img_s": round(images / t_decode, 1),
                "repack_full_decode_img_s": round(images / t_full, 1),
                "repack_vs_full_decode": round(t_full / t_repack, 2),
                "repack_vs_decode": round(t_decode / t_repack, 2),
                "resize512_img_s": round(images / t_resize, 1),
                "repack_vs_tar": round(t_tar / t_repack, 4),
                "resize512_bytes_ratio": round(shard_bytes / nbytes, 3),
            }
            shutil.rmtree(src)
    return result
