"""`python -m pipeline bench gpu`: the whole GPU check in one command, no Ray, no MLflow.

On a CUDA machine it (1) checks that every DALI graph gives on the GPU what it gives
on the CPU and that evaluation over 3 ranks counts every image once, (2) times the
training loader (our ROI graph, the whole-image hardware-decoder graph, webdataset +
PIL + DataLoader, torchvision's GPU decode_jpeg), (3) times VGG-16 training at batch
128 and 256 (synthetic and loader-fed, bf16 + channels_last, torch.compile off and on,
against torchvision's vgg16) and checks our torchvision key map, and (4) times dense
and 150-crop evaluation. One JSON document (stdout, and --out, rewritten after every
section so a cut-off run still leaves its figures) and a table for people.

`--device cpu` runs the same code at tiny sizes (CI keeps it from rotting); there the
"GPU" graphs are the CPU ones and parts that need CUDA or torchvision say "skipped".
Without --shards it makes ImageNet-like JPEGs (about 500x375, cut from scikit-image's
sample photos, at a quality that lands near ImageNet's ~110 KB) and shards them with
data_prep/shard.py. The sections live in gpu_checks.py, gpu_data.py and gpu_rates.py.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from pipeline.bench.gpu_checks import NO_VAL, check_graphs, check_torchvision_keys
from pipeline.bench.gpu_data import bench_data, has_split
from pipeline.bench.gpu_rates import eval_throughput, loader_throughput, train_throughput
from pipeline.data import DALI_VERSION

SIZES = {  # per device: the real check on a GPU, the same code at toy size on a CPU
    "cuda": dict(arch="D", width_mult=1.0, crop=224, scale=(256, 512), batches=(128, 256), eval_scales=(256, 384, 512),
                 train_images=3000, val_images=600, classes=10, photo=(500, 375), jpeg_kb=110, loader_batch=256,
                 check_batch=16),
    "cpu": dict(arch="D", width_mult=1 / 16, crop=32, scale=(36, 48), batches=(4, 8), eval_scales=(36, 48, 64),
                train_images=60, val_images=31, classes=3, photo=(100, 75), jpeg_kb=5, loader_batch=8, check_batch=4),
}

class Budget:
    """`--budget SECONDS`: the whole command's wall time, planned so one short GPU lease
    always brings its figures home. Correctness runs first and whole; the timed sections
    then share what is left by weight (loader 1, train 2, eval 1 of the sections still to
    run), each split over its measurements with a 2x allowance for building pipelines,
    warmup and compilation. Where a measurement would get less than `floor` seconds, the
    section drops its later repetitions (batch sizes, test scales) down to one; a section
    with not even that left is skipped and says so. Without a budget: `seconds` each, all
    repetitions."""

    WEIGHTS = {"loader": 1.0, "train": 2.0, "eval": 1.0}
    ALLOWANCE = 2.0

    def __init__(self, seconds: float | None, floor: float):
        self.total, self.floor = seconds, floor
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()

    def plan(self, section: str, per_rep: int, reps: int, seconds: float) -> tuple[int, float] | None:
        """(repetitions, seconds per measurement) for `section`, or None: no time left."""
        if self.deadline is None:
            return reps, seconds
        todo = list(self.WEIGHTS)[list(self.WEIGHTS).index(section):]
        share = self.WEIGHTS[section] / sum(self.WEIGHTS[s] for s in todo)
        avail = share * self.left() / self.ALLOWANCE
        for n in range(reps, 0, -1):
            each = avail / (n * per_rep)
            if each >= self.floor:
                return n, min(seconds, each)
        return None


def environment(device: torch.device, command: str) -> dict:
    env = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
           "machine": platform.node(), "device": str(device)}
    env["dali"] = DALI_VERSION
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except Exception as exc:  # noqa: BLE001 - a CUDA torchvision on a CPU torch raises odd errors
        env["torchvision"] = f"not importable ({type(exc).__name__})"
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, IndexError, subprocess.TimeoutExpired):
            env["driver"] = None
    else:
        env["device_name"] = platform.processor() or "cpu"
    return env


# ---------------------------------------------------------------- the command


def table(doc: dict) -> str:
    lines = [f"GPU check on {doc['environment'].get('device_name')} ({doc['environment']['device']}): "
             f"{'PASS' if doc.get('ok') else 'FAIL'}"]
    for c in doc.get("correctness", []):
        figures = f"mean |diff| {c['mean_abs_diff']} (tol {c['tolerance']})" if "mean_abs_diff" in c else \
            f"{c.get('images')} images, {c.get('unique')} unique of {c.get('expected')}" if "images" in c else \
            c.get("skipped", f"max |diff| {c.get('max_abs_diff')}")
        name = c.get("graph") or c.get("check")
        lines.append(f"  {'ok  ' if c.get('ok') else 'skip' if c.get('ok') is None else 'FAIL'} {name}: {figures}")
    ld = doc.get("loader", {})
    if isinstance(ld, dict) and "dali_roi_img_s" in ld:
        lines.append(f"  loader img/s: DALI roi {ld['dali_roi_img_s']}, DALI whole {ld['dali_whole_img_s']}, "
                     f"webdataset+PIL {ld['webdataset_pil_img_s']}, torchvision GPU "
                     f"{ld['torchvision_decode_jpeg_cuda_img_s']} (faster: {ld['faster_decode']})")
    tr = doc.get("train", {})
    for key, row in tr.items() if isinstance(tr, dict) else ():
        if key.startswith("batch_"):
            syn = ", ".join(f"{k.removeprefix('synthetic_')} {v['img_s']}" for k, v in row.items()
                            if k.startswith("synthetic_") and isinstance(v, dict))
            tv = row["torchvision_vgg16"]
            tv = f", torchvision vgg16 {tv['img_s']}" if isinstance(tv, dict) else ""
            lines.append(f"  {tr['arch']} train {key}: synthetic {syn}{tv} img/s; loader-fed "
                         f"{row['loader_fed']['img_s']} ({row['loader_vs_synthetic']:.1%}), data wait "
                         f"{row['loader_fed']['data_wait_fraction']:.1%}, {row['synthetic_tflop_s']} TFLOP/s")
    for name in ("loader", "train", "eval"):
        if isinstance(doc.get(name), str):
            lines.append(f"  {name}: {doc[name]}")
    ev = doc.get("eval", {})
    if isinstance(ev, dict) and ev:
        lines.append("  eval img/s: " + ", ".join(f"{k.removesuffix('_img_s')} {v}" for k, v in ev.items()))
    for section, error in doc.get("errors", {}).items():
        lines.append(f"  ERROR in {section}: {error.splitlines()[-1] if error else ''}")
    return "\n".join(lines)


def run(shards: str | None, seconds: float | None, out: str | None, device_name: str, workdir: str | None = None,
        command: str | None = None, budget: float | None = None) -> int:
    if device_name == "cuda" and not torch.cuda.is_available():
        print("bench gpu: no CUDA device is visible (use --device cpu for the CPU rehearsal)", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if device_name == "cuda" else torch.device("cpu")
    sizes = SIZES[device_name]
    seconds = seconds if seconds is not None else (10.0 if device.type == "cuda" else 1.0)
    clock = Budget(budget, floor=2.0 if device.type == "cuda" else 0.2)
    command = command or "python -m pipeline " + " ".join(sys.argv[1:])
    doc: dict = {"bench": "gpu", "environment": environment(device, command),
                 "sizes": sizes, "seconds": seconds, "budget_seconds": budget, "errors": {}}

    def save():
        doc["ok"] = all(c.get("ok") is not False for c in doc.get("correctness", [])) and not doc["errors"]
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(json.dumps(doc, indent=1, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-gpu-", dir=workdir) as tmp:
        info, doc["data"] = bench_data(shards, Path(tmp), sizes)
        tars = info.shards("train")[0]
        val = has_split(info, "val")
        save()
        cuda = device.type == "cuda"

        def timed(name: str, per_rep: int, reps_key: str | None, section):
            """`section(sizes, seconds)` with its repetitions trimmed to the budget."""
            reps = len(sizes[reps_key]) if reps_key else 1
            planned = clock.plan(name, per_rep, reps, seconds)
            if planned is None:
                return f"skipped: budget spent ({max(clock.left(), 0):.0f} s left)"
            n, each = planned
            doc.setdefault("budget_plan", {})[name] = {"repetitions": n, "seconds_each": round(each, 2)}
            return section(dict(sizes, **{reps_key: sizes[reps_key][:n]}) if reps_key else sizes, each)

        # What the first GPU run must learn, in order: is it right, is the loader fast
        # enough, how fast does it train, how fast does it evaluate.
        sections = [("correctness", lambda: check_graphs(info, device, sizes, val) + check_torchvision_keys(device)),
                    ("loader", lambda: timed("loader", 4 if cuda else 3, None,
                                             lambda sz, s: loader_throughput(info, tars, device, sz, s))),
                    ("train", lambda: timed("train", 4 if cuda else 2, "batches",
                                            lambda sz, s: train_throughput(
                                                info, device, sz, s, doc.get("loader", {}).get("faster_decode", "roi")
                                                if isinstance(doc.get("loader"), dict) else "roi"))),
                    ("eval", lambda: timed("eval", 2, "eval_scales",
                                           lambda sz, s: eval_throughput(info, device, sz, s)) if val else NO_VAL)]
        for name, section in sections:
            t0 = time.monotonic()
            try:
                doc[name] = section()
            except Exception:  # noqa: BLE001 - one broken section must not hide the others' figures
                doc["errors"][name] = traceback.format_exc()[-3000:]
            doc.setdefault("section_seconds", {})[name] = round(time.monotonic() - t0, 1)
            save()
    print(json.dumps(doc, default=str))
    print(table(doc), file=sys.stderr)
    return 0 if doc["ok"] else 1
