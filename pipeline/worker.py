"""Ray Train glue: one stage = one TorchTrainer run of `train_loop_per_worker`.

The only module that imports Ray Train. Each worker builds its net, reads its
DALI shard (shard_id = world rank), runs the engine's loops under DDP (gloo on
CPU, NCCL on GPU, set up by Ray), and reports metrics every epoch; rank 0 attaches
the checkpoint. A restarted worker group resumes from `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch

CHECKPOINT_FILE = "state.pt"


class MlflowEpochMetrics(ray.train.UserCallback):
    """Logs rank 0's reports to the stage's MLflow run: per-epoch metrics with the epoch
    as step, and the per-interval records each report carries (`step/train_loss`,
    `step/lr`, `step/images_per_sec`, `step/data_wait_fraction`) with the global step as
    step, so the UI's charts show the curve inside epochs and across a resumed stage.

    Runs in the Ray Train controller, which Ray pins to the driver's node: on a
    cluster that is the head, where MLflow listens on 127.0.0.1, so workers never
    need a route to the tracking server. Sends that fail are buffered and retried.
    A record is only reported with the checkpoint after it, so a resumed worker
    redoes exactly the records that were lost with it; records at or below the last
    step already in the run are dropped, so a resumed driver adds no duplicates."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._logger = None
        self._last_step = self._last_epoch = None

    def after_report(self, run_context, metrics, checkpoint):
        from pipeline.tracking import MetricsLogger

        if self._logger is None:
            self._logger = MetricsLogger(self.tracking_uri, self.run_id, enabled=True)
            self._last_step = self._logger.last_step(STEP_METRIC)
            self._last_epoch = self._logger.last_step(EPOCH_METRIC)
        rank0 = dict(metrics[0])
        replay = rank0.pop("replay", None)
        if replay:  # what came with the checkpoint this run resumed from: a driver killed
            self._log(dict(replay))  # right after it was written may never have logged it
        if "data_hash" in rank0:  # the shard set, as the run's MLflow dataset input
            self._logger.log_dataset(rank0.pop("data_name"), rank0.pop("data_hash"), rank0.pop("data_root"))
        self._log(rank0)

    def _log(self, rank0: dict) -> None:
        """A report's step records and epoch figures, each once (steps and epochs already
        in the run are skipped)."""
        for record in rank0.pop("step_log", None) or []:
            record = dict(record)
            step = int(record.pop("step"))
            if self._last_step is not None and step <= self._last_step:
                continue
            self._logger.log({f"step/{k}": v for k, v in record.items()}, step=step)
            self._last_step = step
        if EPOCH_METRIC not in rank0:
            return  # a mid-epoch checkpoint or a failure inside an epoch: no epoch figures
        epoch = int(rank0.pop("epoch"))
        rank0.pop("step", None)
        if self._last_epoch is not None and epoch <= self._last_epoch:
            return
        self._logger.log({k: v for k, v in rank0.items() if isinstance(v, (int, float))}, step=epoch)
        self._last_epoch = epoch


STEP_METRIC, EPOCH_METRIC = "step/train_loss", "val_top1_error"


def say(message: str) -> None:
    """One line to the worker's stdout, which Ray streams to the driver and to `ray job
    logs`. (Ray Train patches print() to write twice: to stdout and to its logger.)"""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _quiet_ray_train_info() -> None:
    """Ray Train logs two INFO lines per report per worker; progress lines are ours.
    Its loggers are named by file path, so match those too."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.train") or "ray/train" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def _load_state(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


def train_loop_per_worker(config: dict) -> dict | None:
    """Train one stage on this worker. Returns (on rank 0) None when the stage finished,
    or {"kind": "stalled" | "diverged", "epoch": n, "reason": ...} when it must FAIL:
    a training failure is not a crash, so it is not retried from a checkpoint."""
    import ray.train.torch

    from pipeline import rng
    from pipeline.data import DatasetInfo, eval_loader, train_loader, train_steps
    from pipeline.engine import (LrSchedule, NonFiniteLoss, effective_lr, evaluate, make_optimizer, stall_reason,
                                 train_one_epoch)
    from pipeline.models import build_model, init_from, load_state, plain_names

    _quiet_ray_train_info()
    stage, data = config["stage"], config["data"]
    recipe = stage.recipe
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    gpu = device.type == "cuda"
    torch.set_num_threads(max(1, int(stage.resources.cpus_per_worker)))
    torch.manual_seed(recipe.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    if gpu:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv algorithms once

    info = DatasetInfo.load(data.root)
    model = build_model(stage.arch, num_classes=info.num_classes, width_mult=recipe.width_mult,
                        batch_norm=recipe.batch_norm, input_size=recipe.crop, dropout=recipe.dropout,
                        init=recipe.init, init_std=recipe.init_std)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = _load_state(checkpoint)
        model.load_state_dict(load_state(state))
    elif config.get("init_checkpoint") is not None:
        source = load_state(_load_state(config["init_checkpoint"]))
        layers = config.get("init_layers") or stage.init_from.layers
        if layers == "all":
            model.load_state_dict(source)
        else:
            init_from(model, source, layers)
    # Every GPU setting is reachable on the CPU too (bf16, channels_last, compile, fused
    # SGD), so CI rehearses the GPU's branches: channels_last None means "on GPU only".
    channels_last = gpu if recipe.channels_last is None else recipe.channels_last
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # Gradients as views of DDP's buckets: no copy into the buckets, less memory.
    net = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"gradient_as_bucket_view": True})
    if recipe.compile:
        net = torch.compile(net, backend="inductor" if recipe.compile is True else recipe.compile)
    rng.seed_rank_streams(recipe.seed, rank)  # same init above; from here each rank its own dropout masks

    per_worker = max(1, recipe.batch_size // world)
    optimizer = make_optimizer(net, recipe.optim, per_worker * world)
    steps = train_steps(info, data.train_split, per_worker, world)
    schedule = LrSchedule(optimizer, recipe.optim, steps, effective_lr(recipe.optim, per_worker * world))
    start_epoch, start_step = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        how_rng = rng.restore(state["rng"], rank=rank, world=world, seed=recipe.seed, epoch=state["epoch"],
                              step=state.get("step", steps), device=device)
        if rank == 0 and how_rng != "restored":
            say(f"[{stage.name}] random streams: {how_rng}")
        # Checkpoints before mid-epoch ones existed carry no step: they are epoch ends.
        done = state.get("step", steps)
        start_epoch, start_step = (state["epoch"], done) if done < steps else (state["epoch"] + 1, 0)

    epochs = recipe.epochs_for(info.counts[data.train_split])
    lo, hi = stage.scale_range
    normalize_std = recipe.normalize_std
    val_ld = eval_loader(info, data.val_split, rank=rank, world_size=world, batch_size=per_worker,
                         scale=stage.eval_scale, crop=recipe.crop, normalize_std=normalize_std, device=device,
                         threads=data.reader_threads, channels_last=channels_last)
    tag = f"[{stage.name}]"
    if rank == 0:
        how = (f"resumed at epoch {start_epoch + 1} step {start_step}" if state is not None else
               f"initialised from {config['init_from_label']}" if config.get("init_from_label") else
               f"initialised from {stage.init_from.stage}" if stage.init_from else f"{recipe.init} init")
        warm = f", {recipe.optim.warmup_epochs:g} warmup epochs" if recipe.optim.warmup_epochs else ""
        say(f"{tag} {stage.arch} S={stage.scale_label} on {world} worker(s), {device}; {how}; "
            f"{epochs} epochs x {steps} steps of {per_worker * world}, lr {schedule.base_lr:.3g}{warm}")
    pending_steps: list[dict] = []  # per-interval records not yet reported
    replay = {"replay": state["reported"]} if state is not None and state.get("reported") else {}
    if state is not None and start_step == 0 and (start_epoch >= epochs or schedule.finished):
        # The checkpoint is the stage's last epoch (the driver died before booking it): book
        # it as it is. Its report goes to MLflow again (steps and epochs there are skipped);
        # Ray Train's result is that checkpoint with its metrics.
        if rank == 0:
            say(f"{tag} its last epoch ({state['epoch'] + 1}) is in the checkpoint: booked, not trained again")
        ray.train.report(replay if rank == 0 else {})
        return None
    # What a registered model needs to classify an image on its own (pipeline/serving.py),
    # kept in every checkpoint: the driver that registers it may not see the shards.
    classes_file = Path(str(data.root)) / "classes.json"
    serving_facts = {"mean_rgb": list(info.mean_rgb), "std_rgb": list(info.std_rgb) if normalize_std else None,
                     "classes": json.loads(classes_file.read_text()) if classes_file.is_file() else []}
    # The shard set's content hash (the retrain gate's) rides with the first report, for
    # the driver side to log as the run's dataset input: the driver may not see the shards.
    from data_prep.store import data_hash

    dataset = {}
    if rank == 0:
        try:
            dataset = {"data_hash": data_hash(data.root), "data_root": str(data.root),
                       "data_name": f"shards:{Path(str(data.root).rstrip('/')).name}"}
        except FileNotFoundError:  # shards without a manifest: nothing to name them by
            pass

    def report(metrics: dict, epoch: int, step: int, checkpoint: bool = True) -> None:
        """Every rank reports (Ray Train needs it); rank 0 attaches the checkpoint and the
        step records since its last report."""
        streams = rng.gather_states(device) if checkpoint else None  # a collective: before rank 0 goes alone
        with tempfile.TemporaryDirectory() as tmp:
            if rank != 0:
                ray.train.report(metrics)
                return
            metrics = dict(metrics, step_log=list(pending_steps), **dataset, **replay)
            pending_steps.clear()
            dataset.clear()
            replay.clear()
            if not checkpoint:
                ray.train.report(metrics)
                return
            # What this report carries to MLflow goes into the checkpoint too: a resumed run
            # sends it again, in case the driver died before logging it.
            reported = {k: v for k, v in metrics.items()
                        if k not in ("replay", "data_hash", "data_root", "data_name")}
            torch.save({"model": plain_names(net.state_dict()),
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "epoch": epoch, "step": step, "rng": streams, "arch": stage.arch,
                        "num_classes": info.num_classes, "reported": reported, **serving_facts},
                       Path(tmp) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def failed(kind: str, epoch: int, reason: str) -> dict:
        if rank == 0:
            say(f"{tag} FAILED ({kind}) in epoch {epoch + 1}: {reason}")
        return {"kind": kind, "epoch": epoch + 1, "reason": reason}

    for epoch in range(start_epoch, epochs):
        t0 = time.monotonic()
        # One loader per epoch: its order depends on (seed, epoch) only, so a mid-epoch
        # checkpoint's loader position is the step count, replayed by fast-forwarding.
        train_ld = train_loader(info, data.train_split, rank=rank, world_size=world, batch_size=per_worker,
                                scale_range=(lo, hi), crop=recipe.crop, color_shift=recipe.color_shift,
                                normalize_std=normalize_std, device=device, seed=recipe.seed, epoch=epoch,
                                threads=data.reader_threads, shuffle_buffer=data.shuffle_buffer,
                                decode=data.gpu_decode if gpu else "roi", channels_last=channels_last)
        skip = start_step if epoch == start_epoch else 0
        train_ld.skip(skip)

        def progress(record, epoch=epoch):
            if rank != 0:
                return
            pending_steps.append(dict(record, step=epoch * steps + record["step"]))
            if not config.get("step_lines", True):
                return
            rate = record["images_per_sec"]
            steps_left = steps - record["step"] + (epochs - epoch - 1) * steps
            eta = steps_left * per_worker * world / max(rate, 1e-9)
            say(f"{tag} epoch {epoch + 1}/{epochs} step {record['step']}/{steps} loss {record['train_loss']:.4f} "
                f"lr {record.get('lr', schedule.lr):.3g} {rate:.0f} img/s ETA {eta / 60:.1f} min")

        def step_checkpoint(step, epoch=epoch):
            if step < steps:
                report({"epoch": epoch, "step": step}, epoch, step)

        try:
            stats = train_one_epoch(net, train_ld, optimizer, device, precision=recipe.precision,
                                    channels_last=channels_last, grad_clip=recipe.optim.grad_clip,
                                    log_every=recipe.log_every_steps, on_log=progress,
                                    checkpoint_every=recipe.checkpoint_every_steps, on_checkpoint=step_checkpoint,
                                    lr_at=lambda s, epoch=epoch: schedule.lr_at(epoch * steps + s),
                                    start_step=skip, where=f"{tag} epoch {epoch + 1}: ")
        except NonFiniteLoss as exc:
            # Every rank raises at the same sync point (the check is a collective). The
            # bad weights are never checkpointed; the records up to the explosion are.
            report({"epoch": epoch}, epoch, 0, checkpoint=False)
            return failed("diverged", epoch, str(exc))
        del train_ld  # frees the epoch's DALI pipeline before the next one is built
        lr = schedule.lr
        val = evaluate(net, val_ld, device, precision=recipe.precision)
        decision = schedule.step(val["top1_error"])
        metrics = {"epoch": epoch, "step": steps, "train_loss": stats.loss, "val_top1_error": val["top1_error"],
                   "val_top5_error": val["top5_error"], "val_loss": val["loss"], "val_images": val["images"],
                   "lr": lr, "images_per_sec": stats.images_per_sec, "data_wait_fraction": stats.data_wait_fraction,
                   "resumed_from_epoch": -1 if state is None else state["epoch"],  # the checkpoint's epoch
                   "resumed_at_step": skip}
        if rank == 0:
            say(f"{tag} epoch {epoch + 1}/{epochs}: loss {stats.loss:.4f} val top-1 {val['top1_error']:.2f}% "
                f"top-5 {val['top5_error']:.2f}% lr {lr:.3g} {stats.images_per_sec:.0f} img/s "
                f"data wait {100 * stats.data_wait_fraction:.0f}% ({time.monotonic() - t0:.0f}s)"
                + {"drop": f"; plateau: lr -> {schedule.lr:.3g}", "finish": "; plateau after the last drop: done"}
                .get(decision, ""))
        stalled = stall_reason(val["top1_error"], info.num_classes, epoch + 1, recipe)
        if stalled:
            report(metrics, epoch, steps, checkpoint=False)  # the epoch's figures, not its weights
            return failed("stalled", epoch, stalled)
        report(metrics, epoch, steps)
        if epoch == epochs - 1 or schedule.finished:
            break
    return None


@dataclass(frozen=True)
class StageOutcome:
    checkpoint: object  # ray.train.Checkpoint of the last epoch (after a failure: the last good one, or None)
    metrics: dict  # those reported with that checkpoint
    failure: dict | None = None  # {"kind", "epoch", "reason"} when training failed (stalled, diverged)


def fit_stage(stage, data, *, trial_name: str, storage: str, tracking_uri: str | None, mlflow_run_id: str | None,
              init_checkpoint=None, init_layers=None, init_from_label: str | None = None,
              step_lines: bool = True, controls: "StageControls | None" = None) -> StageOutcome:
    """Train one stage with Ray Train. Reusing `trial_name` under the same `storage`
    resumes that stage from its last checkpoint. `init_layers` overrides the stage's
    `init_from.layers` (a retry fine-tunes "all" of a failed attempt's last good weights).
    `step_lines=False` keeps the console to one line per epoch (stages running side by
    side); the step figures still go to MLflow."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = stage.resources
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": 1} if res.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dict(stage=stage, data=data, init_checkpoint=init_checkpoint, init_layers=init_layers,
                               init_from_label=init_from_label, step_lines=step_lines),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=trial_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=res.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=[MlflowEpochMetrics(tracking_uri, mlflow_run_id)]
                             + ([controls.callback(stage.name)] if controls else [])),
    )
    result = trainer.fit()
    failure = result.return_value if isinstance(result.return_value, dict) else None
    if failure is None and result.checkpoint is None:
        raise RuntimeError(f"stage {stage.name}: Ray Train finished without a checkpoint")
    return StageOutcome(result.checkpoint, dict(result.metrics or {}), failure)


def checkpoint_uri(checkpoint) -> str:
    """A string that `checkpoint_from_uri` turns back into the checkpoint."""
    fs = getattr(checkpoint, "filesystem", None)
    scheme = getattr(fs, "type_name", "local") if fs is not None else "local"
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def checkpoint_from_uri(uri: str):
    return ray.train.Checkpoint(uri)


def load_checkpoint_model(checkpoint) -> dict:
    """The model state dict of a stage checkpoint (for MLflow and evaluation)."""
    return _load_state(checkpoint)


class _Board:
    """A Ray actor in the driver's job: each running stage's Ray Train controller and its
    state, as the controllers report them (StageControls' callback)."""

    def __init__(self):
        self.controllers, self.states = {}, {}

    def started(self, stage: str, controller) -> None:
        self.controllers[stage] = controller

    def state(self, stage: str, state: str) -> None:
        self.states[stage] = (state, time.time())

    def read(self) -> tuple[dict, dict]:
        return dict(self.controllers), dict(self.states)


class StageControls:
    """The driver's hold on the stages it runs in threads. Ray Train installs its Ctrl-C
    abort only when fit() runs on the main thread; here every controller announces itself
    (and each state it enters: scheduling means waiting for resources) to a board, so
    `abort` can stop every running stage the way Ray's own handler would."""

    def __init__(self):
        self._board = ray.remote(num_cpus=0)(_Board).remote()

    def callback(self, stage: str):
        from ray.train.v2._internal.execution.callback import ControllerCallback

        board = self._board

        class Announce(ControllerCallback):
            def after_controller_start(self, train_run_context):
                board.started.remote(stage, ray.get_runtime_context().current_actor)

            def after_controller_state_update(self, previous_state, current_state):
                board.state.remote(stage, current_state._state_type.name)

        return Announce()

    def states(self) -> dict[str, tuple[str, float]]:
        """stage -> (controller state, since when, epoch seconds)."""
        return ray.get(self._board.read.remote(), timeout=10)[1]

    def abort(self, stages, timeout: float = 20.0) -> list[str]:
        """Abort these stages' Ray Train runs (worker groups killed, controllers ended);
        the stages that had no controller to abort yet are returned."""
        controllers = ray.get(self._board.read.remote(), timeout=10)[0]
        refs = [controllers[s].abort.remote() for s in stages if s in controllers]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        return [s for s in stages if s not in controllers]

