"""The training data order as a property of (seed, epoch) over the whole split, the same at
any world size, and how a worker group of any size reads it.

An epoch is one permutation of the split's samples (`epoch_order`). Global step g holds
the positions [g*B, (g+1)*B) of it (B the recipe's global batch), whatever the world size.
On W workers each rank takes a share of the step's B images, B // W or one more (the
first B % W ranks), in `accumulate` micro-batches of at most `max_worker_batch` images
(`Split`); micro-batch k of every rank comes before micro-batch k + 1, rank by rank.
Each micro-batch's loss is weighted by W x its images / B (pipeline/engine.py), so a
step's gradient is the mean over the B images however they lie on the ranks: the
recipe is the same at any world size, and no world size has to divide B.

After g steps every world size has consumed the same images, g*B of them (the
checkpoint's `images_seen`, pipeline/position.py), so a position survives a change of
world size or micro-batch, and every image of the interrupted epoch is still seen exactly
once. The positions past the last whole global batch are left out of that epoch (fewer
than B; the next epoch's permutation takes them in again).

The augmentation draws (scale, crop position, flip, colour shift) belong to the position
too (`epoch_draws`): which rank decodes an image no longer changes what it sees, so a
resized run trains on the same tensors as a fixed-size one.

Plain numpy, no DALI: pipeline/data.py feeds `EpochSource` to its graph.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SampleTable:
    """Every sample of a split in shard order (the order of the sorted tar list): the tar
    it lies in, where its image and label bytes are (from the DALI index files), its key."""

    tars: tuple[str, ...]
    tar: np.ndarray  # int32: index into `tars`
    image: np.ndarray  # int64 (n, 2): offset, size of the .jpg member's data
    label: np.ndarray  # int64 (n, 2): offset, size of the label member's data
    keys: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.keys)

    def jpeg(self, row: int) -> bytes:
        """Sample `row`'s image bytes, read alone (naming a corrupt sample)."""
        offset, size = (int(v) for v in self.image[row])
        with open(self.tars[self.tar[row]], "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise OSError(f"{size} bytes expected at offset {offset}, {len(data)} read (a truncated shard?)")
        return data


@functools.lru_cache(maxsize=8)
def sample_table(tars: tuple[str, ...], indexes: tuple[str, ...], label_ext: str) -> SampleTable:
    """Read the index files (the `wds2idx` v1.2 format: `v1.2 N`, then per sample
    `ext offset size member` per component). Cached: one read per process and split."""
    which, image, label, keys = [], [], [], []
    for i, idx in enumerate(indexes):
        with open(idx) as fh:
            fh.readline()
            for line_no, line in enumerate(fh, start=2):
                parts = line.split()
                if not parts:
                    continue
                members = {parts[j]: (int(parts[j + 1]), int(parts[j + 2]), parts[j + 3])
                           for j in range(0, len(parts) - 3, 4)}
                if "jpg" not in members or label_ext not in members:
                    missing = "jpg" if "jpg" not in members else label_ext
                    raise ValueError(f"{idx}:{line_no}: sample {parts[3].split('.', 1)[0]!r} in {tars[i]} has no "
                                     f".{missing} member")
                which.append(i)
                image.append(members["jpg"][:2])
                label.append(members[label_ext][:2])
                keys.append(members["jpg"][2].rsplit("/", 1)[-1].split(".", 1)[0])
    return SampleTable(tars, np.asarray(which, dtype=np.int32), np.asarray(image, dtype=np.int64).reshape(-1, 2),
                       np.asarray(label, dtype=np.int64).reshape(-1, 2), tuple(keys))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of sample indices: one function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x0DE7]).permutation(n)


def epoch_draws(n: int, seed: int, epoch: int, scale_range: tuple[int, int]) -> dict[str, np.ndarray]:
    """The augmentation's random draws for each position of the epoch: scale S uniform
    in [Smin, Smax] (per image, Section 3.1), crop position in [0, 1]^2, a fair coin
    for the flip, and N(0, 1) weights of the three colour eigenvectors (scaled by the
    recipe's colour_shift in the graph)."""
    rng = np.random.default_rng([seed, epoch, 0xA06])
    lo, hi = scale_range
    return {"scale": rng.uniform(lo, hi + 1e-3, n).astype(np.float32) if hi > lo else np.full(n, lo, np.float32),
            "pos_x": rng.random(n, dtype=np.float32), "pos_y": rng.random(n, dtype=np.float32),
            "mirror": rng.integers(0, 2, n, dtype=np.int32), "alpha": rng.standard_normal((n, 3), dtype=np.float32)}


@dataclass(frozen=True)
class Split:
    """The global batch on `world` workers: each rank's share of a step in `accumulate`
    micro-batches (sizes differ by at most one image); `micro` is the largest."""

    world: int
    global_batch: int
    accumulate: int

    def share(self, rank: int) -> int:
        return self.global_batch // self.world + (rank < self.global_batch % self.world)

    def size(self, k: int, rank: int) -> int:
        """Images in micro-batch k of a step on `rank`."""
        share = self.share(rank)
        return share // self.accumulate + (k < share % self.accumulate)

    @property
    def micro(self) -> int:
        return self.size(0, 0)

    @property
    def even(self) -> bool:
        return self.global_batch % (self.world * self.accumulate) == 0

    @functools.cached_property
    def _offsets(self) -> np.ndarray:
        sizes = np.array([[self.size(k, r) for r in range(self.world)] for k in range(self.accumulate)])
        return np.concatenate([[0], np.cumsum(sizes.ravel())])[:-1].reshape(sizes.shape)

    def positions(self, micro_step: int, rank: int) -> slice:
        """Positions of the epoch that `rank` reads at `micro_step` (accumulate per step)."""
        step, k = divmod(micro_step, self.accumulate)
        start = step * self.global_batch + int(self._offsets[k, rank])
        return slice(start, start + self.size(k, rank))

    def label(self) -> str:
        shares = sorted({self.share(r) for r in range(self.world)}, reverse=True)
        text = f"{self.world} x {'/'.join(map(str, shares))}"
        return text + (f" in {self.accumulate} micro-batches of up to {self.micro}" if self.accumulate > 1 else "")


def split_batch(global_batch: int, world: int, max_micro: int | None = None) -> Split:
    """The global batch on `world` workers, in the fewest micro-batches a step whose size
    stays within `max_micro` (a worker's memory; None: the whole share at once). Raises
    ValueError (the reason) where that cannot be done: fewer images than workers, or
    micro-batches so small that one would hold no image."""
    if world < 1 or global_batch < world:
        raise ValueError(f"batch_size {global_batch} is smaller than {world} workers: a worker would have no image")
    if max_micro is not None and max_micro < 1:
        raise ValueError(f"max_worker_batch must be at least 1, got {max_micro}")
    largest = math.ceil(global_batch / world)
    split = Split(world, global_batch, math.ceil(largest / (max_micro or largest)))
    if split.size(split.accumulate - 1, world - 1) < 1:
        raise ValueError(f"batch_size {global_batch} on {world} workers in {split.accumulate} micro-batches of at most "
                         f"{max_micro}: a worker's last micro-batch would be empty; raise max_worker_batch")
    return split


def steps_per_epoch(images: int, global_batch: int, split_name: str = "train") -> int:
    """Global steps an epoch, the same at every world size: whole global batches only."""
    steps = images // global_batch
    if steps < 1:
        raise ValueError(f"{split_name}: {images} images is less than one global batch ({global_batch})")
    return steps


class EpochSource:
    """One rank's share of one epoch in the global order, as batches for pipeline/data.py's
    `fn.external_source` (outputs: jpegs, labels, index, scale, pos_x, pos_y, mirror,
    alpha): each micro-batch's image and label bytes, read from the tars at the offsets
    the DALI index gives, its augmentation draws, and the samples' indices (the keys the
    loader returns come through the graph with the images). Micro-steps before `start`
    are never read: a resume starts where it stopped, at no cost.

    `bad`: samples (table rows) known to be undecodable, each read as the next good sample
    in shard order instead, at the same position with the same draws (skip mode), so
    every other sample keeps its place in the epoch."""

    def __init__(self, table: SampleTable, order: np.ndarray, draws: dict, *, split: Split, rank: int, start: int,
                 stop: int, bad: frozenset[int] = frozenset()):
        self.table, self.order, self.draws, self.split, self.rank = table, order, draws, split, rank
        self.start, self.stop, self.bad = start, stop, bad
        if len(bad) >= len(table):
            raise ValueError(f"{table.tars[0]}: every sample of the split is undecodable")
        self._files: dict[int, object] = {}

    def __len__(self) -> int:
        return self.stop - self.start

    def resumed(self, start: int, bad: frozenset[int]) -> "EpochSource":
        """The same epoch from micro-step `start` on, with `bad` read past as well."""
        return EpochSource(self.table, self.order, self.draws, split=self.split, rank=self.rank, start=start,
                           stop=self.stop, bad=self.bad | bad)

    def rows(self, step: int) -> list[int]:
        """The samples (table rows) micro-step `step` of this rank reads, in batch order."""
        out = []
        for row in self.order[self.split.positions(step, self.rank)].tolist():
            while row in self.bad:
                row = (row + 1) % len(self.table)
            out.append(row)
        return out

    def _read(self, tar: int, where) -> np.ndarray:
        fh = self._files.get(tar)
        if fh is None:
            fh = self._files[tar] = open(self.table.tars[tar], "rb", buffering=0)
        offset, size = int(where[0]), int(where[1])
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise RuntimeError(f"{self.table.tars[tar]}: {size} bytes expected at offset {offset}, "
                               f"{len(data)} read (a truncated shard?)")
        return np.frombuffer(data, dtype=np.uint8)

    def __call__(self, info):
        step = self.start + info.iteration
        if step >= self.stop:
            raise StopIteration
        where = self.split.positions(step, self.rank)
        samples = self.rows(step)
        t = self.table
        d = {k: v[where] for k, v in self.draws.items()}
        return ([self._read(t.tar[i], t.image[i]) for i in samples],
                [self._read(t.tar[i], t.label[i]) for i in samples],
                [np.asarray(i, dtype=np.int64) for i in samples],
                list(d["scale"]), list(d["pos_x"]), list(d["pos_y"]), list(d["mirror"]), list(d["alpha"]))

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()
