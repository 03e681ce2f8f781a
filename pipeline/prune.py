"""`python -m pipeline prune --keep-last N`: the retention rule for checkpoints.

Every stage attempt leaves a Ray Train run under the plan's storage path (`<storage>/
<trial>/checkpoint_*`), about 26 GB for a run of paper.yaml, and nothing else removes
them. This removes the checkpoints of plan runs older than the last N (by their MLflow
start time) and of superseded attempts (a failed attempt followed by a later one),
never one that something still needs:

- a registered model version's checkpoint (its run's `checkpoint` tag);
- anything of a plan run with a RUNNING MLflow run (a running stage, or a driver that
  may come back and resume it);
- any checkpoint a kept stage run names (`checkpoint`, `last_good_checkpoint`,
  `init_checkpoint`: a retry fine-tunes from its failed attempt's last good weights);
- Ray Train runs that no MLflow stage run names (not this pipeline's to judge).

Inside a run it keeps, it removes the checkpoint folders that Ray Train's own record of
the run (`checkpoint_manager_snapshot.json`) does not list, that were written before that
record, and that no MLflow run names: Ray Train copies a checkpoint straight into its
final folder, so a worker stopped while uploading, or before its report reached the
controller (a lost node, a resize, a restart), leaves a folder no resume will read, often
cut short. A run without a readable record, or a RUNNING one (uploads in flight), keeps
every folder; so does a folder newer than the record (a rerun's upload), and the facts
are read again after the storage, so a run started meanwhile keeps what it needs.

A dry run by default: it prints what it would remove and the bytes; `--yes` deletes.
Storage is a local path or a URI pyarrow opens (s3://...). The facts come from the
tracking store (pipeline/tracking.py); when it does not answer, nothing is deleted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's committed checkpoints


@dataclass(frozen=True)
class Verdict:
    path: str  # a checkpoint folder, or a whole Ray Train run once none of its checkpoints is kept
    bytes: int
    remove: bool
    why: str


def _bare(uri: str) -> str:
    """A path or URI as pyarrow names it inside its filesystem: no scheme, no trailing slash."""
    path = uri.split("://", 1)[1] if "://" in uri else os.path.realpath(uri)
    return os.path.normpath(path).rstrip("/")


def _filesystem(storage: str):
    import pyarrow.fs

    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), _bare(storage)


def _listing(fs, base: str) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Ray Train run folder -> {checkpoint folder: bytes} under `base`, and each run
    folder's own total as the entry "" ; and the newest modification time (ns) of each
    checkpoint folder's files and of each run's record."""
    import pyarrow.fs

    runs: dict[str, dict[str, int]] = {}
    mtimes: dict[str, int] = {}
    for info in fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True, recursive=True)):
        if info.type != pyarrow.fs.FileType.File:
            continue
        parts = os.path.relpath(info.path, base).split(os.sep)
        if len(parts) < 2:
            continue
        trial = runs.setdefault(f"{base}/{parts[0]}", {"": 0})
        trial[""] += info.size
        key = f"{base}/{parts[0]}/{parts[1]}"
        if len(parts) >= 3 and parts[1].startswith("checkpoint_"):
            trial[key] = trial.get(key, 0) + info.size
        if info.mtime_ns is not None and (parts[1] == SNAPSHOT or key in trial):
            mtimes[key] = max(mtimes.get(key, 0), info.mtime_ns)
    return {t: c for t, c in runs.items() if len(c) > 1}, mtimes  # only folders holding checkpoints


@dataclass(frozen=True)
class Record:
    """Ray Train's record of one run: the checkpoint folders it lists, and when it was written."""
    listed: frozenset[str]
    written_ns: int

    def disowns(self, folder: str, mtimes: dict[str, int]) -> bool:
        """`folder` is not listed and was last written before the record: an upload left
        behind, not one in flight (a rerun's upload is newer than the record it found)."""
        return folder not in self.listed and mtimes.get(folder, self.written_ns) < self.written_ns


def _recorded(fs, trial: str, mtimes: dict[str, int]) -> Record | None:
    """Ray Train's record of the run at `trial` (every `checkpoint_dir_name` in its
    snapshot: kept, latest, pending), or None without a readable one."""
    import json

    written = mtimes.get(f"{trial}/{SNAPSHOT}")
    try:
        with fs.open_input_stream(f"{trial}/{SNAPSHOT}") as stream:
            record = json.loads(stream.read())
    except (OSError, ValueError):
        return None
    if written is None or not isinstance(record, dict) or not isinstance(record.get("checkpoint_results"), list):
        return None  # not the schema this rule was written against: judge nothing by it
    names, todo = set(), [record]
    while todo:
        node = todo.pop()
        if isinstance(node, list):
            todo += node
        elif isinstance(node, dict):
            names |= {v for k, v in node.items() if k == "checkpoint_dir_name" and isinstance(v, str)}
            todo += [v for k, v in node.items() if k != "checkpoint_dir_name"]
    return Record(frozenset(f"{trial}/{n}" for n in names), written)


def judge(storage: str, keep_last: int, facts: dict, listing: dict[str, dict[str, int]],
          recorded: dict[str, Record | None] | None = None, mtimes: dict[str, int] | None = None) -> list[Verdict]:
    """What to remove and what to keep, and why, for every checkpoint under `storage`;
    `recorded` and `mtimes`: each Ray Train run's record, and when each folder was written."""
    if keep_last < 1:
        raise ValueError(f"--keep-last must be at least 1, got {keep_last}")
    plans, stages = dict(facts["plans"]), facts["stages"]
    for s in stages:  # a plan run whose parent run is gone: as recent as its latest stage run
        plans.setdefault(s["plan_run"], {"start": s["start"], "status": "UNKNOWN"})
    newest = sorted(plans, key=lambda p: -plans[p]["start"])[:keep_last]
    busy = {p for p, f in plans.items() if f["status"] == "RUNNING"} | {s["plan_run"] for s in stages
                                                                         if s["status"] == "RUNNING"}
    latest = {}
    for s in stages:
        key = (s["plan_run"], s["stage"])
        latest[key] = max(latest.get(key, 0), s["attempt"])
    owner = {f"{_bare(storage)}/{s['trial']}": s for s in stages}
    # the stage runs that stay: their checkpoints, and those their tags name, are needed
    kept_runs = [s for s in stages if s["plan_run"] in busy
                 or (s["plan_run"] in newest and s["attempt"] == latest[(s["plan_run"], s["stage"])])]
    needed = {_bare(c): f"named by stage run {s['plan_run']}/{s['stage']} (attempt {s['attempt']})"
              for s in kept_runs for c in s["checkpoints"]}
    registered = {_bare(c): ", ".join(v) for c, v in facts["registered"].items()}
    named = {_bare(c) for s in stages for c in s["checkpoints"]}  # by any stage run, kept or not
    recorded, mtimes = recorded or {}, mtimes or {}
    verdicts = []
    for trial, checkpoints in sorted(listing.items()):
        s = owner.get(trial)
        if s is None:
            verdicts += [Verdict(c, n, False, "no MLflow stage run names this Ray Train run")
                         for c, n in sorted(checkpoints.items()) if c]
            continue
        where = f"plan run {s['plan_run']}, stage {s['stage']} attempt {s['attempt']}"
        if s["plan_run"] in busy:
            why = f"{where}: the plan run is RUNNING"
        elif s["plan_run"] in newest and s["attempt"] == latest[(s["plan_run"], s["stage"])]:
            why = f"{where}: one of the last {keep_last} plan run(s)"
        else:
            why = ""
        old = (f"{where}: a later attempt exists" if s["plan_run"] in newest
               else f"{where}: older than the last {keep_last} plan run(s)")
        record = recorded.get(trial) if s["plan_run"] not in busy else None
        mine = [Verdict(c, n, True, f"{where}: not in Ray Train's record of the run ({SNAPSHOT}), written before "
                        "it: left by a worker stopped while uploading it or before reporting it")
                if why and record and record.disowns(c, mtimes) and c not in named and c not in registered else
                Verdict(c, n, False, why) if why else
                Verdict(c, n, False, f"registered as {registered[c]}") if c in registered else
                Verdict(c, n, False, needed[c]) if c in needed else
                Verdict(c, n, True, old) for c, n in sorted(checkpoints.items()) if c]
        if not why and all(v.remove for v in mine):  # nothing of it kept: the whole run folder goes
            mine = [Verdict(trial, checkpoints[""], True, f"{old} (the whole Ray Train run)")]
        verdicts += mine
    return verdicts


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def prune(storage: str, keep_last: int, tracking_uri: str, yes: bool = False, say=print) -> list[Verdict]:
    """Judge every checkpoint under `storage`, say each verdict, and with `yes` delete."""
    from pipeline.tracking import checkpoint_references

    facts = checkpoint_references(tracking_uri)  # first: no facts, no deletion
    fs, base = _filesystem(storage)
    listing, mtimes = _listing(fs, base)
    recorded = {trial: _recorded(fs, trial, mtimes) for trial in listing}
    verdicts = judge(storage, keep_last, facts, listing, recorded, mtimes)
    # the facts again, after the storage was read: what a run started meanwhile needs stays
    again = {v.path: v for v in judge(storage, keep_last, checkpoint_references(tracking_uri), listing, recorded,
                                      mtimes)}
    verdicts = [v if not v.remove or again.get(v.path) == v else
                again.get(v.path, Verdict(v.path, v.bytes, False, "the tracking store changed while prune read "
                                                                  "the storage: judged again next time"))
                for v in verdicts]
    for v in verdicts:
        say(f"{'remove' if yes else 'would remove'} {v.path} ({_size(v.bytes)}): {v.why}" if v.remove
            else f"keep {v.path}: {v.why}")
    gone = [v for v in verdicts if v.remove]
    for v in gone if yes else []:
        fs.delete_dir(v.path)
    total = _size(sum(v.bytes for v in gone))
    say(f"prune: {len(gone)} folder(s), {total} {'freed' if yes else 'would be freed'} under {storage}; "
        f"{sum(not v.remove for v in verdicts)} checkpoint(s) kept"
        + ("" if yes else " (a dry run: add --yes to delete)"))
    return verdicts
