"""`bench gpu`'s correctness checks: every DALI graph on the device against the CPU graph
on the same samples, exactly-once evaluation over uneven ranks, and our torchvision key
map against real torchvision."""

from __future__ import annotations

import torch

from pipeline.data import DatasetInfo, Draws, dense_loader, eval_loader, multi_crop_loader, train_loader

# Mean absolute difference (0-255 pixel levels) allowed between a GPU and a CPU batch of
# the same samples. JPEG decoders may differ by about one level per pixel (IEEE 1180
# IDCT accuracy: nvJPEG's IDCT is not libjpeg-turbo's), chroma upsampling may differ by a
# few levels at colour edges, and the GPU graph emits float16 (0.125 steps above 128).
# Measured differences of this kind average well under one level; 2.0 still fails any
# geometric error (a window off by one pixel, a flipped or swapped channel).
PIXEL_TOLERANCE = 2.0



def _compare(name: str, ref: list, got: list) -> dict:
    """Batches of the same samples from the CPU graph (`ref`) and the device graph."""
    shapes = [tuple(x.shape) for x, _ in ref] == [tuple(x.shape) for x, _ in got]
    labels = all(torch.equal(a.cpu(), b.cpu()) for (_, a), (_, b) in zip(ref, got)) and len(ref) == len(got)
    diffs = [(a.float() - b.cpu().float()).abs() for (a, _), (b, _) in zip(ref, got)] if shapes else []
    mean = float(torch.cat([d.flatten() for d in diffs]).mean()) if diffs else float("inf")
    worst = float(max(float(d.max()) for d in diffs)) if diffs else float("inf")
    ok = shapes and labels and mean <= PIXEL_TOLERANCE
    return {"graph": name, "ok": bool(ok), "shapes_equal": shapes, "labels_equal": labels,
            "mean_abs_diff": round(mean, 4), "max_abs_diff": round(worst, 3), "tolerance": PIXEL_TOLERANCE,
            "batches": len(ref)}


def _first(loader, n: int) -> list:
    out = []
    for x, y in loader:
        out.append((x.cpu(), y.cpu()))
        if len(out) == n:
            break
    return out


NO_VAL = "skipped: no val split"
VAL_GRAPHS = ("centre crop", "dense", "multi-crop", "evaluation over 3 ranks, uneven shards")


def check_graphs(info: DatasetInfo, device: torch.device, sizes: dict, val: bool = True) -> list[dict]:
    """Every graph on the device against the CPU; without a val split, the evaluation
    graphs say so instead of failing the whole check."""
    cpu, crop, b = torch.device("cpu"), sizes["crop"], sizes["check_batch"]
    lo, hi = sizes["scale"]
    q = sizes["eval_scales"][0]
    draws = Draws(scale=float((lo + hi) // 2), pos_x=0.3, pos_y=0.6, mirror=1)
    results = []
    for decode in ("roi", "whole"):
        kw = dict(rank=0, world_size=1, batch_size=b, scale_range=(lo, hi), crop=crop, threads=2, draws=draws)
        ref = _first(train_loader(info, "train", device=cpu, **kw), 3)
        got = _first(train_loader(info, "train", device=device, decode=decode, **kw), 3)
        results.append(_compare(f"train (draws fixed, {decode} decode)", ref, got))
    if not val:
        return results + [{"graph": name, "ok": None, "skipped": NO_VAL} for name in VAL_GRAPHS]
    kw = dict(rank=0, world_size=1, batch_size=b, scale=q, crop=crop, threads=2)
    results.append(_compare("centre crop", _first(eval_loader(info, "val", device=cpu, **kw), 3),
                            _first(eval_loader(info, "val", device=device, **kw), 3)))
    kw = dict(rank=0, world_size=1, scale=q, threads=2)
    results.append(_compare("dense", _first(dense_loader(info, "val", device=cpu, **kw), 8),
                            _first(dense_loader(info, "val", device=device, **kw), 8)))
    kw = dict(rank=0, world_size=1, batch_size=b, scale=q, crop=crop, threads=2)
    results.append(_compare("multi-crop", _first(multi_crop_loader(info, "val", device=cpu, **kw), 2),
                            _first(multi_crop_loader(info, "val", device=device, **kw), 2)))
    results.append(check_exactly_once(info, device, sizes, world=3))
    return results


def check_exactly_once(info: DatasetInfo, device: torch.device, sizes: dict, world: int) -> dict:
    """Evaluation on the device graph over `world` ranks reads each validation image
    once: per-rank counts and labels equal the shard index's slices, in order."""
    import pyarrow.parquet as pq

    from pipeline.protocols import rank_keys

    table = pq.read_table(info.root / "manifest.parquet", columns=["split", "key", "label"]).to_pylist()
    label_of = {r["key"]: r["label"] for r in table if r["split"] == "val"}
    seen, ok = [], True
    for rank in range(world):
        keys = rank_keys(info, "val", rank, world)
        loader = eval_loader(info, "val", rank=rank, world_size=world, batch_size=sizes["check_batch"],
                             scale=sizes["eval_scales"][0], crop=sizes["crop"], device=device, threads=2)
        labels = [int(v) for _, y in loader for v in y.cpu()]
        ok &= labels == [label_of[k] for k in keys]
        seen += keys
    ok &= len(seen) == len(set(seen)) == info.counts["val"]
    return {"graph": f"evaluation over {world} ranks, uneven shards", "ok": bool(ok), "images": len(seen),
            "unique": len(set(seen)), "expected": info.counts["val"]}



def check_torchvision_keys(device: torch.device) -> list[dict]:
    """Our key map against real torchvision: random vgg16 and vgg16_bn weights loaded
    into our nets give torchvision's outputs."""
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001
        return [{"check": "torchvision key map", "ok": None, "skipped": f"torchvision not importable ({exc})"}]
    from pipeline.models import build_model, load_torchvision_state

    results = []
    for name, bn in (("vgg16", False), ("vgg16_bn", True)):
        torch.manual_seed(0)
        theirs = getattr(torchvision.models, name)(weights=None).eval().to(device)
        ours = build_model("D", num_classes=1000, batch_norm=bn).eval().to(device)
        load_torchvision_state(ours, theirs.state_dict())
        x = torch.randn(2, 3, 224, 224, device=device)
        with torch.no_grad():
            a, b = theirs(x).float(), ours(x).float()
        diff = float((a - b).abs().max())
        results.append({"check": f"torchvision {name} key map", "ok": diff <= 1e-4 * max(1.0, float(a.abs().max())),
                        "max_abs_diff": diff})
    return results
