"""Preflight: what `python -m pipeline train` checks before Ray is started.

A missing or half-written shard set, a split that is not there, a foreign shard set
that was never indexed, a global batch larger than the training split, a storage path
that cannot be written, or a tracking server that does not answer are each found here
in well under a second; without this they surface a minute later as a hundred lines
of Ray tracebacks. Every problem is one line naming the path, key or stage, and the
command that fixes it.

No Ray, no MLflow, no torch, no DALI here: plain files, sockets and pyarrow, so the
whole check costs less than the imports a training run needs.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.stages import Plan

SHARD = "python data_prep/shard.py"


class PreflightFailed(ValueError):
    """The plan cannot run as it stands; `problems` says why, one line each."""

    def __init__(self, problems: list["Problem"]):
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


@dataclass(frozen=True)
class Problem:
    where: str  # the path, plan key or stage it is about
    what: str
    fix: str  # the command (or setting) that fixes it

    def __str__(self) -> str:
        return f"{self.where}: {self.what}; fix: {self.fix}"


def check(plan: Plan, tracking_uri: str, *, data_here: bool = True) -> list[Problem]:
    """Every problem that would make the plan fail after Ray starts. `data_here=False`
    (a remote cluster whose nodes may see a data.root this machine does not) checks the
    shard set only when it is visible here."""
    problems: list[Problem] = []
    root = str(plan.data.root)
    if data_here or Path(root).exists():
        splits = {"data.train_split": plan.data.train_split, "data.val_split": plan.data.val_split}
        problems += check_shards(root, splits) or check_batches(plan, root)
    problems += check_storage(plan.storage)
    problems += check_tracking(tracking_uri)
    return problems


def check_from_afar(plan: Plan) -> list[Problem]:
    """What a machine that submits the plan to a cluster can check for it: the shard set
    when it sees the same folder (a shared mount), storage when it is a bucket. Local
    paths and the tracking address are the cluster's; its own preflight checks them."""
    problems: list[Problem] = []
    if Path(str(plan.data.root)).is_dir():
        problems += check_shards(str(plan.data.root), {"data.train_split": plan.data.train_split,
                                                        "data.val_split": plan.data.val_split})
    if "://" in plan.storage:
        problems += check_storage(plan.storage)
    return problems


def check_shards(root: str, splits: dict[str, str]) -> list[Problem]:
    """The shard set at `root` for each split (plan key -> split name): what
    data_prep/shard.py writes (manifest.parquet last, stats.json, classes.json,
    <split>/*.tar with a DALI .idx each), present and agreeing on the sample counts."""
    if "://" in root:
        return [Problem(f"data.root {root}", "training reads shards from a local (or mounted) folder",
                        f"{SHARD} --stage-in {root} --to /local/shards, then --set data.root=/local/shards")]
    base = Path(root)
    make = f"{SHARD} --src IMAGENET_DIR --out {root}"
    if not base.is_dir():
        return [Problem(f"data.root {root}", "no such folder", f"make the shard set: {make}, or --set data.root=")]
    tars = {key: sorted((base / split).glob("*.tar")) for key, split in splits.items()}
    problems: list[Problem] = []
    ours = (base / "job.json").is_file() or any(t.with_suffix(".meta.json").is_file() for ts in tars.values()
                                                 for t in ts)
    indexed = any(t.with_suffix(".idx").is_file() for ts in tars.values() for t in ts)
    if any(tars.values()) and not ours and not indexed and not (base / "manifest.parquet").is_file():
        # WebDataset tars written by another tool: usable in place once indexed.
        return [Problem(f"data.root {root}", "WebDataset shards that were never indexed (no DALI .idx files, no "
                        "manifest, stats or classes)", f"{SHARD} --index {root}")]
    finish = (f"rerun the {SHARD} --src ... --out {root} command that made it (finished shards are kept)" if ours
              else f"{SHARD} --index {root}")
    for key, split in splits.items():
        if not tars[key]:
            problems.append(Problem(f"{key} {base / split}", f"no .tar shards for split {split!r}",
                                    f"shard it: {SHARD} --src IMAGENET_DIR --out {root} --splits {split}, or set "
                                    f"{key} to a split under {root}"))
    manifest = base / "manifest.parquet"
    if not manifest.is_file():  # written last: without it the set is unfinished
        problems.append(Problem(str(manifest), "missing: the shard set is unfinished", finish))
    stats = _json(base / "stats.json", problems, finish)
    classes = _json(base / "classes.json", problems, finish)
    if stats is not None:
        for field in ("counts", "num_classes", "label_digits"):
            if field not in stats:
                problems.append(Problem(str(base / "stats.json"), f"no {field!r}", finish))
        if isinstance(classes, list) and stats.get("num_classes") not in (None, len(classes)):
            problems.append(Problem(str(base / "classes.json"), f"{len(classes)} classes, stats.json says "
                                    f"{stats['num_classes']}", finish))
        if splits.get("data.train_split") and "mean_rgb" not in stats:
            problems.append(Problem(str(base / "stats.json"), "no colour statistics (mean_rgb): the training split "
                                    "was not sharded", finish))
    rows = _manifest_counts(manifest, problems, finish) if manifest.is_file() else None
    for key, split in splits.items():
        if not tars[key]:
            continue
        total = 0
        for tar in tars[key]:
            idx = tar.with_suffix(".idx")
            n = _index_count(idx, problems, finish)
            total += n or 0
        counted = (stats or {}).get("counts", {})
        if isinstance(counted, dict) and stats is not None:
            if split not in counted:
                problems.append(Problem(str(base / "stats.json"), f"no count for split {split!r}", finish))
            elif counted[split] != total:
                problems.append(Problem(str(base / split), f"the DALI indexes hold {total} samples, stats.json says "
                                        f"{counted[split]}", finish))
            elif counted[split] == 0:
                problems.append(Problem(f"{key} {base / split}", "no samples (every input was rejected; see "
                                        f"{base / 'rejects.csv'})", make))
        if rows is not None and rows.get(split, 0) != total:
            problems.append(Problem(str(manifest), f"{rows.get(split, 0)} {split} samples, the DALI indexes hold "
                                    f"{total}", finish))
    problems += _sizes(base, finish)
    return problems


def check_batches(plan: Plan, root: str) -> list[Problem]:
    """Stages whose global batch is more than the training split holds: not one step an
    epoch. Found in their workers otherwise, after Ray, MLflow and a worker group started."""
    try:
        images = int(json.loads((Path(root) / "stats.json").read_text())["counts"][plan.data.train_split])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # check_shards has said what is wrong with the set
    return [Problem(f"stage {stage.name}: recipe.batch_size", f"a global batch of {stage.recipe.batch_size} is more "
                    f"than the {images} images of split {plan.data.train_split!r} (not one step an epoch)",
                    f"--set stages.{stage.name}.recipe.batch_size={images} (or less), or a larger shard set")
            for stage in plan.order() if stage.recipe.batch_size > images]


def _json(path: Path, problems: list[Problem], fix: str):
    if not path.is_file():
        problems.append(Problem(str(path), "missing", fix))
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        problems.append(Problem(str(path), f"not readable JSON ({exc})", fix))
        return None


def _index_count(idx: Path, problems: list[Problem], fix: str) -> int | None:
    if not idx.is_file():
        problems.append(Problem(str(idx), f"DALI index missing for {idx.with_suffix('.tar').name}", fix))
        return None
    try:
        with open(idx) as fh:
            return int(fh.readline().split()[1])
    except (OSError, ValueError, IndexError):
        problems.append(Problem(str(idx), "not a DALI index (its first line should be 'v1.2 N')", fix))
        return None


def _manifest_counts(manifest: Path, problems: list[Problem], fix: str) -> dict[str, int] | None:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(manifest, columns=["split"])["split"]
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        problems.append(Problem(str(manifest), f"not a readable manifest ({type(exc).__name__}: {exc})", fix))
        return None
    return {row["values"]: row["counts"] for row in pc.value_counts(column).to_pylist()}


def _sizes(base: Path, fix: str) -> list[Problem]:
    """files.json records every file's size as written: a truncated or swapped tar shows
    here at the cost of a stat."""
    path = base / "files.json"
    if not path.is_file():
        return []
    try:
        files = json.loads(path.read_text())
    except (OSError, ValueError):
        return [Problem(str(path), "not readable JSON", fix)]
    out = []
    for rel, info in sorted(files.items()):
        if not rel.endswith((".tar", ".idx")):
            continue
        f = base / rel
        if f.is_file() and f.stat().st_size != info.get("bytes"):
            out.append(Problem(str(f), f"{f.stat().st_size} bytes, files.json recorded {info.get('bytes')} when it "
                               "was written", fix))
    return out


def check_storage(storage: str) -> list[Problem]:
    """Checkpoints go here: it must take a write (a probe file, removed again)."""
    fix = "--set storage=PATH (a writable folder, or s3://bucket/prefix every node can reach)"
    probe = f".preflight-{uuid.uuid4().hex[:8]}"
    if "://" not in storage:
        path = Path(storage).resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / probe).write_bytes(b"")
            (path / probe).unlink()
        except OSError as exc:
            return [Problem(f"storage {path}", f"not writable ({exc.strerror or exc})", fix)]
        return []
    try:
        from pyarrow import fs

        if storage.startswith("s3://"):
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            kwargs = {"region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                      "connect_timeout": 2, "request_timeout": 3,
                      "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=1)}
            if endpoint:
                scheme, _, host = endpoint.partition("://")
                kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
            filesystem, path = fs.S3FileSystem(**kwargs), storage[len("s3://"):].rstrip("/")
        else:
            filesystem, path = fs.FileSystem.from_uri(storage)
        with filesystem.open_output_stream(f"{path}/{probe}") as out:
            out.write(b"")
        filesystem.delete_file(f"{path}/{probe}")
    except Exception as exc:  # noqa: BLE001 - every storage error is reported the same way
        return [Problem(f"storage {storage}", f"not writable from here ({type(exc).__name__}: {str(exc)[:200]})",
                        fix)]
    return []


def check_tracking(uri: str) -> list[Problem]:
    """The MLflow store answers: an HTTP server's /health, a database's port, or a SQLite
    file that opens (its folder writable)."""
    fix = ("start it (python -m cluster.tracking_server), or point MLFLOW_TRACKING_URI at one that runs "
           "(unset: a local SQLite file)")
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3) as response:
                if response.status == 200:
                    return []
                return [Problem(f"MLFLOW_TRACKING_URI {uri}", f"/health answered {response.status}", fix)]
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return []  # it answers; credentials are MLflow's business (MLFLOW_TRACKING_TOKEN, ...)
            return [Problem(f"MLFLOW_TRACKING_URI {uri}", f"/health answered {exc.code}", fix)]
        except (OSError, ValueError) as exc:
            return [Problem(f"MLFLOW_TRACKING_URI {uri}", f"not reachable ({getattr(exc, 'reason', exc)})", fix)]
    if parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if path is None:
            return [Problem(f"MLFLOW_TRACKING_URI {uri}", "expected sqlite:///PATH", fix)]
        try:  # a first run on a fresh machine: the store's folder (~/.vgg by default) is made here
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return [Problem(f"MLFLOW_TRACKING_URI {uri}", f"folder {path.parent} cannot be made ({exc.strerror or exc})",
                            fix)]
        if not os.access(path.parent, os.W_OK):
            return [Problem(f"MLFLOW_TRACKING_URI {uri}", f"folder {path.parent} not writable", fix)]
        if path.exists():
            try:
                with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2) as db:
                    db.execute("select count(*) from sqlite_master").fetchone()
            except sqlite3.Error as exc:
                return [Problem(f"MLFLOW_TRACKING_URI {uri}", f"not a readable SQLite database ({exc})", fix)]
        return []
    if parsed.scheme.split("+")[0] in ("postgresql", "postgres", "mysql", "mssql"):
        port = parsed.port or {"mysql": 3306, "mssql": 1433}.get(parsed.scheme.split("+")[0], 5432)
        try:
            socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout=3).close()
        except OSError as exc:
            return [Problem(f"MLFLOW_TRACKING_URI {_redact(uri)}", f"database not reachable ({exc})", fix)]
        return []
    if parsed.scheme in ("", "file"):
        return [Problem(f"MLFLOW_TRACKING_URI {uri}", "MLflow (3.13+) refuses the plain file store",
                        "use sqlite:///PATH/mlflow.db or an MLflow server")]
    return []  # a store this check does not know (databricks, ...): MLflow will say


def _redact(uri: str) -> str:
    parsed = urllib.parse.urlparse(uri)
    if parsed.password:
        return uri.replace(f":{parsed.password}@", ":***@")
    return uri
