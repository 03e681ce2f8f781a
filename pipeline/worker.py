"""Ray Train glue: one stage = one TorchTrainer run of `train_loop_per_worker`.

The only module that imports Ray Train. Each worker builds its net, reads its
DALI shard (shard_id = world rank), runs the engine's loops under DDP (gloo on
CPU, NCCL on GPU, set up by Ray), and reports metrics every epoch; rank 0 attaches
the checkpoint. A restarted worker group resumes from `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch

CHECKPOINT_FILE = "state.pt"


class MlflowEpochMetrics(ray.train.UserCallback):
    """Logs rank 0's per-epoch metrics to the stage's MLflow run.

    Runs in the Ray Train controller, which Ray pins to the driver's node: on a
    cluster that is the head, where MLflow listens on 127.0.0.1, so workers never
    need a route to the tracking server. Sends that fail are buffered and retried."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._logger = None

    def after_report(self, run_context, metrics, checkpoint):
        from pipeline.tracking import MetricsLogger

        if self._logger is None:
            self._logger = MetricsLogger(self.tracking_uri, self.run_id, enabled=True)
        rank0 = dict(metrics[0])
        if "val_top1_error" not in rank0:
            return  # a mid-epoch checkpoint: nothing to plot
        epoch = int(rank0.pop("epoch"))
        rank0.pop("step", None)
        self._logger.log(rank0, step=epoch)


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


def _epochs(recipe, train_images: int) -> int:
    """74 epochs or 370K iterations of batch 256, whichever comes first (Section 3.1)."""
    if recipe.max_iterations is None:
        return recipe.epochs
    return min(recipe.epochs, math.ceil(recipe.max_iterations * 256 / max(train_images, 1)))


def train_loop_per_worker(config: dict) -> None:
    import ray.train.torch

    from pipeline.data import DatasetInfo, eval_loader, train_loader, train_steps
    from pipeline.engine import PlateauSchedule, evaluate, make_optimizer, train_one_epoch
    from pipeline.models import build_model, init_from

    _quiet_ray_train_info()
    stage, data = config["stage"], config["data"]
    recipe = stage.recipe
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    gpu = device.type == "cuda"
    torch.set_num_threads(max(1, int(stage.resources.cpus_per_worker)))
    torch.manual_seed(recipe.seed)  # same init on every rank (DDP also broadcasts rank 0's)

    info = DatasetInfo.load(data.root)
    model = build_model(stage.arch, num_classes=info.num_classes, width_mult=recipe.width_mult,
                        batch_norm=recipe.batch_norm, input_size=recipe.crop, dropout=recipe.dropout,
                        init=recipe.init, init_std=recipe.init_std)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = _load_state(checkpoint)
        model.load_state_dict(state["model"])
    elif config.get("init_checkpoint") is not None:
        source = _load_state(config["init_checkpoint"])["model"]
        layers = stage.init_from.layers
        if layers == "all":
            model.load_state_dict(source)
        else:
            init_from(model, source, layers)
    if gpu and recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = ray.train.torch.prepare_model(model)
    if recipe.compile:
        net = torch.compile(net)

    per_worker = max(1, recipe.batch_size // world)
    optimizer = make_optimizer(net, recipe.optim, per_worker * world)
    schedule = PlateauSchedule(optimizer, recipe.optim)
    steps = train_steps(info, data.train_split, per_worker, world)
    start_epoch, start_step = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        # Checkpoints before mid-epoch ones existed carry no step: they are epoch ends.
        done = state.get("step", steps)
        start_epoch, start_step = (state["epoch"], done) if done < steps else (state["epoch"] + 1, 0)

    epochs = _epochs(recipe, info.counts[data.train_split])
    lo, hi = stage.scale_range
    normalize_std = recipe.normalize_std
    val_ld = eval_loader(info, data.val_split, rank=rank, world_size=world, batch_size=per_worker,
                         scale=stage.eval_scale, crop=recipe.crop, normalize_std=normalize_std, device=device,
                         threads=data.reader_threads)
    tag = f"[{stage.name}]"
    if rank == 0:
        how = (f"resumed at epoch {start_epoch + 1} step {start_step}" if state is not None else
               f"initialised from {stage.init_from.stage}" if stage.init_from else f"{recipe.init} init")
        say(f"{tag} {stage.arch} S={stage.scale_label} on {world} worker(s), {device}; {how}; "
            f"{epochs} epochs x {steps} steps of {per_worker * world}")

    def save_and_report(metrics: dict, epoch: int, step: int) -> None:
        """Every rank reports (Ray Train needs it); rank 0 attaches the checkpoint."""
        with tempfile.TemporaryDirectory() as tmp:
            if rank != 0:
                ray.train.report(metrics)
                return
            torch.save({"model": {k.removeprefix("module."): v for k, v in net.state_dict().items()},
                        "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                        "epoch": epoch, "step": step, "rng": torch.get_rng_state(), "arch": stage.arch,
                        "num_classes": info.num_classes}, Path(tmp) / CHECKPOINT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    for epoch in range(start_epoch, epochs):
        t0 = time.monotonic()
        # One loader per epoch: its order depends on (seed, epoch) only, so a mid-epoch
        # checkpoint's loader position is the step count, replayed by fast-forwarding.
        train_ld = train_loader(info, data.train_split, rank=rank, world_size=world, batch_size=per_worker,
                                scale_range=(lo, hi), crop=recipe.crop, color_shift=recipe.color_shift,
                                normalize_std=normalize_std, device=device, seed=recipe.seed, epoch=epoch,
                                threads=data.reader_threads, shuffle_buffer=data.shuffle_buffer)
        skip = start_step if epoch == start_epoch else 0
        train_ld.skip(skip)

        def progress(step, loss, rank_rate, epoch=epoch):
            steps_left = steps - step + (epochs - epoch - 1) * steps
            eta = steps_left * per_worker / max(rank_rate, 1e-9)  # every rank runs the same steps
            say(f"{tag} epoch {epoch + 1}/{epochs} step {step}/{steps} loss {loss:.4f} "
                f"{rank_rate * world:.0f} img/s ETA {eta / 60:.1f} min")

        def step_checkpoint(step, epoch=epoch):
            every = recipe.checkpoint_every_steps
            if every and step % every == 0 and step < steps:
                save_and_report({"epoch": epoch, "step": step}, epoch, step)

        stats = train_one_epoch(net, train_ld, optimizer, device, precision=recipe.precision,
                                channels_last=gpu and recipe.channels_last, grad_clip=recipe.optim.grad_clip,
                                log_every=recipe.log_every_steps if rank == 0 else 0, on_log=progress,
                                on_step=step_checkpoint, start_step=skip, where=f"{tag} epoch {epoch + 1}: ")
        del train_ld  # frees the epoch's DALI pipeline before the next one is built
        lr = schedule.lr
        val = evaluate(net, val_ld, device, precision=recipe.precision)
        schedule.step(val["top1_error"])
        metrics = {"epoch": epoch, "step": steps, "train_loss": stats.loss, "val_top1_error": val["top1_error"],
                   "val_top5_error": val["top5_error"], "val_loss": val["loss"], "val_images": val["images"],
                   "lr": lr, "images_per_sec": stats.images_per_sec, "data_wait_fraction": stats.data_wait_fraction,
                   "resumed_from_epoch": -1 if state is None else state["epoch"],  # the checkpoint's epoch
                   "resumed_at_step": skip}
        if rank == 0:
            say(f"{tag} epoch {epoch + 1}/{epochs}: loss {stats.loss:.4f} val top-1 {val['top1_error']:.2f}% "
                f"top-5 {val['top5_error']:.2f}% lr {lr:.2g} {stats.images_per_sec:.0f} img/s "
                f"data wait {100 * stats.data_wait_fraction:.0f}% ({time.monotonic() - t0:.0f}s)")
        save_and_report(metrics, epoch, steps)
        if epoch == epochs - 1 or schedule.finished:
            break


@dataclass(frozen=True)
class StageOutcome:
    checkpoint: object  # ray.train.Checkpoint of the last epoch
    metrics: dict


def fit_stage(stage, data, *, trial_name: str, storage: str, tracking_uri: str | None, mlflow_run_id: str | None,
              init_checkpoint=None) -> StageOutcome:
    """Train one stage with Ray Train. Reusing `trial_name` under the same `storage`
    resumes that stage from its last checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = stage.resources
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": 1} if res.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dict(stage=stage, data=data, init_checkpoint=init_checkpoint),
        scaling_config=ScalingConfig(num_workers=res.num_workers, use_gpu=res.use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=trial_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=res.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=[MlflowEpochMetrics(tracking_uri, mlflow_run_id)]),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage.name}: Ray Train finished without a checkpoint")
    return StageOutcome(result.checkpoint, dict(result.metrics or {}))


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


