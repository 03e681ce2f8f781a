"""The finishing step of a shard set, shared by `shard.py` (sets it writes) and
`foreign.py` (other tools' sets it indexes in place)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np

from data_prep.store import join, write_bytes
from data_prep.writer import _digest_bytes


def finalise(out, splits, train_split, done, wnids, names, label_digits, args, extra_stats=None):
    """Write the set-level files of a shard set whose shards are all written (`done`:
    (split, shard) -> ShardResult): classes.json, stats.json (counts, the training
    set's mean RGB and colour eigen-decomposition), rejects.csv, files.json (size and
    SHA-256 of every file, what --stage-in checks copies by) and manifest.parquet,
    written last: its presence means the set is complete. Returns (counts, rejects)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, rejects, counts = [], [], {}
    pixels, rgb_sum, rgb_outer = 0, np.zeros(3), np.zeros((3, 3))
    for (split, shard), res in sorted(done.items()):
        for row in res.rows:
            rows.append(dict(row, split=split, shard=f"{split}/{shard}.tar"))
        rejects += [dict(r, split=split) for r in res.rejects]
        counts[split] = counts.get(split, 0) + len(res.rows)
        if split == train_split:
            pixels += res.pixels
            rgb_sum += np.asarray(res.rgb_sum)
            rgb_outer += np.asarray(res.rgb_outer)
    columns = ["split", "key", "label", "wnid", "shard", "source", "bytes", "width", "height", "action"]
    table = pa.table({c: [r[c] for r in rows] for c in columns})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    outputs = {}  # written in this order; the manifest last: its presence means the set is complete
    classes = [{"index": i, "wnid": w, "name": names.get(w, w)} for i, w in enumerate(wnids)]
    outputs["classes.json"] = json.dumps(classes, indent=1).encode()
    stats = {"counts": {s: counts.get(s, 0) for s in splits}, "num_classes": len(wnids),
             "label_digits": label_digits, "rejects": len(rejects), "options": args, **(extra_stats or {})}
    if pixels:
        # The paper subtracts the training mean RGB; AlexNet's colour shift uses the
        # eigen-decomposition of the RGB covariance (both on 0-255 values).
        mean = rgb_sum / pixels
        cov = rgb_outer / pixels - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        stats.update(mean_rgb=mean.round(4).tolist(), rgb_eigval=eigval[order].round(4).tolist(),
                     rgb_eigvec=eigvec[:, order].round(6).tolist(), stats_pixels=int(pixels))
    outputs["stats.json"] = json.dumps(stats, indent=1).encode()
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["split", "source", "reason"])
    writer.writeheader()
    writer.writerows(rejects)
    outputs["rejects.csv"] = text.getvalue().encode()
    outputs["manifest.parquet"] = buf.getvalue()
    # Size and SHA-256 of every file of the set, as written: what --stage-in checks copies by.
    files = {f"{split}/{name}": digest
             for (split, _), res in sorted(done.items()) for name, digest in res.files.items()}
    files.update({name: _digest_bytes(data) for name, data in outputs.items()})
    outputs = {"files.json": json.dumps(files, indent=1, sort_keys=True).encode(), **outputs}
    order = [n for n in outputs if n != "manifest.parquet"] + ["manifest.parquet"]
    for name in order:
        write_bytes(join(out, name), outputs[name])
    return counts, rejects
