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
from pipeline.metricsink import flush_stage
from pipeline.stages import Plan, Stage


@dataclass(frozen=True)
class StageResult:
    stage: str
    arch: str
    train_scale: str
    eval_scale: int
    epochs: int
    top1_error: float  # nan where the stage did not finish
    top5_error: float
    run_id: str  # "" for a stage that was not started
    skipped: bool
    status: str = "finished"  # finished, failed (stalled / diverged), not started
    reason: str = ""


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


def registered_model_name(plan: Plan, stage: Stage) -> str:
    """One registered model per experiment and arch, e.g. vgg-paper-D; versions carry the stage."""
    from pipeline.archs import get_arch

    return f"{plan.experiment}-{get_arch(stage.arch).name}"


def _stage_tags(plan: Plan, stage: Stage) -> dict:
    return {"arch": stage.arch, "stage": stage.name, "train_scale": stage.scale_label,
            "init_from": stage.init_from.stage if stage.init_from else "random",
            "stage_config": json.dumps(to_dict(stage), sort_keys=True),
            "plan": plan.name, "recipe": recipe_summary(plan, stage), "deviation": plan.deviation or "none"}


def recipe_summary(plan: Plan, stage: Stage) -> str:
    """Which recipe produced a stage's numbers, in one line (MLflow tag, report)."""
    r, o = stage.recipe, stage.recipe.optim
    warm = f", warmup {o.warmup_epochs:g} epochs" if o.warmup_epochs else ", no warmup"
    return f"{plan.recipe_label}; global batch {r.batch_size}, lr {o.lr:g} at batch {o.reference_batch}{warm}"


def _advice(stage: Stage, failure: dict, global_batch: int) -> str:
    from pipeline.engine import effective_lr

    if failure["kind"] == "refused":  # a checkpoint whose position this recipe cannot honour
        return ("resume with the recipe and data its position is measured in (the fields named above), or "
                "resume from an epoch-end checkpoint")
    o = stage.recipe.optim
    lr = (f"recipe.optim.lr, now {o.lr:g} at batch {o.reference_batch}"
          + (f" = {effective_lr(o, global_batch):.3g} at this run's global batch of {global_batch}" if o.scale_lr
             else ""))
    if failure["kind"] == "diverged":
        return (f"lower the lr ({lr}), add or lengthen a warmup (recipe.optim.warmup_epochs, now "
                f"{o.warmup_epochs:g}), or clip gradients (recipe.optim.grad_clip)")
    init = (f"init_from, now {stage.init_from.stage}" if stage.init_from else
            f"recipe.init, now {stage.recipe.init}, or init_from a trained stage")
    return (f"change the lr ({lr}; too low and the net never leaves chance, too high and it cannot settle), "
            f"add a warmup (recipe.optim.warmup_epochs, now {o.warmup_epochs:g}), or the init ({init})")


def _failure_message(plan: Plan, stage: Stage, failure: dict, run_name: str, last_good: str | None) -> str:
    if last_good:
        kept = f"The last good checkpoint is kept: {last_good}."
        retry = (f"To fine-tune from it instead, change the recipe and add --run-name {run_name}: finished stages "
                 f"are kept and {stage.name} starts from its last good weights.")
    else:
        kept = "It failed before its first checkpoint, so there are no good weights to keep."
        retry = (f"To keep this plan run's finished stages, change the recipe and add --run-name {run_name}: "
                 f"{stage.name} starts again as at first.")
    return (f"stage {stage.name} FAILED ({failure['kind']}) in epoch {failure['epoch']}: {failure['reason']}. "
            f"Nothing was registered. What to change: {_advice(stage, failure, stage.recipe.batch_size)}. {kept} "
            f"To start over, change the recipe (--set or the plan file) and run the same command: a changed plan is "
            f"a new plan run. {retry}")


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
    if srun.tags.get("stage_config") == _stage_tags(plan, stage)["stage_config"]:
        return (f"stage {stage.name} already FAILED ({srun.failure_kind}) in plan run {run_name} with this same "
                f"recipe (MLflow run {srun.run_id}); running it again would repeat that. Change the recipe: "
                f"{_advice(stage, {'kind': srun.failure_kind}, stage.recipe.batch_size)}.")
    last_good = srun.tags.get("last_good_checkpoint")
    last_good = None if last_good in (None, "none") else last_good
    attempt = int(srun.tags.get("attempt", "1")) + 1
    extra = {"retry_of": srun.run_id, "trial": f"{run_name}-{stage.name}-attempt{attempt}"}
    if last_good:
        extra |= {"init_checkpoint": last_good, "init_layers": "all",
                  "init_label": f"the last good checkpoint of failed run {srun.run_id}"}
    new = tracker.stage_run(parent_id, run_name, stage.name, params, _stage_tags(plan, stage) | extra,
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
                    results[name] = _missing(stage, "not started", unstarted[name])
                    pending.remove(name)
                    continue
                if (src is not None and src not in checkpoints) or len(running) >= cap:
                    continue
                pending.remove(name)
                try:  # MLflow calls: one stage's error must not stop the others
                    params = flatten(to_dict(stage)) | {"data.root": plan.data.root}
                    srun = tracker.stage_run(parent_id, run_name, name, params, _stage_tags(plan, stage))
                    if srun.finished:
                        checkpoints[name] = checkpoint_from_uri(srun.checkpoint)
                        say(f"[{name}] already finished in this plan run; skipped")
                        results[name] = _result(stage, tracker, srun.run_id, skipped=True)
                        continue
                    attempt = _attempt(tracker, plan, stage, srun, parent_id, run_name, params, checkpoints)
                    if isinstance(attempt, str):
                        failed[name] = attempt
                        say(f"[{name}] {attempt}")
                        results[name] = _missing(stage, f"failed ({srun.failure_kind})", attempt, srun.run_id)
                        continue
                    srun, trial, init_ckpt, init_layers, init_label = attempt
                    stored = _trained_earlier(plan, stage, srun, storage, trial, say)
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
                    results[name] = _missing(stage, "failed (start)", failed[name])
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
                    result = _finish(tracker, plan, stage, srun, future, run_name, checkpoints, failed, say)
                except Exception as exc:  # noqa: BLE001 - one stage's booking must not stop the plan
                    result = _booking_failed(tracker, stage, srun, future, exc, failed, say)
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


def _finish(tracker, plan: Plan, stage: Stage, srun, future, run_name: str, checkpoints: dict, failed: dict,
            say) -> StageResult:
    """Book a stage's Ray Train run: FAILED with the reason (a training failure, or a
    crash that a rerun resumes), or FINISHED with its model registered."""
    from pipeline.evaluate import load_stage_model, stage_bundle
    from pipeline.worker import checkpoint_uri

    try:
        outcome = future.result()
    except Exception as exc:  # noqa: BLE001 - a crashed stage must not take its independent siblings down
        flush_stage(getattr(exc, "tracking", None), stage.name, say)
        message = (f"stage {stage.name} crashed: {type(exc).__name__}: {exc}. Rerunning the same command resumes it "
                   "from its last checkpoint.")
        tracker.fail(srun.run_id, f"{type(exc).__name__}: {exc}")
        failed[stage.name] = message
        say(message)
        return _missing(stage, "failed (crashed)", message, srun.run_id)
    flushed = flush_stage(outcome.tracking, stage.name, say)  # its figures in MLflow before it is booked
    if outcome.failure is not None and outcome.failure["kind"] == "corrupt":
        return _corrupt_sample(tracker, stage, srun, outcome, run_name, failed, say)
    if outcome.failure is not None:
        last_good = checkpoint_uri(outcome.checkpoint) if outcome.checkpoint is not None else None
        message = _failure_message(plan, stage, outcome.failure, run_name, last_good)
        tracker.fail(srun.run_id, message, {"stage_status": "failed", "failure_kind": outcome.failure["kind"],
                                            "failure_epoch": outcome.failure["epoch"],
                                            "last_good_checkpoint": last_good or "none"})
        failed[stage.name] = message
        say(message)
        return _missing(stage, f"failed ({outcome.failure['kind']})", message, srun.run_id)
    if flushed and srun.tags.get("figures_complete") != "true":  # a rerun can book it from storage alone
        tracker.client.set_tag(srun.run_id, "figures_complete", "true")
    checkpoints[stage.name] = outcome.checkpoint
    model = load_stage_model(stage, outcome.checkpoint)
    final = {"top1_error": outcome.metrics["val_top1_error"], "top5_error": outcome.metrics["val_top5_error"],
             f"single_Q{stage.eval_scale}/top1_error": outcome.metrics["val_top1_error"],
             f"single_Q{stage.eval_scale}/top5_error": outcome.metrics["val_top5_error"],
             "epochs_trained": outcome.metrics["epoch"] + 1}
    tracker.finish_stage(srun.run_id, final, checkpoint_uri(outcome.checkpoint), model=model,
                         registered_name=registered_model_name(plan, stage),
                         bundle=stage_bundle(stage, outcome.checkpoint, plan.data.root))
    say(f"[{stage.name}] finished: top-1 error {final['top1_error']:.2f}%")
    return _result(stage, tracker, srun.run_id, skipped=False)


def _trained_earlier(plan: Plan, stage: Stage, srun, storage: str, trial: str, say):
    """A stage whose training ended, with every figure in MLflow, under this same recipe,
    but which was never booked (its booking failed, or the driver died during it): its
    Ray Train run's result read from storage, as a completed future for _finish, so that
    booking it waits for no cluster capacity. None where Ray Train must run (resume it)."""
    from concurrent.futures import Future

    from pipeline.worker import stored_outcome

    if srun.tags.get("figures_complete") != "true" or (
            srun.tags.get("stage_config") != _stage_tags(plan, stage)["stage_config"]):
        return None
    try:
        outcome = stored_outcome(storage, trial)
    except Exception as exc:  # noqa: BLE001 - Ray Train's resume books it as well, only slower
        say(f"[{stage.name}] its stored result could not be read ({type(exc).__name__}: {str(exc)[:300]}); "
            "resuming it with Ray Train")
        return None
    say(f"[{stage.name}] its training ended in an earlier run: booking it from its last checkpoint")
    done = Future()
    done.set_result(outcome)
    return done


def _corrupt_sample(tracker, stage: Stage, srun, outcome, run_name: str, failed: dict, say) -> StageResult:
    """A sample no rank could decode stopped every rank: FAILED naming it, but not as a
    training failure (no failure_kind): the recipe is fine, so a rerun of this plan run
    resumes the stage from its last checkpoint once the shard is fixed or skipping is on."""
    from pipeline.worker import checkpoint_uri

    last = checkpoint_uri(outcome.checkpoint) if outcome.checkpoint is not None else "none (it starts again)"
    message = (f"stage {stage.name} FAILED (corrupt sample) in epoch {outcome.failure['epoch']}: "
               f"{outcome.failure['reason']}. Nothing was registered. Re-shard the shard named (or add --set "
               f"data.on_corrupt_sample=skip) and rerun with --run-name {run_name}: {stage.name} resumes from its "
               f"last checkpoint, {last}.")
    tracker.fail(srun.run_id, message, {"data_failure": outcome.failure["reason"],
                                        "failure_epoch": outcome.failure["epoch"]})
    failed[stage.name] = message
    say(message)
    return _missing(stage, "failed (corrupt sample)", message, srun.run_id)


def _booking_failed(tracker, stage: Stage, srun, future, exc: Exception, failed: dict, say) -> StageResult:
    """A stage whose Ray Train run ended but whose booking raised (an MLflow call, SQLite's
    "database is locked", a storage read): FAILED with the reason, so its dependants are
    not started and the plan goes on with the rest. Its checkpoints are kept: rerunning
    the same command books it from them."""
    trained = future.exception() is None and future.result().failure is None
    message = (f"stage {stage.name} could not be booked: {type(exc).__name__}: {str(exc)[:500]}. "
               + ("Its training ended and its checkpoints are kept: rerunning the same command books it."
                  if trained else f"(It had failed: {failed.get(stage.name) or future.exception()}.) Rerunning the "
                  "same command takes it up from its last checkpoint."))
    failed[stage.name] = message
    say(message)
    try:
        tracker.fail(srun.run_id, message)
    except Exception as again:  # noqa: BLE001 - the store that failed the booking may fail this too
        say(f"[{stage.name}] could not mark MLflow run {srun.run_id} FAILED either: {type(again).__name__}: "
            f"{str(again)[:200]}")
    return _missing(stage, "failed (booking)", message, srun.run_id)


def _missing(stage: Stage, status: str, reason: str, run_id: str = "") -> StageResult:
    nan = float("nan")
    return StageResult(stage.name, stage.arch, stage.scale_label, stage.eval_scale, 0, nan, nan, run_id, False,
                       status, reason)


def _result(stage: Stage, tracker, run_id: str, skipped: bool) -> StageResult:
    run = tracker.client.get_run(run_id)
    m = run.data.metrics
    return StageResult(stage.name, stage.arch, stage.scale_label, stage.eval_scale, int(m.get("epochs_trained", 0)),
                       m["top1_error"], m["top5_error"], run_id, skipped)


def results_table(results: list[StageResult]) -> str:
    head = ["stage", "arch", "train S", "test Q", "epochs", "top-1 err %", "top-5 err %", "status", "MLflow run"]
    rows = [[r.stage, r.arch, r.train_scale, str(r.eval_scale), str(r.epochs) if r.status == "finished" else "-",
             f"{r.top1_error:.2f}" if r.status == "finished" else "-",
             f"{r.top5_error:.2f}" if r.status == "finished" else "-",
             r.status.upper() if r.status != "finished" else ("done earlier" if r.skipped else "finished"),
             r.run_id or "-"] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
