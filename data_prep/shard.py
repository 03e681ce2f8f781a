"""ImageNet to WebDataset shards with DALI index files, a manifest and statistics.

    python data_prep/shard.py --src SRC --out OUT [--splits train,val]
        [--samples-per-shard N] [--workers N] [--resize-shorter PX] [--seed N] [--strict]
        [--check scan|decode|full] [--stats-sample N]
    python data_prep/shard.py --out OUT --verify
    python data_prep/shard.py --index DIR [--stats-sample N] [--label-field label]
    python data_prep/shard.py --stage-in s3://bucket/shards --to /mnt/nvme/shards

SRC and OUT may be s3://bucket/prefix (AWS_ENDPOINT_URL for S3-compatible servers).

OUT/<split>/<split>-NNNNNN.tar (+ .idx for DALI, + .meta.json), OUT/manifest.parquet,
OUT/classes.json, OUT/stats.json (counts, mean RGB, RGB eigen-decomposition),
OUT/rejects.csv. Samples go to shards by a seeded global shuffle, so every shard
mixes classes and the same inputs and seed give the same bytes. A rerun after a
crash skips finished shards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tarfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

if __package__ in (None, ""):  # run as `python data_prep/shard.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.layouts import LayoutError, class_names, list_split
from data_prep.manifest import finalise
from data_prep.writer import CHECKS, Sample, ShardResult, read_meta, safe_key, write_shard

JOB_FILE = "job.json"


@dataclass(frozen=True)
class Summary:
    out: str
    counts: dict[str, int]
    rejects: int
    shards_written: int
    shards_skipped: int
    seconds: float


def _assign_keys(sources, labels: dict[str, int]) -> list[Sample]:
    samples, seen = [], set()
    for src in sources:
        base = safe_key(Path(src.name).stem)
        key, n = base, 1
        while key in seen:
            n += 1
            key = f"{base}_{n}"
        seen.add(key)
        samples.append(Sample(key, src, labels[src.wnid]))
    return samples


def plan_shards(samples: list[Sample], split: str, per_shard: int, seed: int) -> list[tuple[str, list[Sample]]]:
    """The seeded global shuffle: shard i holds positions [i*N, (i+1)*N) of the order."""
    order = list(samples)
    random.Random(f"{seed}:{split}").shuffle(order)
    return [
        (f"{split}-{i // per_shard:06d}", order[i : i + per_shard]) for i in range(0, len(order), per_shard)
    ]


def _job_fingerprint(split_samples: dict[str, list[Sample]], args: dict) -> str:
    h = hashlib.sha256(json.dumps(args, sort_keys=True).encode())
    for split, samples in sorted(split_samples.items()):
        for s in samples:
            h.update(f"{split}\t{s.key}\t{s.source.label}\t{s.label}\n".encode())
    return h.hexdigest()


def _run_shard(job) -> ShardResult:
    """Write one shard. For object storage (`remote` set), it is written to a local temp
    folder and uploaded index and metadata first, the tar last: the tar object's
    existence is the commit, as the rename is locally."""
    *args, remote = job
    if remote is None:
        return write_shard(*args)
    import shutil
    import tempfile

    from data_prep.store import join, upload

    tmp = tempfile.mkdtemp(prefix="shard-")
    try:
        result = write_shard(tmp, *args[1:])
        for ext in ("idx", "meta.json", "tar"):
            upload(os.path.join(tmp, f"{result.shard}.{ext}"), join(remote, f"{result.shard}.{ext}"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _run_on_ray(jobs, address: str):
    """Each shard is a Ray task (1 CPU); OUT must be a filesystem every node sees.
    Yields (job, result) as tasks finish, so progress and resumability are the same
    as with local processes: a shard counts only once its tar is renamed."""
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address)
    task = ray.remote(num_cpus=1, max_retries=2)(_run_shard)
    pending = {task.remote(job): job for job in jobs}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            yield pending.pop(ref), ray.get(ref)


class Progress:
    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.enabled = total, label, enabled
        self.done, self.start, self.last = 0, time.monotonic(), 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.5 or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0
            sys.stderr.write(
                f"\r{self.label}: {self.done}/{self.total} images  {rate:7.1f} img/s  ETA {int(eta) // 60}m{int(eta) % 60:02d}s"
            )
            if self.done >= self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def build(
    src: str | Path,
    out: str | Path,
    splits: Iterable[str] = ("train", "val"),
    samples_per_shard: int = 1000,
    workers: int = 1,
    resize_shorter: int | None = None,
    seed: int = 0,
    strict: bool = False,
    progress: bool = True,
    ray_address: str | None = None,
    check: str = "scan",
    stats_sample: int = 10_000,
) -> Summary:
    """Shard `src` into `out`. Every kept JPEG is checked by `check` (see
    `writer.prepare_image`); the colour statistics come from about `stats_sample`
    training images (a fixed hash-picked subset; 0 or less: all of them)."""
    from data_prep import store

    remote = store.is_remote(out)
    src = str(src) if store.is_remote(src) else Path(src).resolve()
    out = str(out).rstrip("/") if remote else Path(out).resolve()
    splits = list(splits)
    if samples_per_shard < 1:
        raise ValueError("--samples-per-shard must be at least 1")
    if check not in CHECKS:
        raise ValueError(f"--check must be one of {', '.join(CHECKS)}, not {check!r}")
    started = time.monotonic()
    sources = {split: list_split(src, split) for split in splits}
    train_split = "train" if "train" in sources else splits[0]
    wnids = sorted({s.wnid for s in sources[train_split]})
    if not wnids:
        raise LayoutError(f"{src}/{train_split}: no images found")
    labels = {w: i for i, w in enumerate(wnids)}  # sorted wnid order, as torchvision and Caffe
    for split, items in sources.items():
        unknown = sorted({s.wnid for s in items} - set(labels))
        if unknown:
            raise LayoutError(f"{src}/{split}: classes {unknown[:5]} do not appear in {train_split}/")
    samples = {split: _assign_keys(items, labels) for split, items in sources.items()}
    label_digits = len(str(len(wnids) - 1))

    if not remote:
        out.mkdir(parents=True, exist_ok=True)
    args = dict(samples_per_shard=samples_per_shard, resize_shorter=resize_shorter, seed=seed, check=check,
                stats_sample=max(0, stats_sample))
    n_train = len(samples[train_split])
    fraction = 1.0 if stats_sample <= 0 or stats_sample >= n_train else stats_sample / n_train
    fingerprint = _job_fingerprint(samples, args)
    job_path = store.join(out, JOB_FILE)
    if store.exists(job_path):
        previous = json.loads(store.read_bytes(job_path))
        if previous.get("fingerprint") != fingerprint:
            raise RuntimeError(
                f"{out} holds shards of a different job (other sources or options); "
                "use a new --out or empty it first"
            )
    else:
        store.write_bytes(job_path, json.dumps(dict(args, fingerprint=fingerprint, splits=splits), indent=1).encode())

    jobs, done, written = [], {}, 0
    for split in splits:
        split_dir = store.join(out, split)
        if not remote:
            Path(split_dir).mkdir(exist_ok=True)
            for leftover in Path(split_dir).glob("*.tmp"):
                leftover.unlink()  # a killed run's partial files; never counted as done
        present = {name for name, _ in store.listdir(split_dir)}
        for shard, members in plan_shards(samples[split], split, samples_per_shard, seed):
            if f"{shard}.tar" in present and f"{shard}.meta.json" in present:
                done[(split, shard)] = read_meta(split_dir, shard)
            else:
                jobs.append((split_dir, shard, members, label_digits, resize_shorter, split == train_split,
                             check, fraction, split_dir if remote else None))
    skipped = len(done)
    bar = Progress(sum(len(j[2]) for j in jobs), "sharding", progress)
    if ray_address is not None and jobs:
        for job, result in _run_on_ray(jobs, ray_address):
            done[(Path(job[0]).name, job[1])] = result
            written += 1
            bar.update(len(job[2]))
    elif workers > 1 and len(jobs) > 1:
        with get_context("spawn").Pool(workers) as pool:
            for job, result in zip(jobs, pool.imap(_run_shard, jobs)):
                done[(Path(job[0]).name, job[1])] = result
                written += 1
                bar.update(len(job[2]))
    else:
        for job in jobs:
            done[(Path(job[0]).name, job[1])] = _run_shard(job)
            written += 1
            bar.update(len(job[2]))

    for (split, shard), res in done.items():  # shards from before hashes were recorded
        for name in (f"{shard}.tar", f"{shard}.idx"):
            if name not in res.files:
                res.files[name] = store.digest(store.join(out, split, name))
    counts, rejects = finalise(out, splits, train_split, done, wnids, class_names(src), label_digits, args)
    summary = Summary(str(out), counts, len(rejects), written, skipped, time.monotonic() - started)
    if strict and rejects:
        raise RuntimeError(f"{len(rejects)} inputs rejected (see {store.join(out, 'rejects.csv')}); "
                           "--strict forbids rejects")
    return summary


def verify(out: str | Path) -> list[str]:
    """Re-read every shard and compare it with the manifest; return the problems."""
    import pyarrow.parquet as pq

    out = Path(out)
    problems: list[str] = []
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    by_shard: dict[str, dict[str, dict]] = {}
    for row in manifest:
        by_shard.setdefault(row["shard"], {})[row["key"]] = row
    for shard, rows in sorted(by_shard.items()):
        path = out / shard
        if not path.exists():
            problems.append(f"{shard}: missing")
            continue
        if not path.with_suffix(".idx").exists():
            problems.append(f"{shard}: missing DALI index {path.with_suffix('.idx').name}")
        seen = {}
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext == "jpg":
                    seen[key] = member.size
        for key, row in rows.items():
            if key not in seen:
                problems.append(f"{shard}: sample {key} is in the manifest but not in the tar")
            elif seen[key] != row["bytes"]:
                problems.append(f"{shard}: sample {key} has {seen[key]} bytes, manifest says {row['bytes']}")
        for key in sorted(set(seen) - set(rows)):
            problems.append(f"{shard}: sample {key} is in the tar but not in the manifest")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", help="ImageNet root: SRC/train/<wnid>/*.JPEG, SRC/val/... (see layouts)")
    p.add_argument("--out", help="output directory for shards, manifest and stats")
    p.add_argument("--index", metavar="DIR", help="make WebDataset shards written elsewhere (DIR/<split>/*.tar) usable "
                                                  "as they are: DALI indexes, classes.json, manifest, stats; the tars "
                                                  "are never rewritten")
    p.add_argument("--stage-in", metavar="SRC", help="copy a shard set (s3://bucket/prefix or a folder) to --to, "
                                                     "checking every file against its recorded size and SHA-256")
    p.add_argument("--to", help="with --stage-in: the local folder, e.g. /mnt/nvme/shards")
    p.add_argument("--rehash", action="store_true", help="with --stage-in: re-check files already verified")
    p.add_argument("--stats-sample", type=int, default=10_000, metavar="N",
                   help="training images (a seeded sample; about N when sharding) the colour statistics come from "
                        "(default: 10,000; when sharding, 0 means every one)")
    p.add_argument("--label-field", default="label", help="with --index: the label's key in .json labels")
    p.add_argument("--num-classes", type=int, help="with --index: labels must be below this (default: the largest "
                                                    "training label + 1)")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to shard (default: train,val)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="images per tar (default: 1000)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--resize-shorter", type=int, default=None, metavar="PX",
                   help="re-encode images whose shorter side exceeds PX (VGG never uses more than S=512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle that assigns samples to shards")
    p.add_argument("--strict", action="store_true", help="exit non-zero if any input is rejected")
    p.add_argument("--verify", action="store_true", help="re-read finished OUT and check it against the manifest")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run each shard as a Ray task on this cluster ('auto', host:port, or 'local' for a "
                        "local Ray); OUT must be shared by every node")
    p.add_argument("--check", choices=CHECKS, default="scan",
                   help="how each kept JPEG is checked: scan (default) parses every marker segment and scans every "
                        "entropy-coded byte, which rejects what a decode rejects (truncation, broken data, bad "
                        "tables) at a fraction of the cost; decode: a DCT-scaled (1/8) decode; full: a "
                        "full-resolution decode")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.stage_in:
        from data_prep.stagein import stage_in

        if not a.to:
            p.error("--stage-in needs --to DIR")
        try:
            r = stage_in(a.stage_in, a.to, workers=a.workers, rehash=a.rehash,
                         log=lambda m: print(m, file=sys.stderr))
        except (OSError, RuntimeError, ValueError) as exc:
            print(f"shard.py: error: {exc}", file=sys.stderr)
            return 1
        print(f"staged {a.stage_in} into {a.to}: {r['copied']} files copied and verified "
              f"({r['bytes'] / 1e9:.2f} GB), {r['skipped']} already verified, {r['removed']} stale removed")
        return 0
    if a.index:
        from data_prep.foreign import index

        try:
            r = index(a.index, [x for x in a.splits.split(",") if x] if a.splits != "train,val" else None,
                      label_field=a.label_field, num_classes=a.num_classes, stats_sample=a.stats_sample, seed=a.seed,
                      workers=a.workers)
        except (OSError, ValueError) as exc:
            print(f"shard.py: error: {exc}", file=sys.stderr)
            return 2
        counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items())
        print(f"indexed {counts} images in {a.index} ({r['label_format']} labels, {r['num_classes']} classes, "
              f"{r['rejects']} rejected: see {Path(a.index) / 'rejects.csv'})")
        return 0
    if not a.out:
        p.error("--out is required unless --index")
    if a.verify:
        problems = verify(a.out)
        for line in problems:
            print(line, file=sys.stderr)
        print(f"verify {a.out}: {'OK' if not problems else f'{len(problems)} problems'}")
        return 1 if problems else 0
    if not a.src:
        p.error("--src is required unless --verify")
    try:
        s = build(a.src, a.out, [x for x in a.splits.split(",") if x], a.samples_per_shard, a.workers,
                  a.resize_shorter, a.seed, a.strict, progress=not a.quiet, ray_address=a.ray,
                  check=a.check, stats_sample=a.stats_sample)
    except (LayoutError, RuntimeError, OSError, ValueError) as exc:
        print(f"shard.py: error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in s.counts.items())
    print(f"sharded {counts} images into {s.out} ({s.shards_written} shards written, "
          f"{s.shards_skipped} already done, {s.rejects} rejected, {s.seconds:.1f}s)"
          + (f"; each rejected input and why: {str(s.out).rstrip('/')}/rejects.csv" if s.rejects else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
