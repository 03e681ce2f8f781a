"""A stage's figures on their way to MLflow: a queue drained by a background thread, so
nothing that hands a figure over ever waits for the tracking server.

One sink per stage attempt runs in the driver's job, on the driver's node (pipeline/
worker.py keeps every stage's sink on one Ray actor there, the driver's desk, beside the
Ray Train controllers whose callbacks fill them; MLflow listens on that node). Exactly
once, with no gap and no duplicate:

- items leave the queue in the order they came, in batches of whole items, each batch
  dropped from the queue only once MLflow acknowledged it; a failed send is retried
  (backing off up to 30 s) and the batch stays at the head;
- step records and epoch figures form increasing series (a record reaches the driver only
  with the checkpoint after it, so a restarted worker group redoes exactly the lost ones).
  Their cursors (the last step of each series in MLflow) are read from MLflow on first
  contact and moved only by acknowledged sends; an item at or below its cursor is
  already there and is dropped. So a replay (what a resumed stage's checkpoint carried,
  pipeline/stageloop.py) adds only what MLflow lacks;
- `flush(timeout)` waits for the queue to empty: the driver calls it when a stage's run
  ends, before booking it, and at exit, and says what is left if the server is away.

Bounded: system figures beyond `SYSTEM_BOUND` values waiting are dropped and counted (they
are telemetry, and a node samples about 30 every 5 s); training figures are never dropped
(a paper.yaml stage makes about 10,000 step records).
"""

from __future__ import annotations

import collections
import threading
import time

STEP_METRIC, EPOCH_METRIC = "step/train_loss", "val_top1_error"  # the series' cursors
SYSTEM_BOUND = 200_000  # system values held while MLflow does not answer (about 9 hours of 6 nodes)
BATCH = 1000  # MLflow's limit of metric values per log_batch
ALONE = ("dataset", "event")  # items sent by a call of their own (not log_batch)


class MetricsSink:
    """Items are tuples (kind, step, values, timestamp_ms): kind "step" (a per-interval
    record), "epoch" (an epoch's figures, step = epoch), "system" (a node's sample) or
    "dataset" (values = name, digest, source)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._cursor: dict[str, int | None] | None = None  # None until MLflow first answered
        self._system = 0  # system values waiting
        self.dropped = 0  # system values dropped at the bound
        self.sent = 0  # values acknowledged by MLflow
        self.error = ""  # the last failed send's error, "" once a send succeeds
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="mlflow-sink", daemon=True)
        self._thread.start()

    def put(self, items: list[tuple]) -> None:
        """Queue items; never waits for MLflow."""
        with self._cond:
            for item in items:
                if item[0] == "system":
                    if self._system + len(item[2]) > SYSTEM_BOUND:
                        self.dropped += len(item[2])
                        continue
                    self._system += len(item[2])
                self._items.append(tuple(item))
            self._cond.notify_all()

    def pending(self) -> int:
        """Values not yet acknowledged."""
        with self._cond:
            return sum(max(len(i[2]), 1) for i in self._items)

    def flush(self, timeout: float) -> dict:
        """Wait up to `timeout` s for everything queued so far to be acknowledged.
        {"ok", "pending" (values left), "error" (the last send's), "dropped", "sent"}."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._items and time.monotonic() < deadline:
                self._cond.wait(min(1.0, max(deadline - time.monotonic(), 0.0)))
        left = self.pending()
        return {"ok": left == 0, "pending": left, "error": self.error, "dropped": self.dropped, "sent": self.sent}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _batch(self) -> list[tuple]:
        """Whole items from the head of the queue, at most BATCH values (at least one item)."""
        batch, values = [], 0
        for item in self._items:
            n = max(len(item[2]), 1)
            if batch and (values + n > BATCH or item[0] in ALONE or batch[-1][0] in ALONE):
                break
            batch.append(item)
            values += n
        return batch

    def _drain(self) -> None:
        from pipeline.tracking import _client

        client, backoff = _client(self.uri), 1.0
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if not self._items:
                    return
                batch = self._batch()
            try:
                self._send(client, batch)
            except Exception as exc:  # noqa: BLE001 - the server is away: keep the batch, try again
                self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                with self._cond:
                    if self._closed:
                        return
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff, self.error = 1.0, ""
            with self._cond:
                for item in batch:
                    self._items.popleft()
                    if item[0] == "system":
                        self._system -= len(item[2])
                self._cond.notify_all()

    def _send(self, client, batch: list[tuple]) -> None:
        from pipeline.tracking import last_logged_step, log_dataset_input, send_metrics, set_event_tag

        if self._cursor is None:  # what MLflow already has: nothing at or below it is sent again
            self._cursor = {"step": last_logged_step(client, self.run_id, STEP_METRIC),
                            "epoch": last_logged_step(client, self.run_id, EPOCH_METRIC)}
        if batch[0][0] == "dataset":
            log_dataset_input(client, self.run_id, *batch[0][2])
            return
        if batch[0][0] == "event":  # a tag: setting it again (a replay) changes nothing
            set_event_tag(client, self.run_id, batch[0][1], *batch[0][2])
            return
        fresh = [i for i in batch if i[0] not in self._cursor or self._cursor[i[0]] is None
                 or i[1] > self._cursor[i[0]]]
        values = [(k, v, ts, step) for _, step, figures, ts in fresh for k, v in figures.items()]
        if values:
            send_metrics(client, self.run_id, values)
            self.sent += len(values)
        for kind, step, _, _ in fresh:
            if kind in self._cursor:
                self._cursor[kind] = step if self._cursor[kind] is None else max(self._cursor[kind], step)


def report_items(rank0: dict) -> list[tuple]:
    """The items one report of rank 0 carries to MLflow (pipeline/stageloop.py's report):
    its step records, then its epoch's figures when it ends an epoch."""
    now = int(time.time() * 1000)
    rank0 = dict(rank0)
    items = [("step", int(r["step"]), {f"step/{k}": float(v) for k, v in r.items() if k != "step"}, now)
             for r in rank0.pop("step_log", None) or []]
    if EPOCH_METRIC in rank0:  # not a mid-epoch checkpoint, nor a failure inside an epoch
        epoch = int(rank0.pop("epoch"))
        rank0.pop("step", None)
        figures = {k: float(v) for k, v in rank0.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        items.append(("epoch", epoch, figures, now))
    return items


def event_items(events: list | None) -> list[tuple]:
    """Resizes, preemptions and recipe changes (pipeline/stageloop.py), each as an item
    that becomes a tag of the run: values = (kind, text with its cause)."""
    now = int(time.time() * 1000)
    return [("event", int(e["step"]), (e["kind"], e["text"] + (f" [cause: {e['cause']}]" if e.get("cause") else "")),
             now) for e in events or []]


def system_items(system: dict) -> list[tuple]:
    """A node's samples as `system/<node>/<figure>` at the second each was taken (the
    step) and with its own timestamp (pipeline/sysmetrics.py)."""
    return [("system", taken_ms // 1000, {f"system/{system['node']}/{k}": float(v) for k, v in figures.items()},
             taken_ms) for taken_ms, figures in system["samples"]]


TRACKING_FLUSH_S = 300.0  # how long a stage's end waits for MLflow to take its last figures


def flush_stage(sink, stage: str, say, timeout: float | None = None) -> bool:
    """Wait (bounded) until MLflow has every figure the stage's run logged, saying so when
    it does not answer at once; then end the sink. Nothing is lost when it stays away: the
    stage's checkpoint carries its figures, and rerunning the same command (which books
    the stage from it) logs what MLflow lacks."""
    if sink is None or sink.closed:
        return True
    timeout = TRACKING_FLUSH_S if timeout is None else timeout
    state = sink.flush(0.5)
    if not state["ok"]:
        say(f"[{stage}] MLflow has not taken {state['pending']} figure value(s) yet ({state['error'] or 'sending'}); "
            f"waiting up to {timeout:.0f} s")
        state = sink.flush(timeout)
        say(f"[{stage}] MLflow took them" if state["ok"] else
            f"[{stage}] MLflow did not take {state['pending']} figure value(s) in {timeout:.0f} s "
            f"({state['error']}); they are in the stage's checkpoint: rerunning the same command logs them")
    if state.get("dropped"):
        say(f"[{stage}] {state['dropped']} system figure value(s) were dropped while MLflow was away (bound reached)")
    sink.close()
    return state["ok"]
