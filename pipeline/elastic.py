"""The stage loop's side of elastic training: a collective preemption poll that asks for
one checkpoint per drain notice, and the audit of what each rank trained on.

Plain Python; the notice itself comes from Ray Train through the worker's Seat
(pipeline/worker.py, `ray.train.get_preemption_info`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable


def preemption_poll(ask: Callable[[], dict | None], already: Callable[[], bool], seen: Callable[[dict], None],
                    say: Callable[[int, str, float | None], None], epoch: int, steps: int):
    """The engine's `poll(step)`: `ask()` is a collective (every rank calls it at the same
    sync point and gets rank 0's answer), so every rank decides alike. True once per
    notice, unless the epoch's end (which checkpoints anyway) is the step."""

    def poll(step: int) -> bool:
        if already():
            return False  # one checkpoint per notice
        notice = ask()
        if notice is None:
            return False
        seen(notice)
        left = (notice["deadline_ms"] / 1000 - time.time()) if notice.get("deadline_ms") else None
        say(step, f"drain notice for node(s) {', '.join(notice.get('nodes', [])) or '?'} at epoch {epoch + 1} step "
                  f"{step}" + (f", {left:.0f} s before the deadline" if left is not None else "")
                  + "; checkpointing now", left)
        return step < steps

    return poll


def audited(loader, folder: str | None, name: str, epoch: int, skip: int, accumulate: int):
    """The loader, and with `folder` (data.keys_log) set, each batch's keys appended to
    `<folder>/<name>-<pid>.txt` as `epoch step key` lines. A step redone after a restart
    reads the same keys again (the order is a function of the position), so an epoch's
    keys, taken as a set per step, show whether every image was seen exactly once."""
    return _Audited(loader, Path(folder) / f"{name}-{os.getpid()}.txt", epoch, skip, accumulate) if folder else loader


class _Audited:
    """The loader's batches with their keys logged; its other attributes (`failure`,
    `skipped`: what the training loop reads of a loader) are the loader's own."""

    def __init__(self, loader, path: Path, epoch: int, skip: int, accumulate: int):
        self.loader, self.path, self.epoch, self.skip, self.accumulate = loader, path, epoch, skip, accumulate

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            for i, batch in enumerate(self.loader):
                step = self.skip + i // self.accumulate
                fh.write("".join(f"{self.epoch} {step} {k}\n" for k in self.loader.batch_keys))
                fh.flush()
                yield batch


def wait_for_reclaim(notice: dict, error: BaseException, say: Callable[[str], None], grace_s: float = 60.0) -> None:
    """After a drain notice, a collective that fails (a peer on the drained node is gone:
    gloo's "connection reset", NCCL's abort) is the reclaim, not a bug: wait for Ray Train
    to stop this group and restart it at the new size, instead of raising an error it
    would charge to `max_failures` (it fails fast on any error that is not the
    preemption's own). Gives up, re-raising, `grace_s` after the notice's deadline."""
    import threading

    deadline = notice.get("deadline_ms")
    until = (deadline / 1000 if deadline else time.time()) + grace_s
    say(f"a peer is gone after the drain notice ({type(error).__name__}); waiting for Ray Train to restart "
        "the group at its new size")
    threading.Event().wait(max(0.0, until - time.time()))
    raise error
