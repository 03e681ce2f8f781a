"""Booking a stage's Ray Train run in MLflow: FINISHED with its model registered, or
FAILED with the reason and what to change; the MLflow tags that identify a stage's
recipe; the results table. The runner (pipeline/runner.py) decides what runs when;
this module records how each stage ended."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pipeline.config import to_dict
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


def registered_model_name(plan: Plan, stage: Stage) -> str:
    """One registered model per experiment and arch, e.g. vgg-paper-D; versions carry the stage."""
    from pipeline.archs import get_arch

    return f"{plan.experiment}-{get_arch(stage.arch).name}"


def stage_tags(plan: Plan, stage: Stage) -> dict:
    return {"arch": stage.arch, "stage": stage.name, "train_scale": stage.scale_label,
            "init_from": stage.init_from.stage if stage.init_from else "random",
            "stage_config": json.dumps(to_dict(stage), sort_keys=True),
            "plan": plan.name, "recipe": recipe_summary(plan, stage), "deviation": plan.deviation or "none"}


def recipe_summary(plan: Plan, stage: Stage) -> str:
    """Which recipe produced a stage's numbers, in one line (MLflow tag, report)."""
    r, o = stage.recipe, stage.recipe.optim
    warm = f", warmup {o.warmup_epochs:g} epochs" if o.warmup_epochs else ", no warmup"
    return f"{plan.recipe_label}; global batch {r.batch_size}, lr {o.lr:g} at batch {o.reference_batch}{warm}"


def advice(stage: Stage, failure: dict, global_batch: int) -> str:
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


def failure_message(plan: Plan, stage: Stage, failure: dict, run_name: str, last_good: str | None) -> str:
    if last_good:
        kept = f"The last good checkpoint is kept: {last_good}."
        retry = (f"To fine-tune from it instead, change the recipe and add --run-name {run_name}: finished stages "
                 f"are kept and {stage.name} starts from its last good weights.")
    else:
        kept = "It failed before its first checkpoint, so there are no good weights to keep."
        retry = (f"To keep this plan run's finished stages, change the recipe and add --run-name {run_name}: "
                 f"{stage.name} starts again as at first.")
    return (f"stage {stage.name} FAILED ({failure['kind']}) in epoch {failure['epoch']}: {failure['reason']}. "
            f"Nothing was registered. What to change: {advice(stage, failure, stage.recipe.batch_size)}. {kept} "
            f"To start over, change the recipe (--set or the plan file) and run the same command: a changed plan is "
            f"a new plan run. {retry}")


def book(tracker, plan: Plan, stage: Stage, srun, future, run_name: str, checkpoints: dict, failed: dict,
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
        return missing(stage, "failed (crashed)", message, srun.run_id)
    flushed = flush_stage(outcome.tracking, stage.name, say)  # its figures in MLflow before it is booked
    if outcome.failure is not None and outcome.failure["kind"] == "corrupt":
        return _corrupt_sample(tracker, stage, srun, outcome, run_name, failed, say)
    if outcome.failure is not None:
        last_good = checkpoint_uri(outcome.checkpoint) if outcome.checkpoint is not None else None
        message = failure_message(plan, stage, outcome.failure, run_name, last_good)
        tracker.fail(srun.run_id, message, {"stage_status": "failed", "failure_kind": outcome.failure["kind"],
                                            "failure_epoch": outcome.failure["epoch"],
                                            "last_good_checkpoint": last_good or "none"})
        failed[stage.name] = message
        say(message)
        return missing(stage, f"failed ({outcome.failure['kind']})", message, srun.run_id)
    if flushed:  # a rerun can book this checkpoint from storage alone (trained_earlier)
        tracker.client.set_tag(srun.run_id, "training_ended_at", checkpoint_uri(outcome.checkpoint))
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
    return result_of(stage, tracker, srun.run_id, skipped=False)


def trained_earlier(tracker, plan: Plan, stage: Stage, srun, storage: str, trial: str, say):
    """A stage whose training ended, with every figure in MLflow, but which was never
    booked (its booking failed, or the driver died during it): its Ray Train run's result
    read from storage, as a completed future for book(), so that booking it waits for no
    cluster capacity. Only where nothing has moved since: the same recipe, the same shard
    set (the run's MLflow dataset input), the same latest checkpoint as when its training
    ended, and that checkpoint's last epoch in MLflow. None where Ray Train must run
    (resume it, as for any stage that did not finish)."""
    ended_at = srun.tags.get("training_ended_at")
    if not ended_at or srun.tags.get("stage_config") != stage_tags(plan, stage)["stage_config"]:
        return None
    from concurrent.futures import Future

    from data_prep.store import data_hash
    from pipeline.tracking import last_logged_step
    from pipeline.worker import checkpoint_uri, stored_outcome

    try:
        digests = {d.dataset.digest for d in tracker.client.get_run(srun.run_id).inputs.dataset_inputs}
        outcome = stored_outcome(storage, trial)
        logged = last_logged_step(tracker.client, srun.run_id, "val_top1_error")
        why = ("the shard set changed" if data_hash(plan.data.root)[:32] not in digests else
               "it has a later checkpoint" if checkpoint_uri(outcome.checkpoint) != ended_at else
               "MLflow lacks its last epoch" if logged is None or logged < outcome.metrics["epoch"] else None)
    except Exception as exc:  # noqa: BLE001 - Ray Train's resume books it as well, only slower
        why = f"its stored result could not be checked ({type(exc).__name__}: {str(exc)[:300]})"
    if why:
        say(f"[{stage.name}] training had ended but {why}: resuming it with Ray Train")
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
    return missing(stage, "failed (corrupt sample)", message, srun.run_id)


def booking_failed(tracker, stage: Stage, srun, future, exc: Exception, failed: dict, say) -> StageResult:
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
    return missing(stage, "failed (booking)", message, srun.run_id)


def missing(stage: Stage, status: str, reason: str, run_id: str = "") -> StageResult:
    nan = float("nan")
    return StageResult(stage.name, stage.arch, stage.scale_label, stage.eval_scale, 0, nan, nan, run_id, False,
                       status, reason)


def result_of(stage: Stage, tracker, run_id: str, skipped: bool) -> StageResult:
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
