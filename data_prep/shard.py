"""ImageNet to WebDataset shards with DALI index files, a manifest and statistics.

    python data_prep/shard.py --src SRC --out OUT [--splits train,val]
        [--samples-per-shard N] [--workers N] [--resize-shorter PX] [--seed N] [--strict]
    python data_prep/shard.py --out OUT --verify

OUT/<split>/<split>-NNNNNN.tar (+ .idx for DALI, + .meta.json), OUT/manifest.parquet,
OUT/classes.json, OUT/stats.json (counts, mean RGB, RGB eigen-decomposition),
OUT/rejects.csv. Samples go to shards by a seeded global shuffle, so every shard
mixes classes and the same inputs and seed give the same bytes. A rerun after a
crash skips finished shards.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
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

import numpy as np

from data_prep.layouts import LayoutError, class_names, list_split
from data_prep.writer import Sample, ShardResult, read_meta, safe_key, write_shard

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
    return write_shard(*job)


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
) -> Summary:
    src, out = Path(src).resolve(), Path(out).resolve()
    splits = list(splits)
    if samples_per_shard < 1:
        raise ValueError("--samples-per-shard must be at least 1")
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

    out.mkdir(parents=True, exist_ok=True)
    args = dict(samples_per_shard=samples_per_shard, resize_shorter=resize_shorter, seed=seed)
    fingerprint = _job_fingerprint(samples, args)
    job_path = out / JOB_FILE
    if job_path.exists():
        previous = json.loads(job_path.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise RuntimeError(
                f"{out} holds shards of a different job (other sources or options); "
                "use a new --out or empty it first"
            )
    else:
        _write_text(job_path, json.dumps(dict(args, fingerprint=fingerprint, splits=splits), indent=1))

    jobs, done, written = [], {}, 0
    for split in splits:
        split_dir = out / split
        split_dir.mkdir(exist_ok=True)
        for leftover in split_dir.glob("*.tmp"):
            leftover.unlink()  # a killed run's partial files; never counted as done
        for shard, members in plan_shards(samples[split], split, samples_per_shard, seed):
            if (split_dir / f"{shard}.tar").exists() and (split_dir / f"{shard}.meta.json").exists():
                done[(split, shard)] = read_meta(str(split_dir), shard)
            else:
                jobs.append((str(split_dir), shard, members, label_digits, resize_shorter, split == train_split))
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

    counts, rejects = _finalise(out, splits, train_split, done, wnids, class_names(src), label_digits, args)
    summary = Summary(str(out), counts, len(rejects), written, skipped, time.monotonic() - started)
    if strict and rejects:
        raise RuntimeError(f"{len(rejects)} inputs rejected (see {out / 'rejects.csv'}); --strict forbids rejects")
    return summary


def _write_text(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


def _finalise(out, splits, train_split, done, wnids, names, label_digits, args):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, rejects, counts = [], [], {}
    pixels, rgb_sum, rgb_outer = 0, np.zeros(3), np.zeros((3, 3))
    for (split, shard), res in sorted(done.items()):
        for row in res.rows:
            rows.append(dict(row, split=split, shard=f"{split}/{shard}.tar"))
        rejects += [dict(r, split=split) for r in res.rejects]
        counts[split] = counts.get(split, 0) + len(res.rows)
        if split == train_split:
            pixels += res.pixels
            rgb_sum += np.asarray(res.rgb_sum)
            rgb_outer += np.asarray(res.rgb_outer)
    columns = ["split", "key", "label", "wnid", "shard", "source", "bytes", "width", "height", "action"]
    table = pa.table({c: [r[c] for r in rows] for c in columns})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _write_text(out / "manifest.parquet", buf.getvalue())
    classes = [{"index": i, "wnid": w, "name": names.get(w, w)} for i, w in enumerate(wnids)]
    _write_text(out / "classes.json", json.dumps(classes, indent=1))
    stats = {"counts": {s: counts.get(s, 0) for s in splits}, "num_classes": len(wnids),
             "label_digits": label_digits, "rejects": len(rejects), "options": args}
    if pixels:
        # The paper subtracts the training mean RGB; AlexNet's colour shift uses the
        # eigen-decomposition of the RGB covariance (both on 0-255 values).
        mean = rgb_sum / pixels
        cov = rgb_outer / pixels - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        stats.update(mean_rgb=mean.round(4).tolist(), rgb_eigval=eigval[order].round(4).tolist(),
                     rgb_eigvec=eigvec[:, order].round(6).tolist(), stats_pixels=int(pixels))
    _write_text(out / "stats.json", json.dumps(stats, indent=1))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["split", "source", "reason"])
    writer.writeheader()
    writer.writerows(rejects)
    _write_text(out / "rejects.csv", text.getvalue())
    return counts, rejects


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
    p.add_argument("--out", required=True, help="output directory for shards, manifest and stats")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
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
                  a.resize_shorter, a.seed, a.strict, progress=not a.quiet, ray_address=a.ray)
    except (LayoutError, RuntimeError, OSError, ValueError) as exc:
        print(f"shard.py: error: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in s.counts.items())
    print(f"sharded {counts} images into {s.out} ({s.shards_written} shards written, "
          f"{s.shards_skipped} already done, {s.rejects} rejected, {s.seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
