"""The plan as a parallel schedule: waves of independent stages, and how long a plan
takes on N GPUs before anyone spends anything.

Pure functions over a Plan (no Ray, no MLflow). A stage can start once its
`init_from` stage has finished; stages that fit on the cluster at the same time
train side by side. Estimates use images/s per GPU per arch: measured figures from
`bench/results/gpu-*.json` (`python -m pipeline bench gpu`), or `--throughput` flags.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.stages import Plan

IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 training images


def waves(plan: Plan) -> list[list[str]]:
    """Stages by depth in the init_from graph: wave k can start once wave k-1 is done
    (a stage may start earlier, as soon as its own source has finished)."""
    depth: dict[str, int] = {}
    for stage in plan.order():
        src = stage.init_from.stage if stage.init_from else None
        depth[stage.name] = 0 if src is None else depth[src] + 1
    out: list[list[str]] = [[] for _ in range(max(depth.values()) + 1)]
    for name, d in depth.items():
        out[d].append(name)
    return out


def measured_throughput(results_dir: str | Path) -> tuple[dict[str, float], str] | None:
    """Images/s per GPU of VGG-16 (config D) from the newest `bench gpu` result: the
    loader-fed rate at its largest batch (what training sees). None if there is none."""
    found = []
    for path in glob.glob(str(Path(results_dir) / "gpu-*.json")):
        try:
            doc = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        train = doc.get("train") or {}
        if not str(doc.get("environment", {}).get("device", "")).startswith("cuda") or train.get("crop") != 224:
            continue
        rows = [(int(k.split("_")[1]), v) for k, v in train.items() if k.startswith("batch_") and isinstance(v, dict)]
        rows = [(b, r["loader_fed"]["img_s"]) for b, r in rows if isinstance(r.get("loader_fed"), dict)]
        if rows:
            env = doc["environment"]
            found.append((env.get("date", ""), path, max(rows)[1], env.get("device_name")))
    if not found:
        return None
    _, path, rate, device = max(found)
    return {"D": float(rate)}, f"{path} ({device}, loader-fed VGG-16)"


def per_arch(throughput: dict[str, float], arch: str, crop: int) -> tuple[float, bool]:
    """(images/s per GPU, estimated?) for `arch`: measured if given, else scaled from a
    measured arch by forward-backward GMACs at the same crop (compute-bound nets)."""
    from pipeline.archs import get_arch
    from pipeline.models import gmacs

    name = get_arch(arch).name
    if name in throughput:
        return throughput[name], False
    ref = next(iter(throughput))
    return throughput[ref] * gmacs(get_arch(ref), crop) / gmacs(get_arch(name), crop), True


@dataclass(frozen=True)
class StageEstimate:
    stage: str
    gpus: int
    epochs: int
    img_s_per_gpu: float
    scaled: bool  # throughput scaled from another arch
    hours: float
    start: float  # hours from the plan's start, in the parallel schedule
    end: float
    min_hours: float = 0.0  # an elastic stage's time at its min workers


def estimate(plan: Plan, gpus: int, throughput: dict[str, float], train_images: int) -> dict:
    """Each stage's time on its GPUs, then a greedy schedule on `gpus` GPUs (a ready
    stage starts when enough GPUs are free, in plan order), the plan's wall time that
    way and one stage at a time, and the critical path. An elastic stage ([min, max]
    workers) is estimated at the most workers it may take on these GPUs, min(max, gpus),
    with no node lost (`min_hours`: the same at min workers, what it costs while the
    cluster holds only min)."""
    for stage in plan.stages.values():
        if stage.resources.min_workers > gpus:
            raise ValueError(f"stage {stage.name} needs {stage.resources.min_workers} GPUs; the cluster has {gpus}")
    est: dict[str, dict] = {}
    for stage in plan.order():
        rate, scaled = per_arch(throughput, stage.arch, stage.recipe.crop)
        epochs = stage.recipe.epochs_for(train_images)
        workers = min(stage.resources.max_workers, gpus)
        hours = epochs * train_images / (rate * workers) / 3600
        est[stage.name] = dict(stage=stage, gpus=workers, epochs=epochs, rate=rate, scaled=scaled, hours=hours,
                               min_hours=hours * workers / stage.resources.min_workers)
    # Event-driven list scheduling.
    now, free, done_at, running, pending = 0.0, gpus, {}, {}, [s.name for s in plan.order()]
    start: dict[str, float] = {}
    while pending or running:
        for name in list(pending):
            src = est[name]["stage"].init_from
            ready = src is None or src.stage in done_at
            if ready and est[name]["gpus"] <= free:
                start[name], free = now, free - est[name]["gpus"]
                running[name] = now + est[name]["hours"]
                pending.remove(name)
        if not running:  # cannot happen: with nothing running every ready stage fits
            raise RuntimeError(f"schedule: stages {pending} can never start")
        name = min(running, key=running.get)
        now = running.pop(name)
        done_at[name], free = now, free + est[name]["gpus"]
    # Critical path: the chain of init_from sources with the longest total time.
    path_hours: dict[str, float] = {}
    best_src: dict[str, str | None] = {}
    for stage in plan.order():
        src = stage.init_from.stage if stage.init_from else None
        path_hours[stage.name] = est[stage.name]["hours"] + (path_hours[src] if src else 0.0)
        best_src[stage.name] = src
    tail = max(path_hours, key=path_hours.get)
    chain = []
    while tail is not None:
        chain.append(tail)
        tail = best_src[tail]
    stages = [StageEstimate(n, e["gpus"], e["epochs"], e["rate"], e["scaled"], e["hours"], start[n], done_at[n],
                            e["min_hours"]) for n, e in est.items()]
    return {"stages": stages, "parallel_hours": max(done_at.values()),
            "sequential_hours": sum(e["hours"] for e in est.values()),
            "critical_path": list(reversed(chain)), "critical_path_hours": max(path_hours.values())}


def describe(plan: Plan, gpus: int | None, throughput: dict[str, float] | None, source: str,
             train_images: int) -> str:
    lines = [f"plan {plan.name}, recipe: {plan.recipe_label}", "schedule (a stage starts once its init_from "
             "stage has finished; stages in one wave can train side by side):"]
    for i, wave in enumerate(waves(plan), start=1):
        lines.append(f"  wave {i}: " + ", ".join(wave))
    for st in plan.order():
        src = f" <- {st.init_from.stage}" if st.init_from else ""
        warm = f", warmup {st.recipe.optim.warmup_epochs:g} epochs" if st.recipe.optim.warmup_epochs else ""
        lines.append(f"{st.name}: {st.arch} S={st.scale_label}{src}, {st.recipe.epochs} epochs, "
                     f"batch {st.recipe.batch_size}, lr {st.recipe.optim.lr}{warm}, {_workers_label(st)}")
    if gpus is None:
        return "\n".join(lines)
    if not throughput:
        lines.append("no throughput figure for an estimate: run `python -m pipeline bench gpu --out "
                     "bench/results/gpu-<device>.json` on a GPU, or pass --throughput D=IMG_S (images/s per GPU)")
        return "\n".join(lines)
    e = estimate(plan, gpus, throughput, train_images)
    lines.append(f"estimate on {gpus} GPUs, {train_images:,} training images, throughput from {source}:")
    for s in e["stages"]:
        how = " (scaled from D by GMACs)" if s.scaled else ""
        lines.append(f"  {s.stage}: {s.gpus} GPUs x {s.img_s_per_gpu:,.0f} img/s{how}, {s.epochs} epochs: "
                     f"{s.hours:.1f} h, hours {s.start:.1f}-{s.end:.1f}")
        res = plan.stages[s.stage].resources
        if res.elastic:
            lines[-1] += (f"; elastic [{res.min_workers}, {res.max_workers}]: {s.min_hours:.1f} h if it holds "
                          f"only {res.min_workers}")
    lines.append(f"  parallel: {e['parallel_hours']:.1f} h; one stage at a time: {e['sequential_hours']:.1f} h; "
                 f"critical path {' -> '.join(e['critical_path'])}: {e['critical_path_hours']:.1f} h")
    elastic = [st for st in plan.stages.values() if st.resources.elastic]
    if elastic:
        every = sorted({st.recipe.checkpoint_every_steps for st in elastic})
        lost = (f"up to {'/'.join(map(str, every))} steps" if 0 not in every
                else "up to an epoch where checkpoint_every_steps is 0")
        lines.append("  elastic stages are estimated at the most workers they may take here (min(max, GPUs)), with no "
                     "node lost; the global batch, lr curve and step counts are the same at any size. Each resize "
                     "restarts the worker group from the latest checkpoint (about a minute) and redoes the steps "
                     f"after it: none after a drain notice (checkpointed inside the window), {lost} after a node "
                     "lost without notice")
    return "\n".join(lines)


def _workers_label(st) -> str:
    res = st.resources
    return f"[{res.min_workers}, {res.max_workers}] workers (elastic)" if res.elastic else f"{res.num_workers} workers"


def critical_path_priority(plan: Plan) -> dict[str, float]:
    """Each stage's longest chain of work still ahead through its dependants (epochs x
    GMACs per image / workers as the cost of a stage): stages ready at once start in
    this order, so the critical path never waits behind a side branch."""
    from pipeline.archs import get_arch
    from pipeline.models import gmacs

    cost = {s.name: s.recipe.epochs * gmacs(get_arch(s.arch), s.recipe.crop, width_mult=s.recipe.width_mult)
            / s.resources.max_workers for s in plan.stages.values()}
    priority: dict[str, float] = {}
    for stage in reversed(plan.order()):
        after = [priority[d.name] for d in plan.stages.values() if d.init_from and d.init_from.stage == stage.name]
        priority[stage.name] = cost[stage.name] + max(after, default=0.0)
    return priority
