"""Torch batches from a built DALI pipeline, and what happens when one cannot be decoded.

No DALI here: pipeline/data.py builds the graphs and hands this module their iterators
(`iterator`, `rebuild`) and a one-image decode probe (`judge`).

A sample DALI cannot decode is named (shard, key) from the batches around the failing
one alone: the loader knows which samples those are (training: the `order.EpochSource`
that fed them; evaluation: the reader's contiguous slice in shard order), reads each
image's bytes at its index offsets and has the probe decode it alone. Seconds, whatever
the split's size: never a scan of the split, never a second reader.
"""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.dataset import DatasetInfo, _json_labels, _source_keys
from pipeline.engine import DataFailure

# Batches to search from the first one not yet handed out when a pipeline fails: DALI
# runs ahead by its prefetch queue (2 here) and one batch in flight.
LOOKAHEAD = 4


class CorruptSample(DataFailure):
    """Samples that DALI cannot decode, named by shard and key (`culprits`); `rows`: their
    rows in the split's sample table (`order.SampleTable`)."""

    def __init__(self, what: str, culprits: list[tuple[str, str, str]], rows: tuple[int, ...] = ()):
        self.what, self.culprits, self.rows = what, culprits, rows
        named = "; ".join(f"sample {key!r} in shard {tar} cannot be decoded ({reason})"
                          for tar, key, reason in culprits)
        super().__init__(f"DALI {what}: {named}; re-shard it or remove it from the shard")

    def __reduce__(self):  # raised in a Ray task (evaluation): Ray pickles it to the driver
        return type(self), (self.what, self.culprits, self.rows)


def find_culprits(table, rows: list[int], judge: Callable[[list[bytes]], list[str | None]]
                  ) -> list[tuple[int, str, str, str]]:
    """(row, shard, key, why) of each of `rows` whose image cannot be read or decoded alone."""
    rows = list(dict.fromkeys(rows))
    found, readable, jpegs = [], [], []
    for row in rows:
        try:
            jpegs.append(table.jpeg(row))
            readable.append(row)
        except OSError as exc:
            found.append((row, str(exc)))
    found += [(row, why) for row, why in zip(readable, judge(jpegs)) if why is not None]
    return [(row, table.tars[table.tar[row]], table.keys[row], why) for row, why in found]


class Loader:
    """Torch batches (images NCHW, labels int64) from a DALI pipeline, with an exact
    epoch length. Training (`epoch`, an `order.EpochSource`): every rank yields the same
    number of micro-batches (DDP needs it). Evaluation: each rank yields exactly its
    slice, no padding, so across ranks every image is counted once. `nhwc`: the graph
    emits HWC images, handed over as NCHW views in channels_last memory (no copy in the
    training step).

    A batch DALI cannot decode: the culprit is named (`find_culprits`). Evaluation
    raises CorruptSample (or, unnamed, DataFailure): `engine.evaluate` stops every rank
    together with it. Training does not raise, since the other ranks are inside a
    collective: with `rebuild` (skip mode) the loader reads on from the failing
    micro-batch with the next good sample in the culprit's place (listed in `skipped`);
    otherwise it sets `failure` and yields `placeholder` batches (zeros) to the epoch's
    end, which the training loop counts and stops on with every rank at its next sync."""

    def __init__(self, iterator, steps: int | None, device: torch.device, what: str, info: DatasetInfo,
                 nhwc: bool = False, *, judge: Callable[[list[bytes]], list[str | None]],
                 suspects: Callable[[int], tuple[object, list[int]]] | None = None, epoch=None,
                 rebuild: Callable[[object], object] | None = None,
                 placeholder: tuple[tuple[int, ...], torch.dtype] | None = None):
        self.device, self.what, self.info, self.nhwc = device, what, info, nhwc
        self.judge, self._suspects_of, self.rebuild, self.placeholder = judge, suspects, rebuild, placeholder
        self.epoch = epoch  # training: the source of this epoch's micro-batches
        self.begin = epoch.start if epoch is not None else 0
        self.batch_keys: list[str] = []  # the keys of the batch last yielded, as the graph returned them
        self.failure: Exception | None = None  # training: what ended this pass early (a CorruptSample, mostly)
        self.skipped: list[tuple[str, str, str]] = []  # training, skip mode: (shard, key, error) read past
        self._it = iterator  # nothing has run yet (prepare_first_batch=False)
        self.steps = len(iterator) if steps is None else steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        position = 0  # batches this pass has yielded
        try:
            while True:
                try:
                    batch = next(self._it)
                except StopIteration:
                    return
                except RuntimeError as exc:
                    failure = self._named(exc, position)
                    if self.placeholder is None:
                        raise failure from exc
                    if self._read_past(failure, position):
                        continue
                    # Training goes on to the next sync with placeholders whatever the failure
                    # (one the probe cannot pin to a sample too): no rank is left waiting.
                    print(failure, flush=True)  # on this rank, seconds after the batch failed
                    self.failure = failure
                    yield from self._placeholders(self.steps - position)
                    return
                position += 1
                yield self._batch(batch[0])
        finally:
            if self.epoch is not None:
                self.epoch.close()

    def _suspects(self, position: int) -> tuple[object, list[int]]:
        """The sample table and the rows of the batches from `position` on that DALI may
        have been working on when it failed."""
        if self.epoch is None:
            return self._suspects_of(position) if self._suspects_of else (None, [])
        first = self.begin + position
        steps = range(first, min(first + LOOKAHEAD, self.epoch.stop))
        return self.epoch.table, [row for step in steps for row in self.epoch.rows(step)]

    def _named(self, exc: Exception, position: int) -> DataFailure:
        table, rows = self._suspects(position)
        found = find_culprits(table, rows, self.judge) if rows else []
        if not found:
            return DataFailure(f"DALI {self.what}: {exc}")
        return CorruptSample(self.what, [c[1:] for c in found], tuple(c[0] for c in found))

    def _read_past(self, failure: DataFailure, position: int) -> bool:
        """Skip mode: a new pipeline from the failing micro-batch on, the culprits read
        past. False where there is nothing to skip (no rebuild, or no sample named)."""
        if self.rebuild is None or not isinstance(failure, CorruptSample):
            return False
        print(f"{failure}; read past it (data.on_corrupt_sample=skip)", flush=True)
        self.skipped += failure.culprits
        self._it = None  # the failed pipeline is no longer valid: freed before the next is built
        self.epoch.close()
        self.epoch = self.epoch.resumed(self.begin + position, frozenset(failure.rows))
        self._it = self.rebuild(self.epoch)
        return True

    def _placeholders(self, count: int):
        shape, dtype = self.placeholder
        fmt = torch.channels_last if self.nhwc else torch.contiguous_format
        self.batch_keys = []  # nothing read: no keys to audit
        for _ in range(max(count, 0)):
            images = torch.zeros(shape, dtype=dtype, device=self.device).contiguous(memory_format=fmt)
            yield images, torch.zeros(shape[0], dtype=torch.int64, device=self.device)

    def _batch(self, data: dict):
        labels = data["labels"]
        if self.info.label_format == "json":
            labels = _json_labels(labels, self.info.label_field)
        if "keys" in data:
            self.batch_keys = _source_keys(data["keys"])
        elif "index" in data:
            keys = self.epoch.table.keys
            self.batch_keys = [keys[i] for i in data["index"].view(-1).tolist()]
        images = data["images"].permute(0, 3, 1, 2) if self.nhwc else data["images"]
        return _to_device(images, self.device), _to_device(labels.view(-1), self.device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without waiting: a tensor already there as it is; a host tensor
    pinned first, since from pageable memory a non_blocking copy is synchronous."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
