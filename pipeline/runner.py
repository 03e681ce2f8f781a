"""Run a plan: stages in dependency order, each a Ray Train run, all tracked in MLflow.

A plan run has a name (by default the plan's name and a hash of its content), so
running the same command again after the driver died continues it: finished
stages are skipped (their checkpoints feed later stages) and the interrupted
stage resumes from its last Ray Train checkpoint, in the same MLflow runs.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import flatten, to_dict
from pipeline.stages import Plan, Stage


@dataclass(frozen=True)
class StageResult:
    stage: str
    arch: str
    train_scale: str
    eval_scale: int
    epochs: int
    top1_error: float
    top5_error: float
    run_id: str
    skipped: bool


def _storage(plan: Plan) -> str:
    if "://" in plan.storage:
        return plan.storage
    path = Path(plan.storage).resolve()  # Ray wants an absolute local path
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def default_run_name(plan: Plan, fresh: bool = False) -> str:
    name = f"{plan.name}-{plan.fingerprint()}"
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}" if fresh else name


def _ensure_ray(address: str | None, plan: Plan) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    # A local single-node cluster sized for the largest stage.
    cpus = max(int(s.resources.num_workers * s.resources.cpus_per_worker + 0.999) for s in plan.stages.values())
    ray.init(num_cpus=max(cpus, os.cpu_count() or 1), dashboard_host="127.0.0.1")


def registered_model_name(plan: Plan, stage: Stage) -> str:
    """One registered model per experiment and arch, e.g. vgg-paper-D; versions carry the stage."""
    from pipeline.archs import get_arch

    return f"{plan.experiment}-{get_arch(stage.arch).name}"


def _stage_tags(stage: Stage) -> dict:
    return {"arch": stage.arch, "stage": stage.name, "train_scale": stage.scale_label,
            "init_from": stage.init_from.stage if stage.init_from else "random",
            "stage_config": json.dumps(to_dict(stage), sort_keys=True)}


def run_plan(plan: Plan, *, run_name: str | None = None, tracking_uri: str, ray_address: str | None = None,
             out=None) -> list[StageResult]:
    from pipeline.evaluate import load_stage_model
    from pipeline.tracking import Tracker
    from pipeline.worker import checkpoint_from_uri, checkpoint_uri, fit_stage

    out = out or sys.stdout
    run_name = run_name or default_run_name(plan)
    storage = _storage(plan)
    tracker = Tracker(tracking_uri, plan.experiment)
    parent_id, resumed = tracker.parent_run(
        run_name, params={"plan_file": plan.source, "data.root": plan.data.root, "storage": plan.storage},
        tags={"plan": plan.name, "fingerprint": plan.fingerprint(), "mlflow.runName": run_name},
    )
    print(f"plan {plan.name}: run {run_name} ({'resumed' if resumed else 'new'}), MLflow run {parent_id}",
          file=out, flush=True)
    _ensure_ray(ray_address, plan)
    checkpoints: dict[str, object] = {}
    results: list[StageResult] = []
    for stage in plan.order():
        params = flatten(to_dict(stage)) | {"data.root": plan.data.root}
        srun = tracker.stage_run(parent_id, run_name, stage.name, params, _stage_tags(stage))
        if srun.finished:
            checkpoints[stage.name] = checkpoint_from_uri(srun.checkpoint)
            print(f"[{stage.name}] already finished in this plan run; skipped", file=out, flush=True)
            results.append(_result(stage, tracker, srun.run_id, skipped=True))
            continue
        init_ckpt = checkpoints[stage.init_from.stage] if stage.init_from else None
        try:
            outcome = fit_stage(stage, plan.data, trial_name=f"{run_name}-{stage.name}", storage=storage,
                                tracking_uri=tracking_uri, mlflow_run_id=srun.run_id, init_checkpoint=init_ckpt)
        except Exception as exc:
            tracker.fail(srun.run_id, f"{type(exc).__name__}: {exc}")
            raise
        checkpoints[stage.name] = outcome.checkpoint
        model = load_stage_model(stage, outcome.checkpoint)
        final = {"top1_error": outcome.metrics["val_top1_error"], "top5_error": outcome.metrics["val_top5_error"],
                 f"single_Q{stage.eval_scale}/top1_error": outcome.metrics["val_top1_error"],
                 f"single_Q{stage.eval_scale}/top5_error": outcome.metrics["val_top5_error"],
                 "epochs_trained": outcome.metrics["epoch"] + 1}
        tracker.finish_stage(srun.run_id, final, checkpoint_uri(outcome.checkpoint), model=model,
                             registered_name=registered_model_name(plan, stage))
        results.append(_result(stage, tracker, srun.run_id, skipped=False))
    best = min(results, key=lambda x: x.top1_error)
    tracker.finish_parent(parent_id, {"best_top1_error": best.top1_error, "best_top5_error": best.top5_error})
    return results


def _result(stage: Stage, tracker, run_id: str, skipped: bool) -> StageResult:
    run = tracker.client.get_run(run_id)
    m = run.data.metrics
    return StageResult(stage.name, stage.arch, stage.scale_label, stage.eval_scale, int(m.get("epochs_trained", 0)),
                       m["top1_error"], m["top5_error"], run_id, skipped)


def results_table(results: list[StageResult]) -> str:
    head = ["stage", "arch", "train S", "test Q", "epochs", "top-1 err %", "top-5 err %", "MLflow run"]
    rows = [[r.stage, r.arch, r.train_scale, str(r.eval_scale), str(r.epochs), f"{r.top1_error:.2f}",
             f"{r.top5_error:.2f}", r.run_id + (" (skipped: done)" if r.skipped else "")] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
