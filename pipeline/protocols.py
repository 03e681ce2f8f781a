"""The paper's test protocols (Section 3.2), as per-image softmax posteriors.

Every protocol reduces to "posteriors for each validation image": single scale
(rescale to Q, centre crop), dense (the fully convolutional net on the whole
rescaled image, score map averaged, plus its flip), multi-crop (a 5x5 grid of
crops and their flips), each at one or several Q, averaged; dense+multicrop
averages the two. Posteriors carry their sample keys and labels, so a rank's
share is checked against the shard index and ensembles can average stored
posteriors without re-running a net.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PROTOCOLS = ("single", "dense", "multicrop", "dense+multicrop")


@dataclass
class Posteriors:
    keys: list[str]
    labels: np.ndarray  # (N,) int64
    probs: np.ndarray  # (N, classes) float32

    def errors(self) -> dict:
        """Top-1 and top-5 error in percent."""
        if len(self.keys) == 0:
            raise ValueError("no images")
        k = min(5, self.probs.shape[1])
        top = np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
        hit1 = top[:, 0] == self.labels
        hit5 = (top == self.labels[:, None]).any(axis=1)
        return {"top1_error": 100.0 * (1 - hit1.mean()), "top5_error": 100.0 * (1 - hit5.mean()),
                "images": len(self.keys)}

    @staticmethod
    def concat(parts: list["Posteriors"]) -> "Posteriors":
        return Posteriors([k for p in parts for k in p.keys], np.concatenate([p.labels for p in parts]),
                          np.concatenate([p.probs for p in parts]))

    def aligned_with(self, other: "Posteriors", what: str = "") -> "Posteriors":
        """`other` reordered to this one's keys; a different key set or label is an error."""
        if set(self.keys) != set(other.keys) or len(self.keys) != len(other.keys):
            missing = sorted(set(self.keys) ^ set(other.keys))[:5]
            raise ValueError(f"{what}validation sets differ ({len(self.keys)} vs {len(other.keys)} images; "
                             f"e.g. {missing})")
        pos = {k: i for i, k in enumerate(other.keys)}
        order = np.array([pos[k] for k in self.keys], dtype=np.int64)
        labels = other.labels[order]
        if not np.array_equal(labels, self.labels):
            bad = self.keys[int(np.argmax(labels != self.labels))]
            raise ValueError(f"{what}labels differ for sample {bad!r}")
        return Posteriors(list(self.keys), labels, other.probs[order])

    @staticmethod
    def mean(members: list["Posteriors"], what: str = "") -> "Posteriors":
        first = members[0]
        aligned = [first] + [first.aligned_with(m, what) for m in members[1:]]
        return Posteriors(list(first.keys), first.labels, np.mean([m.probs for m in aligned], axis=0))


def default_scales(protocol: str, scale_range: tuple[int, int], eval_scale: int, crop: int) -> list[int]:
    """Section 3.2's test scales: single scale at the stage's Q; otherwise
    {S-32, S, S+32} for a fixed S and {Smin, (Smin+Smax)/2, Smax} for a jittered one.
    The +-32 step is for 224 crops; it shrinks with the crop (reduced runs) and Q
    never falls below the crop."""
    lo, hi = scale_range
    if protocol == "single":
        return [eval_scale]
    if hi > lo:
        return [lo, (lo + hi) // 2, hi]
    d = max(1, round(32 * crop / 224))
    return sorted({max(crop, lo - d), lo, lo + d})


def scales_label(scales: list[int]) -> str:
    return "Q" + "-".join(str(q) for q in scales)


def metric_prefix(protocol: str, scales: list[int]) -> str:
    """e.g. dense_Q256-384-512 (the metric names are <prefix>/top1_error, /top5_error)."""
    return f"{protocol.replace('+', '_')}_{scales_label(scales)}"


def rank_keys(info, split: str, rank: int, world: int) -> list[str]:
    """The sample keys DALI's reader gives shard `rank` of `world`, in order: the split's
    samples in tar order, cut into contiguous ranges (floor(rank * N / world) ...)."""
    from pipeline.dataset import _index_keys

    keys = [k for idx in info.shards(split)[1] for k in _index_keys(idx)]
    n = len(keys)
    return keys[rank * n // world:(rank + 1) * n // world]


def _as_net(images: torch.Tensor, model) -> torch.Tensor:
    """The batch in the net's own dtype (float32, or float64 in the tests that catch
    tensors made at torch's default dtype), channels last like the net (parts_by_scale):
    on the 2-core CPU machine net A's forward passes ran 1.86x as fast as NCHW at width 1/8
    on 64 px crops and 1.26x at full width on 224 px (`python -m pipeline bench eval`,
    bench/results/eval-cpu*.json)."""
    return images.to(next(model.parameters()).dtype).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def _single(model, info, split, q, crop, normalize_std, rank, world, device, batch_size, threads):
    from pipeline.data import eval_loader

    loader = eval_loader(info, split, rank=rank, world_size=world, batch_size=batch_size, scale=q, crop=crop,
                         normalize_std=normalize_std, device=device, threads=threads)
    for images, labels in loader:
        yield torch.softmax(model(_as_net(images, model)).float(), 1), labels, loader.batch_keys


@torch.no_grad()
def _dense(model, info, split, q, crop, normalize_std, rank, world, device, batch_size, threads):
    from pipeline.data import dense_loader
    from pipeline.models import dense_form

    net = dense_form(model).to(memory_format=torch.channels_last)  # its fc layers are new convolutions
    loader = dense_loader(info, split, rank=rank, world_size=world, scale=q, normalize_std=normalize_std,
                          device=device, threads=threads)
    for image, labels in loader:
        x = _as_net(image, model)
        both = [net(v).float().mean(dim=(2, 3)) for v in (x, x.flip(3))]  # score maps, spatially averaged
        yield (torch.softmax(both[0], 1) + torch.softmax(both[1], 1)) / 2, labels, loader.batch_keys


@torch.no_grad()
def _multicrop(model, info, split, q, crop, normalize_std, rank, world, device, batch_size, threads):
    from pipeline.data import multi_crop_loader

    loader = multi_crop_loader(info, split, rank=rank, world_size=world, batch_size=batch_size, scale=q, crop=crop,
                               normalize_std=normalize_std, device=device, threads=threads)
    for crops, labels in loader:
        n, g = crops.shape[:2]
        x = _as_net(crops.reshape(n * g, *crops.shape[2:]), model)
        probs = torch.cat([torch.softmax(model(v).float(), 1) for v in (x, x.flip(3))])  # 25 crops + flips
        yield probs.view(2, n, g, -1).mean(dim=(0, 2)), labels, loader.batch_keys


_RUNNERS = {"single": _single, "dense": _dense, "multicrop": _multicrop}


def protocol_parts(protocols: list[str]) -> list[str]:
    """The passes these protocols need, each once: dense+multicrop is made of the dense
    and multi-crop passes, so evaluating all three costs two."""
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    return list(dict.fromkeys(part for protocol in protocols for part in protocol.split("+")))


def parts_by_scale(model, info, split: str, parts: list[str], scales: list[int], *, crop: int,
                   normalize_std: bool, rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu"),
                   batch_size: int = 32, threads: int = 2, on_images=None) -> dict[tuple[str, int], Posteriors]:
    """This rank's share of the split for each pass (`part`: single, dense or multicrop) at
    each Q of `scales` on its own, keyed (part, Q), probabilities in float64 until combined.
    `on_images(n)` is told after each batch how many images it held (progress). The model
    is put in eval mode, on `device` and channels last, in place."""
    if min(scales) < crop:
        raise ValueError(f"test scale Q={min(scales)} is smaller than the {crop}px crop")
    model = model.eval().to(device, memory_format=torch.channels_last)
    expected = rank_keys(info, split, rank, world)
    labels, keys, out = None, None, {}
    for q in scales:
        for part in parts:
            probs, labs, read = [], [], []
            for p, y, k in _RUNNERS[part](model, info, split, q, crop, normalize_std, rank, world, device,
                                          batch_size, threads):
                probs.append(p.cpu())
                labs.append(y.cpu())
                read += k
                if on_images is not None:
                    on_images(len(k))
            p = torch.cat(probs).numpy().astype(np.float64)
            y = torch.cat(labs).numpy().astype(np.int64)
            # The keys the loader returned, not the index's: a sample read twice or never shows.
            check_keys(read, expected, f"{part} at Q={q}, rank {rank} of {world}: ")
            if keys is not None and (read != keys or not np.array_equal(labels, y)):
                raise RuntimeError(f"{part}: rank {rank} read its images in a different order at Q={q}")
            labels, keys = y, read
            out[(part, q)] = Posteriors(list(read), y, p)
    return out


def combine(parts: dict[tuple[str, int], Posteriors], protocol: str, scales: list[int]) -> dict[int, Posteriors]:
    """`protocol` at each Q from its passes: dense+multicrop averages the dense and the
    multi-crop posteriors (Section 3.2)."""
    out = {}
    for q in scales:
        passes = [parts[(part, q)] for part in protocol.split("+")]
        probs = np.mean([p.probs.astype(np.float64) for p in passes], axis=0)
        out[q] = Posteriors(list(passes[0].keys), passes[0].labels, probs.astype(np.float32))
    return out


def posteriors_by_scale(model, info, split: str, protocol: str, scales: list[int], *, crop: int,
                        normalize_std: bool, rank: int = 0, world: int = 1,
                        device: torch.device = torch.device("cpu"), batch_size: int = 32,
                        threads: int = 2, on_images=None) -> dict[int, Posteriors]:
    """This rank's share of the split under `protocol` at each Q of `scales` on its own.
    A multi-scale evaluation computes every single-scale one on the way: Table 4's
    dense over {S-32, S, S+32} holds Table 3's dense at Q = S."""
    parts = parts_by_scale(model, info, split, protocol_parts([protocol]), scales, crop=crop,
                           normalize_std=normalize_std, rank=rank, world=world, device=device,
                           batch_size=batch_size, threads=threads, on_images=on_images)
    return combine(parts, protocol, scales)


def average_scales(by_scale: dict[int, Posteriors]) -> Posteriors:
    """Section 3.2's multi-scale result: the posteriors averaged over the test scales."""
    first = next(iter(by_scale.values()))
    probs = np.mean([p.probs.astype(np.float64) for p in by_scale.values()], axis=0)
    return Posteriors(first.keys, first.labels, probs.astype(np.float32))


def posteriors(model, info, split: str, protocol: str, scales: list[int], *, crop: int, normalize_std: bool,
               rank: int = 0, world: int = 1, device: torch.device = torch.device("cpu"), batch_size: int = 32,
               threads: int = 2) -> Posteriors:
    """This rank's share of the split under `protocol`, averaged over `scales`."""
    return average_scales(posteriors_by_scale(model, info, split, protocol, scales, crop=crop,
                                              normalize_std=normalize_std, rank=rank, world=world, device=device,
                                              batch_size=batch_size, threads=threads))


def check_keys(read: list[str], expected: list[str], what: str = "") -> None:
    """Every expected sample key exactly once in `read`, or an error naming a sample read
    twice, one never read and one that should not be there."""
    counts: dict[str, int] = {}
    for key in read:
        counts[key] = counts.get(key, 0) + 1
    twice = sorted(k for k, n in counts.items() if n > 1)
    missing = sorted(set(expected) - set(counts))
    extra = sorted(set(counts) - set(expected))
    if twice or missing or extra:
        said = [f"{len(twice)} read more than once (e.g. {twice[0]!r})" if twice else "",
                f"{len(missing)} never read (e.g. {missing[0]!r})" if missing else "",
                f"{len(extra)} not expected (e.g. {extra[0]!r})" if extra else ""]
        raise RuntimeError(f"{what}{len(read)} images read for {len(expected)} expected: "
                           + "; ".join(x for x in said if x))


# ---------------------------------------------------------------- storage


def to_table(post: Posteriors):
    """Keys, labels and float16 posteriors as an Arrow table (one row per image)."""
    import pyarrow as pa

    classes = post.probs.shape[1]
    flat = pa.array(post.probs.astype(np.float16).reshape(-1), type=pa.float16())
    return pa.table({"key": pa.array(post.keys, pa.string()), "label": pa.array(post.labels, pa.int64()),
                     "probs": pa.FixedSizeListArray.from_arrays(flat, classes)})


def from_table(table) -> Posteriors:
    probs = table.column("probs").combine_chunks()
    classes = probs.type.list_size
    values = probs.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, classes)
    return Posteriors(table.column("key").to_pylist(), table.column("label").to_numpy().astype(np.int64), values)


def write_parquet(post: Posteriors, path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(to_table(post), path)


def read_parquet(path) -> Posteriors:
    import pyarrow.parquet as pq

    return from_table(pq.read_table(path))
