"""Verified stage-in: `python data_prep/shard.py --stage-in s3://bucket/shards --to /mnt/nvme/shards`.

Copies a shard set (from object storage or another folder) to local disk, in
parallel, and checks every file against `files.json`, the size and SHA-256 recorded
when the set was written. A file takes its name only once it matches (it streams to
`<name>.part` first), so a GPU node never trains on a shard that was not verified.
Verified files are recorded in `<to>/.stage-in.json` with their size and mtime: a
rerun (after a kill, or on a warm node) skips them unless they changed on disk, and
a changed or corrupted copy is fetched again. `files.json` is written last: its
presence means the whole set is here and verified. A file an earlier stage-in put here
that the set no longer lists (the data changed) is removed: training reads every tar in
the folder. A stage-in that fails says why in `<to>/.stage-in.failed`, which training on
that node reports (`check_staged`), so a node whose stage-in failed can stay up and say
why instead of being relaunched by the autoscaler in a loop.
"""

from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from data_prep import store

STATE = ".stage-in.json"
FAILED = ".stage-in.failed"


def _load_state(to: Path) -> dict:
    try:
        return json.loads((to / STATE).read_text())
    except (OSError, ValueError):
        return {}


def _still_verified(to: Path, rel: str, want: dict, state: dict) -> bool:
    seen = state.get(rel)
    path = to / rel
    if not seen or seen["sha256"] != want["sha256"] or not path.is_file():
        return False
    st = path.stat()
    return st.st_size == want["bytes"] and st.st_mtime_ns == seen["mtime_ns"]


def stage_in(src: str, to: str | Path, workers: int = 8, rehash: bool = False, log=print) -> dict:
    """Copy and verify; returns {"copied", "skipped", "removed", "bytes"}; raises naming
    every file that could not be verified (after one fresh attempt each), and records
    why in `<to>/.stage-in.failed`."""
    to = Path(to)
    try:
        result = _stage_in(src, to, workers, rehash, log)
    except (OSError, RuntimeError, ValueError) as exc:
        with contextlib.suppress(OSError):
            (to / FAILED).write_text(f"stage-in from {src} failed: {exc}\n")
        raise
    (to / FAILED).unlink(missing_ok=True)
    return result


def _stage_in(src: str, to: Path, workers: int, rehash: bool, log) -> dict:
    to.mkdir(parents=True, exist_ok=True)
    listing = store.join(src, "files.json")
    if not store.exists(listing):
        raise FileNotFoundError(f"{listing}: not found; a shard set written by data_prep/shard.py has it "
                                "(sets from before it: run shard.py again over the same --out to add it)")
    raw = store.read_bytes(listing)
    files = json.loads(raw)
    known = _load_state(to)
    state = {} if rehash else known
    for leftover in to.rglob("*.part"):
        leftover.unlink()  # a killed copy: never taken for a file
    stale = sorted(rel for rel in known if rel not in files)
    if stale:
        (to / "files.json").unlink(missing_ok=True)
        for rel in stale:  # staged from an earlier set: DALI would read an old tar with the new ones
            (to / rel).unlink(missing_ok=True)
            state.pop(rel, None)
        store.write_bytes(to / STATE, json.dumps(state).encode())
        log(f"stage-in: removed {len(stale)} file(s) of an earlier shard set that {src} no longer has")
    todo = [rel for rel, want in sorted(files.items()) if not _still_verified(to, rel, want, state)]
    if todo:
        (to / "files.json").unlink(missing_ok=True)  # incomplete until this run has verified the rest
    lock, failed, copied_bytes = threading.Lock(), {}, 0

    def fetch(rel: str) -> None:
        want = files[rel]
        for attempt in (1, 2):
            try:
                store.copy_verified(store.join(src, rel), to / rel, want["bytes"], want["sha256"])
                return
            except (OSError, ValueError) as exc:
                if attempt == 2:
                    raise
                log(f"stage-in: {rel}: {exc}; fetching it again")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(fetch, rel): rel for rel in todo}
        for future in as_completed(futures):
            rel = futures[future]
            try:
                future.result()
            except (OSError, ValueError) as exc:
                failed[rel] = str(exc)
                continue
            with lock:
                state[rel] = {"sha256": files[rel]["sha256"], "mtime_ns": (to / rel).stat().st_mtime_ns}
                copied_bytes += files[rel]["bytes"]
                store.write_bytes(to / STATE, json.dumps(state).encode())
    if failed:
        lines = "\n".join(f"  {rel}: {why}" for rel, why in sorted(failed.items()))
        raise RuntimeError(f"stage-in from {src}: {len(failed)} file(s) could not be verified:\n{lines}")
    store.write_bytes(to / "files.json", raw)  # last: the set is complete and verified
    return {"copied": len(todo), "skipped": len(files) - len(todo), "removed": len(stale), "bytes": copied_bytes}


def check_staged(root: str | Path, expect_hash: str | None = None) -> str | None:
    """What is wrong with the shard set at `root` on this node, or None: a stage-in into it
    that did not finish (with the reason it recorded), or a set other than the one the
    driver sees (`expect_hash`, its data_hash): the data changed after this node staged
    it in, and training would mix two sets or train on the old one."""
    from data_prep.store import data_hash

    root = Path(root)
    again = f"python data_prep/shard.py --stage-in SRC --to {root} on this node (or replace the node)"
    if not root.is_dir():
        return f"no shard set at {root} on this node; {again}"
    if (root / STATE).is_file() and not (root / "files.json").is_file():
        why = (root / FAILED).read_text().strip() if (root / FAILED).is_file() else "it was stopped before the end"
        return f"the shard set at {root} is incomplete: its stage-in did not finish ({why}); {again}"
    if expect_hash is not None:
        try:
            here = data_hash(root)
        except FileNotFoundError as exc:
            return f"{exc}; {again}"
        if here != expect_hash:
            return (f"the shard set at {root} (data hash {here[:12]}) is not the one the driver sees "
                    f"({expect_hash[:12]}): the data changed after this node staged it in; {again}")
    return None
