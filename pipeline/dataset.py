"""What data_prep/shard.py wrote, read without DALI: the shard set's counts and colour
statistics (`DatasetInfo`), its shard and index files, and the host-side parsing of what
the graphs return (keys, JSON labels). The driver and the preflight read these too,
without loading DALI; pipeline/data.py builds the graphs on them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class DatasetInfo:
    """What data_prep/shard.py wrote: shard files, counts, colour statistics."""

    root: Path
    counts: dict[str, int]
    num_classes: int
    label_digits: int
    mean_rgb: tuple[float, float, float]
    rgb_eigval: tuple[float, float, float]
    rgb_eigvec: tuple[tuple[float, ...], ...]  # columns are eigenvectors
    # Labels: "cls" (ASCII digits, parsed inside the graph) or "json" (shards written
    # elsewhere and indexed in place: the object's `label_field`, parsed per batch on
    # the host; `label_bytes` is the largest such member).
    label_format: str = "cls"
    label_field: str = "label"
    label_bytes: int = 0

    @classmethod
    def load(cls, root: str | Path) -> "DatasetInfo":
        root = Path(root)
        path = root / "stats.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found; run data_prep/shard.py --out {root} first")
        s = json.loads(path.read_text())
        if "mean_rgb" not in s:
            raise ValueError(f"{path}: no colour statistics (was a train split sharded?)")
        return cls(root, s["counts"], s["num_classes"], s["label_digits"], tuple(s["mean_rgb"]),
                   tuple(s["rgb_eigval"]), tuple(tuple(r) for r in s["rgb_eigvec"]),
                   s.get("label_format", "cls"), s.get("label_field", "label"), s.get("label_bytes", 0))

    @property
    def std_rgb(self) -> tuple[float, ...]:
        cov = np.asarray(self.rgb_eigvec) @ np.diag(self.rgb_eigval) @ np.asarray(self.rgb_eigvec).T
        return tuple(float(math.sqrt(max(v, 1e-6))) for v in np.diag(cov))

    def decode_hints(self, split: str) -> dict:
        """Arguments for a mixed (GPU) JPEG decoder, from the manifest's image sizes:
        pinned host and device buffers that fit the split's largest decoded image (DALI's
        defaults are 8 and 16 MiB, which an ImageNet outlier of 20+ MP outgrows mid-epoch,
        costing a synchronous reallocation), and the hardware decoder's preallocation at
        that size. Empty when the manifest has no sizes (shards written elsewhere)."""
        path = self.root / "manifest.parquet"
        if not path.is_file():
            return {}
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["split", "width", "height"])
        table = table.filter(pc.equal(table["split"], split))
        if table.num_rows == 0:
            return {}
        w, h = pc.max(table["width"]).as_py(), pc.max(table["height"]).as_py()
        area = pc.max(pc.multiply(table["width"], table["height"])).as_py()
        decoded = int(area) * 3
        return {"device_memory_padding": max(16 << 20, decoded), "host_memory_padding": max(8 << 20, decoded),
                "preallocate_width_hint": int(w), "preallocate_height_hint": int(h)}

    def shards(self, split: str) -> tuple[list[str], list[str]]:
        """(tar paths, index paths), sorted, so every rank sees the same list."""
        tars = sorted((self.root / split).glob("*.tar"))
        if not tars:
            raise FileNotFoundError(f"{self.root / split}: no .tar shards")
        keep = [t for t in tars if _index_count(t.with_suffix(".idx")) > 0]  # all-rejected shards
        return [str(t) for t in keep], [str(t.with_suffix(".idx")) for t in keep]


def _index_count(idx: Path) -> int:
    if not idx.is_file():
        raise FileNotFoundError(f"{idx}: DALI index missing (rerun data_prep/shard.py to finish the shard)")
    with open(idx) as fh:
        return int(fh.readline().split()[1])


def _source_keys(raw: torch.Tensor) -> list[str]:
    """Sample keys from `_source`'s bytes: the member name up to its first dot, as in the
    index (`_index_keys`)."""
    rows = raw.cpu().numpy()
    return [bytes(row[row != 0]).decode().rsplit(":", 1)[-1].rsplit("/", 1)[-1].split(".", 1)[0] for row in rows]


def _index_keys(idx: str) -> list[str]:
    with open(idx) as fh:
        fh.readline()
        return [line.split()[3].split(".", 1)[0] for line in fh if line.strip()]


def _json_labels(raw: torch.Tensor, field: str) -> torch.Tensor:
    """Labels from the zero-padded bytes of each sample's .json member (a batch of a
    few hundred small objects: microseconds on the host)."""
    rows = raw.cpu().numpy()
    return torch.tensor([json.loads(bytes(row[row != 0]))[field] for row in rows], dtype=torch.int64)
