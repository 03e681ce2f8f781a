"""Benchmarks, one module per `python -m pipeline bench <what>` command:

- `loader` (loader.py): the DALI training pipeline against webdataset + PIL + DataLoader;
- `train` (train.py): a net's images/s on synthetic batches and fed by the real loader;
- `eval` (evaluate.py): a net's evaluation forward passes, channels last (as the protocols run) vs NCHW;
- `shard` (shard.py): data_prep/shard.py's throughput against a plain tar of the bytes;
- `gpu` (gpu.py, with gpu_checks.py, gpu_data.py, gpu_rates.py): the one-command GPU check.

What two of them share (the baseline loader, the timing helpers) is in common.py. Each
prints one JSON record with the command, machine, date and versions beside its figures,
and writes it with --out; recorded figures live in bench/results/.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def main(args) -> int:
    if args.what == "gpu":
        from pipeline.bench.gpu import run

        return run(args.shards, args.seconds, args.out, args.device, args.workdir, args.command, args.budget)
    if args.what == "train":
        from pipeline.bench.train import bench_train

        result = bench_train(args.arch, args.shards, args.device, args.batch_size, args.seconds, args.width_mult,
                             args.crop, tuple(args.scale), args.precision, args.compile, args.threads)
    elif args.what == "eval":
        from pipeline.bench.evaluate import bench_eval

        result = bench_eval(args.arch, args.device, args.batch_size, args.seconds, args.width_mult, args.crop)
    elif args.what == "shard":
        from pipeline.bench.shard import bench_shard

        result = bench_shard(args.images, args.repeats)
    else:
        from pipeline.bench.loader import bench_loader

        result = bench_loader(args.shards, args.device, args.batch_size, args.seconds, tuple(args.scale),
                              args.crop, args.threads)
    record(result, args.command, args.out)
    return 0


def record(result: dict, command: str, out: str | None) -> None:
    """Print `result` as one JSON line with what made it, and write it to `out`."""
    import torch

    from pipeline.data import DALI_VERSION

    result.update(command=command, date=time.strftime("%Y-%m-%d"),
                  machine=f"{platform.node()} ({platform.machine()}, {os.cpu_count()} cores)",
                  python=platform.python_version(),
                  versions={"torch": torch.__version__, "dali": DALI_VERSION})
    print(json.dumps(result))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
