"""Run a plan: stages in dependency order, each a Ray Train run, all tracked in MLflow.

A plan run has a name (by default the plan's name and a hash of its content), so
running the same command again after the driver died continues it: finished
stages are skipped (their checkpoints feed later stages) and the interrupted
stage resumes from its last Ray Train checkpoint, in the same MLflow runs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pipeline.booking import (StageResult, advice, book, booking_failed, missing, result_of, stage_tags,
                              trained_earlier)
from pipeline.config import flatten, to_dict
from pipeline.metricsink import flush_stage
from pipeline.stages import Plan, Stage


class PlanFailed(RuntimeError):
    """Some stage failed (stalled or diverged) and its dependants were not started. Raised
    after everything that could still run has run; `results` has every stage's row."""

    def __init__(self, message: str, results: list[StageResult]):
        super().__init__(message)
        self.results = results


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

    from pipeline import rayconsole

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        rayconsole.connect(address)
        return
    # A local single-node cluster sized for the largest stage.
    cpus = max(int(s.resources.max_workers * s.resources.cpus_per_worker + 0.999) for s in plan.stages.values())
    rayconsole.start_local(max(cpus, os.cpu_count() or 1), dashboard_host="127.0.0.1")


def _attempt(tracker, plan: Plan, stage: Stage, srun, parent_id: str, run_name: str, params: dict, checkpoints: dict):
    """(stage run, trial name, init checkpoint, init layers, init label) for this stage's
    next attempt, or a message when the last attempt failed with this same recipe."""
    from pipeline.worker import checkpoint_from_uri

    init_ckpt = checkpoints[stage.init_from.stage] if stage.init_from else None
    if srun.failure_kind is None:  # first attempt, or resuming one that crashed
        trial = srun.tags.get("trial") or f"{run_name}-{stage.name}"
        if srun.tags.get("init_checkpoint"):
            return (srun, trial, checkpoint_from_uri(srun.tags["init_checkpoint"]), srun.tags.get("init_layers"),
                    srun.tags.get("init_label"))
        return srun, trial, init_ckpt, None, None
    if srun.tags.get("stage_config") == stage_tags(plan, stage)["stage_config"]:
        return (f"stage {stage.name} already FAILED ({srun.failure_kind}) in plan run {run_name} with this same "
                f"recipe (MLflow run {srun.run_id}); running it again would repeat that. Change the recipe: "
                f"{advice(stage, {'kind': srun.failure_kind}, stage.recipe.batch_size)}.")
    last_good = srun.tags.get("last_good_checkpoint")
    last_good = None if last_good in (None, "none") else last_good
    attempt = int(srun.tags.get("attempt", "1")) + 1
    extra = {"retry_of": srun.run_id, "trial": f"{run_name}-{stage.name}-attempt{attempt}"}
    if last_good:
        extra |= {"init_checkpoint": last_good, "init_layers": "all",
                  "init_label": f"the last good checkpoint of failed run {srun.run_id}"}
    new = tracker.stage_run(parent_id, run_name, stage.name, params, stage_tags(plan, stage) | extra,
                            new_attempt=True)
    if last_good:
        return new, extra["trial"], checkpoint_from_uri(last_good), "all", extra["init_label"]
    return new, extra["trial"], init_ckpt, None, None


def run_plan(plan: Plan, *, run_name: str | None = None, tracking_uri: str, ray_address: str | None = None,
             out=None, max_concurrent: int | None = None, waiting_note_s: float = 180.0) -> list[StageResult]:
    """Train the plan as a parallel schedule: every stage whose init_from stage has
    finished starts at once (at most `max_concurrent` at a time), each its own Ray Train
    run in a driver thread; a stage that does not fit the cluster waits for Ray to place
    it. A stage that stalls, diverges or crashes is marked FAILED (nothing registered),
    the stages that depend on it are not started, independent stages carry on, and then
    PlanFailed is raised naming them all. Results come in plan order."""
    from pipeline.preflight import PreflightFailed, check

    # Before Ray, MLflow or torch is even imported: a missing shard set, storage that takes no
    # write or a tracking server that does not answer would otherwise surface as Ray tracebacks.
    problems = check(plan, tracking_uri, data_here=not (ray_address or os.environ.get("RAY_ADDRESS")))
    if problems:
        raise PreflightFailed(problems)
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from pipeline.control import abort, catch_signals, note_waiting, unplaceable
    from pipeline.schedule import critical_path_priority
    from pipeline.tracking import Tracker, finished_stages
    from pipeline.worker import StageControls, checkpoint_from_uri, fit_stage

    out = out or sys.stdout
    run_name = run_name or default_run_name(plan)
    storage = _storage(plan)
    # A plan run whose every stage has finished only reports: no Ray to start or reach.
    if not set(plan.stages) <= finished_stages(tracking_uri, plan.experiment, run_name):
        _ensure_ray(ray_address, plan)
        problems = unplaceable(plan)  # before any MLflow run: a stage the cluster can never hold
        if problems:
            raise PreflightFailed(problems)
    tracker = Tracker(tracking_uri, plan.experiment)
    parent_id, resumed = tracker.parent_run(
        run_name, params={"plan_file": plan.source, "data.root": plan.data.root, "storage": plan.storage},
        tags={"plan": plan.name, "fingerprint": plan.fingerprint(), "mlflow.runName": run_name,
              "recipe": plan.recipe_label, "deviation": plan.deviation or "none"},
    )
    print(f"plan {plan.name}: run {run_name} ({'resumed' if resumed else 'new'}), MLflow run {parent_id}"
          + (f"; recipe deviates from the paper: {plan.deviation}" if plan.deviation else ""), file=out, flush=True)
    say = lambda line: print(line, file=out, flush=True)  # noqa: E731
    checkpoints: dict[str, object] = {}
    results: dict[str, StageResult] = {}
    failed: dict[str, str] = {}  # stage -> message
    unstarted: dict[str, str] = {}  # stage -> why
    pending = [s.name for s in plan.order()]
    running: dict = {}  # future -> (stage, stage run)
    cap = max_concurrent or len(pending)
    # Several stages at once: one line per stage per epoch, not one per logging interval.
    # A plan that is one chain (each stage from the one before) never runs two at once.
    from pipeline.schedule import waves

    step_lines = cap == 1 or all(len(wave) == 1 for wave in waves(plan))
    controls = StageControls()
    priority = critical_path_priority(plan)
    noted = time.monotonic()
    interrupted: list[int] = []  # the signal that asked the plan to stop
    restore = catch_signals(interrupted)
    pool = ThreadPoolExecutor(max_workers=cap, thread_name_prefix="stage")
    try:
        while (pending or running) and not interrupted:
            for name in sorted(pending, key=lambda n: -priority[n]):  # the critical path first
                stage = plan.stages[name]
                src = stage.init_from.stage if stage.init_from else None
                if src in failed or src in unstarted:
                    unstarted[name] = f"{src} {'failed' if src in failed else 'was not started'}"
                    say(f"[{name}] not started: {unstarted[name]}")
                    results[name] = missing(stage, "not started", unstarted[name])
                    pending.remove(name)
                    continue
                if (src is not None and src not in checkpoints) or len(running) >= cap:
                    continue
                pending.remove(name)
                try:  # MLflow calls: one stage's error must not stop the others
                    params = flatten(to_dict(stage)) | {"data.root": plan.data.root}
                    srun = tracker.stage_run(parent_id, run_name, name, params, stage_tags(plan, stage))
                    if srun.finished:
                        checkpoints[name] = checkpoint_from_uri(srun.checkpoint)
                        say(f"[{name}] already finished in this plan run; skipped")
                        results[name] = result_of(stage, tracker, srun.run_id, skipped=True)
                        continue
                    attempt = _attempt(tracker, plan, stage, srun, parent_id, run_name, params, checkpoints)
                    if isinstance(attempt, str):
                        failed[name] = attempt
                        say(f"[{name}] {attempt}")
                        results[name] = missing(stage, f"failed ({srun.failure_kind})", attempt, srun.run_id)
                        continue
                    srun, trial, init_ckpt, init_layers, init_label = attempt
                    stored = trained_earlier(tracker, plan, stage, srun, storage, trial, say)
                    if stored is not None:  # only its booking is left: that takes no Ray Train run
                        running[stored] = (stage, srun)
                        continue
                    if srun.tags.get("trial") != trial:  # so a resumed driver finds this attempt's Ray Train run
                        tracker.client.set_tag(srun.run_id, "trial", trial)
                    _ensure_ray(ray_address, plan)  # at once if started above; else another driver trained meanwhile
                    say(f"[{name}] starting ({len(running) + 1} stage(s) now running)")
                    future = pool.submit(fit_stage, stage, plan.data, trial_name=trial, storage=storage,
                                         tracking_uri=tracking_uri, mlflow_run_id=srun.run_id,
                                         init_checkpoint=init_ckpt, init_layers=init_layers,
                                         init_from_label=init_label, step_lines=step_lines, controls=controls)
                    running[future] = (stage, srun)
                except Exception as exc:  # noqa: BLE001
                    failed[name] = (f"stage {name} could not be started: {type(exc).__name__}: {str(exc)[:500]}. "
                                    "Rerunning the same command tries again.")
                    say(failed[name])
                    results[name] = missing(stage, "failed (start)", failed[name])
            if not running:
                if pending:  # cannot happen: plan order puts every source before its dependants
                    raise RuntimeError(f"plan {plan.name}: stages {pending} can never start")
                continue  # everything left was decided without training (skipped, refused, not started)
            done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)  # a signal is seen within 1 s
            if time.monotonic() - noted >= waiting_note_s:
                noted = time.monotonic()
                note_waiting(plan, controls, [stage.name for stage, _ in running.values()], waiting_note_s, say)
            for future in done:
                stage, srun = running.pop(future)
                try:
                    result = book(tracker, plan, stage, srun, future, run_name, checkpoints, failed, say)
                except Exception as exc:  # noqa: BLE001 - one stage's booking must not stop the plan
                    result = booking_failed(tracker, stage, srun, future, exc, failed, say)
                results[stage.name] = result
        if interrupted:
            abort(interrupted[0], tracker, controls, parent_id, run_name, running, say)
    finally:
        restore()
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        try:
            for name, sink in list(controls.sinks.items()):  # at exit: what any stage left on its way to MLflow
                flush_stage(sink, name, say, timeout=10.0 if interrupted else None)
        finally:
            controls.close()
    order = [s.name for s in plan.order()]
    final = [results[n] for n in order]
    done_ = [r for r in final if r.status == "finished"]
    best = min(done_, key=lambda x: x.top1_error) if done_ else None
    metrics = {"best_top1_error": best.top1_error, "best_top5_error": best.top5_error} if best else {}
    tags = {"failed_stages": ", ".join(n for n in order if n in failed) or "none",
            "not_started_stages": "; ".join(f"{k} ({unstarted[k]})" for k in order if k in unstarted) or "none"}
    try:
        tracker.finish_parent(parent_id, metrics, status="FAILED" if failed else "FINISHED", tags=tags)
    except Exception as exc:  # noqa: BLE001 - the stages' outcome is reported all the same
        say(f"could not close the plan's MLflow run {parent_id}: {type(exc).__name__}: {str(exc)[:300]}")
    if failed:
        lines = [f"plan run {run_name} FAILED: stage(s) {tags['failed_stages']} failed"
                 + (f"; not started: {tags['not_started_stages']}" if unstarted else "")]
        lines += [failed[name] for name in order if name in failed]
        raise PlanFailed("\n".join(lines), final)
    return final
