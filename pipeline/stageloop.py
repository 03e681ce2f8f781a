"""One stage on one worker, as a short sequence of named steps: set up, restore, train,
report, fail. Plain PyTorch, DALI and the engine: the Ray Train side (who this worker is,
how a report and its checkpoint leave it, the DDP wrap) comes in as a `Seat`, filled by
pipeline/worker.py, the only module that imports Ray Train.

    stage = StageLoop(config, seat)   # set up: data, net, optimizer, lr schedule
    stage.restore()                   # a checkpoint to resume, or the weights to start from
    return stage.run()                # train epochs; report each; None, or why it FAILED

(`run_stage` does exactly that, and stops the node's system-figure sampler after.)
"""

from __future__ import annotations

import errno
import json
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

CHECKPOINT_FILE = "state.pt"  # what resuming needs besides the weights: optimizer, schedule, streams, position
WEIGHTS_FILE = "weights.pt"  # the net's weights and what serving it needs: all that init_from and booking read
_WEIGHTS_KEYS = ("model", "arch", "num_classes", "mean_rgb", "std_rgb", "classes")


def write_checkpoint(folder: Path, state: dict) -> None:
    """A stage checkpoint as two files, each tensor once: the weights (and what serving
    needs) apart from the training state, so a reader that needs only the weights
    downloads a third of a VGG checkpoint with momentum (no optimizer state)."""
    torch.save({k: state[k] for k in _WEIGHTS_KEYS if k in state}, folder / WEIGHTS_FILE)
    torch.save({k: v for k, v in state.items() if k not in _WEIGHTS_KEYS}, folder / CHECKPOINT_FILE)


# Ray Train copies a checkpoint straight into its final folder, so a worker stopped while
# uploading (its node lost, or its group shut down for a resize or after a failure: Ray
# Train kills workers 5 s after asking them to stop) leaves a folder cut short beside the
# committed ones. Ray Train never lists it and nothing here resumes from it, but a user
# who picks a folder by its name can.
_TORN = ("a folder Ray Train never committed can be cut short (a worker stopped while uploading it): "
         "take the checkpoint a stage run's `checkpoint` tag names, or one Ray Train's "
         "checkpoint_manager_snapshot.json lists (if it is that one, it was damaged after Ray Train committed it)")


def load_checkpoint_file(source, name: str) -> dict:
    """One file of a checkpoint (a path, or a file object read from storage), with an
    error that names it when it is not whole."""
    try:
        return torch.load(source, map_location="cpu", weights_only=False)
    except OSError as exc:
        if exc.errno not in (None, errno.EINVAL):  # the storage's own error (EIO, ESTALE, ENOENT): as it is
            raise
        failure = exc  # torch's reader on a zip archive without its end (EINVAL)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # torch's, by where the file ends
        failure = exc
    detail = str(failure).splitlines()[0] if str(failure) else "no detail"
    raise RuntimeError(f"checkpoint file {name} cannot be read ({type(failure).__name__}: {detail}): it is cut "
                       f"short or not a torch checkpoint; {_TORN}") from failure


def read_checkpoint(folder: Path, weights_only: bool = False, where: str | None = None) -> dict:
    """A checkpoint folder's state: both files merged (checkpoints from before the split
    have everything in CHECKPOINT_FILE), or with `weights_only` the weights file alone.
    `where` names the folder in errors (its URI when `folder` is a local copy of it)."""
    weights, named = folder / WEIGHTS_FILE, (where or str(folder)).rstrip("/")
    if weights_only and weights.is_file():
        return load_checkpoint_file(weights, f"{named}/{WEIGHTS_FILE}")
    if not (folder / CHECKPOINT_FILE).is_file():
        raise FileNotFoundError(f"checkpoint folder {named} has no {CHECKPOINT_FILE}; {_TORN}")
    state = load_checkpoint_file(folder / CHECKPOINT_FILE, f"{named}/{CHECKPOINT_FILE}")
    if weights.is_file():
        state |= load_checkpoint_file(weights, f"{named}/{WEIGHTS_FILE}")
    elif "model" not in state:  # a checkpoint from before the split has its weights in CHECKPOINT_FILE
        raise FileNotFoundError(f"checkpoint folder {named} has {CHECKPOINT_FILE} but no {WEIGHTS_FILE}; {_TORN}")
    return state


def say(message: str) -> None:
    """One line to the worker's stdout, which Ray streams to the driver and to `ray job
    logs`. (Ray Train patches print() to write twice: to stdout and to its logger.)"""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def run_stage(config: dict, seat: "Seat") -> dict | None:
    stage = StageLoop(config, seat)
    try:
        stage.restore()
        return stage.run()
    finally:
        stage.close()


@dataclass
class Seat:
    """Where this worker sits in its group, and how it talks to the rest."""

    rank: int
    world: int
    device: torch.device
    report: Callable[[dict, Path | None], None]  # every rank calls it; rank 0 may hand a checkpoint folder
    wrap: Callable[[torch.nn.Module], torch.nn.Module]  # the DDP wrap
    resume: dict | None = None  # the state of the checkpoint this run resumes from
    init: dict | None = None  # the state of the checkpoint the stage starts from (init_from)
    node: str = "node"  # this worker's node, as its system figures are labelled
    samples_node: bool = False  # this worker samples its node's system figures (one worker per node)
    # A node-drain notice for this worker group: {"deadline_ms", "nodes"} or None; the same
    # answer on every rank (Ray Train broadcasts rank 0's), so all agree on the step.
    preemption: Callable[[], dict | None] | None = None
    committed: Callable[[float], bool] | None = None  # waits (seconds) until reported checkpoints are committed


class StageLoop:
    def __init__(self, config: dict, seat: Seat):
        """Set up: the data set, the net, the optimizer and the lr schedule for this
        stage's recipe at this world size; nothing from a checkpoint yet."""
        from pipeline import rng
        from pipeline.dataset import DatasetInfo
        from pipeline.engine import LrSchedule, effective_lr, make_optimizer
        from pipeline.models import build_model

        self.config, self.seat = config, seat
        self.stage, self.data = config["stage"], config["data"]
        recipe = self.recipe = self.stage.recipe
        self.rank, self.world, self.device = seat.rank, seat.world, seat.device
        self.gpu = self.device.type == "cuda"
        self.tag = f"[{self.stage.name}]"
        torch.set_num_threads(max(1, int(self.stage.resources.cpus_per_worker)))
        torch.manual_seed(recipe.seed)  # same init on every rank (DDP also broadcasts rank 0's)
        if self.gpu:
            torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv algorithms once
        from data_prep.stagein import check_staged

        # This node's own copy of the shards: complete, and the set the driver sees (a
        # live node keeps what it staged in at launch, whatever the bucket has since).
        problem = check_staged(self.data.root, config.get("data_hash"))
        if problem:
            raise RuntimeError(f"{seat.node}: {problem}")
        self.info = DatasetInfo.load(self.data.root)
        self.model = build_model(self.stage.arch, num_classes=self.info.num_classes, width_mult=recipe.width_mult,
                                 batch_norm=recipe.batch_norm, input_size=recipe.crop, dropout=recipe.dropout,
                                 init=recipe.init, init_std=recipe.init_std)
        self._load_weights()
        # Every GPU setting is reachable on the CPU too (bf16, channels_last, compile, fused
        # SGD), so CI rehearses the GPU's branches: channels_last None means "on GPU only".
        self.channels_last = self.gpu if recipe.channels_last is None else recipe.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net = seat.wrap(self.model)
        if recipe.compile:
            self.net = torch.compile(self.net, backend="inductor" if recipe.compile is True else recipe.compile)
        rng.seed_rank_streams(recipe.seed, self.rank)  # same init above; from here each rank its own masks
        self._set_position_units()
        self.optimizer = make_optimizer(self.net, recipe.optim, recipe.batch_size)
        self.schedule = LrSchedule(self.optimizer, recipe.optim, self.steps,
                                   effective_lr(recipe.optim, recipe.batch_size))
        self.epochs = recipe.epochs_for(self.info.counts[self.data.train_split])
        self.start_epoch = self.start_step = 0
        self.skipped_samples: tuple[tuple[str, str], ...] = ()  # (shard, key) read past (skip mode)
        self.refused: str | None = None  # why the checkpoint cannot be resumed exactly
        self.preempted: dict | None = None  # the preemption notice this group saw, once checkpointed
        self.pending_steps: list[dict] = []  # per-interval records not yet reported
        self.extra: dict = {}  # what rank 0's next report carries once: replay, dataset
        self.history: list[dict] = []  # what every checkpointed report of this stage carried to MLflow
        self.sampler = None
        if seat.samples_node:
            from pipeline.sysmetrics import Sampler

            self.sampler = Sampler(gpus=self.gpu)

    def _set_position_units(self) -> None:
        """The recipe's global batch on this world size (micro-batch x accumulation,
        pipeline/order.py), steps per epoch (the same at any size) and the fingerprint a
        checkpoint's position is measured in (pipeline/position.py)."""
        from pipeline.order import sample_table, split_batch, steps_per_epoch
        from pipeline.position import fingerprint

        self.split = split_batch(self.recipe.batch_size, self.world, self.stage.resources.max_worker_batch)
        self.per_worker = self.split.micro
        table = sample_table(*(tuple(p) for p in self.info.shards(self.data.train_split)), self.info.label_format)
        self.steps = steps_per_epoch(len(table), self.recipe.batch_size, self.data.train_split)
        self.fingerprint = fingerprint(self.recipe, table)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    def _load_weights(self) -> None:
        from pipeline.models import init_from, load_state

        if self.seat.resume is not None:
            self.model.load_state_dict(load_state(self.seat.resume))
        elif self.seat.init is not None:
            source = load_state(self.seat.init)
            layers = self.config.get("init_layers") or self.stage.init_from.layers
            if layers == "all":
                self.model.load_state_dict(source)
            else:
                init_from(self.model, source, layers)

    def restore(self) -> None:
        """Resume: optimizer, lr schedule, every rank's random streams and the position
        (epoch, step) of the checkpoint; and what its report carried, to send again."""
        from pipeline import rng

        state = self.seat.resume
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            how = rng.restore(state["rng"], rank=self.rank, world=self.world, seed=self.recipe.seed,
                              epoch=state["epoch"], step=state.get("step", self.steps), device=self.device)
            if self.rank == 0 and how != "restored":
                say(f"{self.tag} random streams: {how}")
            self._resume_position(state)
            if state.get("reported"):  # all of it: a driver that died may have lost more than the last report
                self.history = list(state.get("history") or [state["reported"]])
                self.extra["replay"] = list(self.history)
        if self.rank == 0:
            self.extra.update(self._dataset())
            self._announce()

    def _resume_position(self, state: dict) -> None:
        """Where to start (pipeline/position.py): the checkpoint's images-seen position in
        this run's units, the events its resume means (a resize, a recipe change at an
        epoch's end) for the stage's MLflow run, or the reason it cannot be honoured."""
        from pipeline.position import resume_at

        at = resume_at(state, split=self.split, steps_per_epoch=self.steps, fp=self.fingerprint)
        self.start_epoch, self.start_step, self.refused = at.epoch, at.step, at.refused
        if at.events and self.rank == 0:
            step = at.epoch * self.steps + at.step
            self.extra["events"] = [dict(e, step=step) for e in at.events]
            for event in at.events:
                say(f"{self.tag} {event['kind']}: {event['text']}")

    def _dataset(self) -> dict:
        """The shard set's content hash (the retrain gate's), for the driver side to log as
        the run's dataset input with the first report: the driver may not see the shards."""
        from data_prep.store import data_hash

        try:
            return {"data_hash": data_hash(self.data.root), "data_root": str(self.data.root),
                    "data_name": f"shards:{Path(str(self.data.root).rstrip('/')).name}"}
        except FileNotFoundError:  # shards without a manifest: nothing to name them by
            return {}

    def _announce(self) -> None:
        stage, recipe, config = self.stage, self.recipe, self.config
        seen = self.start_step * self.recipe.batch_size
        how = (f"resumed at epoch {self.start_epoch + 1} step {self.start_step} (image {seen})"
               if self.seat.resume is not None else
               f"initialised from {config['init_from_label']}" if config.get("init_from_label") else
               f"initialised from {stage.init_from.stage}" if stage.init_from else f"{recipe.init} init")
        warm = f", {recipe.optim.warmup_epochs:g} warmup epochs" if recipe.optim.warmup_epochs else ""
        say(f"{self.tag} {stage.arch} S={stage.scale_label} on {self.world} worker(s), {self.device}; {how}; "
            f"{self.epochs} epochs x {self.steps} steps of {self.recipe.batch_size} ({self.split.label()}), "
            f"lr {self.schedule.base_lr:.3g}{warm}")

    def run(self) -> dict | None:
        """Train from the restored position to the last epoch (or the plateau's end).
        None when the stage finished; {"kind", "epoch", "reason"} when it must FAIL."""
        from pipeline.data import eval_loader

        if self.refused:
            self.seat.report({}, None)  # every rank reports once, as Ray Train expects
            return self.fail("refused", self.seat.resume["epoch"], self.refused)
        if self.seat.resume is not None and self.start_step == 0 and (
                self.start_epoch >= self.epochs or self.schedule.finished):
            # The checkpoint is the stage's last epoch (the driver died before booking it): book
            # it as it is. Its report goes to MLflow again (steps and epochs there are skipped);
            # Ray Train's result is that checkpoint with its metrics.
            if self.rank == 0:
                say(f"{self.tag} its last epoch ({self.seat.resume['epoch'] + 1}) is in the checkpoint: booked, "
                    "not trained again")
            self.seat.report({"replay": self.extra["replay"]} if self.rank == 0 and "replay" in self.extra else {},
                             None)
            return None
        self.val_ld = eval_loader(self.info, self.data.val_split, rank=self.rank, world_size=self.world,
                                  batch_size=self.per_worker, scale=self.stage.eval_scale, crop=self.recipe.crop,
                                  normalize_std=self.recipe.normalize_std, device=self.device,
                                  threads=self.data.reader_threads, channels_last=self.channels_last)
        for epoch in range(self.start_epoch, self.epochs):
            try:
                failure = self.train_epoch(epoch)
            except RuntimeError as exc:
                if self.preempted is None:
                    raise
                from pipeline.elastic import wait_for_reclaim

                wait_for_reclaim(self.preempted, exc, lambda text: say(f"{self.tag} {text}"))
            if failure is not None:
                return failure
            if epoch == self.epochs - 1 or self.schedule.finished:
                break
        return None

    def train_epoch(self, epoch: int) -> dict | None:
        """One epoch: train, validate, step the lr schedule, report with a checkpoint."""
        from pipeline.data import train_loader
        from pipeline.elastic import audited
        from pipeline.engine import DataFailure, NonFiniteLoss, evaluate, stall_reason, train_one_epoch

        recipe, steps, t0 = self.recipe, self.steps, time.monotonic()
        # One loader per epoch: its order depends on (seed, epoch) only, so a mid-epoch
        # checkpoint's position (images seen) is where this epoch's loader starts reading.
        lo, hi = self.stage.scale_range
        skip = self.start_step if epoch == self.start_epoch else 0
        train_ld = train_loader(self.info, self.data.train_split, rank=self.rank, world_size=self.world,
                                batch_size=self.per_worker, scale_range=(lo, hi), crop=recipe.crop,
                                color_shift=recipe.color_shift, normalize_std=recipe.normalize_std,
                                device=self.device, seed=recipe.seed, epoch=epoch, threads=self.data.reader_threads,
                                decode=self.data.gpu_decode if self.gpu else "roi", channels_last=self.channels_last,
                                layout=self.split, start_step=skip * self.split.accumulate,
                                **self._corrupt_sample_setting())
        try:
            stats = train_one_epoch(
                self.net, audited(train_ld, self.data.keys_log, f"{self.stage.name}-rank{self.rank}", epoch, skip,
                                  self.split.accumulate), self.optimizer, self.device, precision=recipe.precision,
                channels_last=self.channels_last, grad_clip=recipe.optim.grad_clip,
                log_every=recipe.log_every_steps, on_log=lambda record: self._progress(epoch, record),
                checkpoint_every=recipe.checkpoint_every_steps,
                on_checkpoint=lambda step: self._mid_epoch_checkpoint(epoch, step),
                lr_at=lambda s: self.schedule.lr_at(epoch * steps + s), start_step=skip,
                where=f"{self.tag} epoch {epoch + 1}: ", accumulate=self.split.accumulate,
                global_batch=None if self.split.even else recipe.batch_size,
                poll=self._preemption_poll(epoch))
        except NonFiniteLoss as exc:
            # Every rank raises at the same sync point (the check is a collective). The
            # bad weights are never checkpointed; the records up to the explosion are.
            self.report({"epoch": epoch}, epoch, 0, checkpoint=False)
            return self.fail("diverged", epoch, str(exc))
        except DataFailure as exc:
            return self._corrupt(epoch, exc)
        self._skipped_past(train_ld, stats)
        del train_ld  # frees the epoch's DALI pipeline before the next one is built
        lr = self.schedule.lr
        try:
            val = evaluate(self.net, self.val_ld, self.device, precision=recipe.precision)
        except DataFailure as exc:
            return self._corrupt(epoch, exc)
        decision = self.schedule.step(val["top1_error"])
        resume = self.seat.resume
        metrics = {"epoch": epoch, "step": steps, "train_loss": stats.loss, "val_top1_error": val["top1_error"],
                   "val_top5_error": val["top5_error"], "val_loss": val["loss"], "val_images": val["images"],
                   "lr": lr, "images_per_sec": stats.images_per_sec, "data_wait_fraction": stats.data_wait_fraction,
                   "resumed_from_epoch": -1 if resume is None else resume["epoch"],  # the checkpoint's epoch
                   "resumed_at_step": skip, "skipped_samples": stats.skipped_samples, "world_size": self.world}
        if self.rank == 0:
            say(f"{self.tag} epoch {epoch + 1}/{self.epochs}: loss {stats.loss:.4f} val top-1 "
                f"{val['top1_error']:.2f}% top-5 {val['top5_error']:.2f}% lr {lr:.3g} {stats.images_per_sec:.0f} "
                f"img/s data wait {100 * stats.data_wait_fraction:.0f}% ({time.monotonic() - t0:.0f}s)"
                + {"drop": f"; plateau: lr -> {self.schedule.lr:.3g}",
                   "finish": "; plateau after the last drop: done"}.get(decision, ""))
        stalled = stall_reason(val["top1_error"], self.info.num_classes, epoch + 1, recipe)
        if stalled:
            self.report(metrics, epoch, steps, checkpoint=False)  # the epoch's figures, not its weights
            return self.fail("stalled", epoch, stalled)
        self.report(metrics, epoch, steps)
        return None

    def _corrupt_sample_setting(self) -> dict:
        return {"skip_corrupt": self.data.on_corrupt_sample == "skip", "skip_samples": self.skipped_samples}

    def _skipped_past(self, train_ld, stats) -> None:
        """Skip mode, at the epoch's end (a collective: every rank has the same setting):
        the samples any rank read past are read past on every rank in later epochs, where
        the order puts them on other ranks; the count goes with the epoch's figures."""
        if self.data.on_corrupt_sample != "skip":
            return
        import torch.distributed as dist

        found = [train_ld.skipped]
        if dist.is_available() and dist.is_initialized():
            found = [None] * dist.get_world_size()
            dist.all_gather_object(found, train_ld.skipped)
        culprits = list(dict.fromkeys(tuple(c) for rank in found for c in rank))
        if not culprits:
            return
        if self.rank == 0:
            say(f"{self.tag} skipped {len(culprits)} corrupt sample(s) (data.on_corrupt_sample=skip): "
                + "; ".join(f"{key!r} in {tar}" for tar, key, _ in culprits))
        # each was met this epoch, so none is in the list yet
        self.skipped_samples += tuple((tar, key) for tar, key, _ in culprits)

    def _corrupt(self, epoch: int, exc: Exception) -> dict:
        """A sample no rank can read (named by the rank that met it): every rank is here at
        once (DataFailure is raised at a collective), the epoch's figures so far go out, and
        the stage FAILS as a training failure (not retried). Its weights are not saved."""
        self.report({"epoch": epoch}, epoch, 0, checkpoint=False)
        return self.fail("corrupt", epoch, f"{exc}. To train past it, set data.on_corrupt_sample=skip")

    def _mid_epoch_checkpoint(self, epoch: int, step: int) -> None:
        """Every `checkpoint_every_steps` steps; the epoch's end has its own, with its figures."""
        if step < self.steps:
            self.report({"epoch": epoch, "step": step}, epoch, step)

    def _preemption_poll(self, epoch: int):
        """At each sync, ask whether a node of this group is being drained; on the first
        notice, checkpoint at once (inside the notice window) and go on training: when the
        node goes, Ray Train restarts the group from that checkpoint, at another size."""
        from pipeline.elastic import preemption_poll

        def notice(step: int, text: str, left: float | None) -> None:
            if self.rank == 0:
                say(f"{self.tag} preemption: {text}")
                self.extra.setdefault("events", []).append(
                    {"kind": "preemption", "cause": "drain notice", "text": text, "step": epoch * self.steps + step})

        def seen(info: dict) -> None:
            self.preempted = info

        if self.seat.preemption is None:
            return None
        return preemption_poll(self.seat.preemption, lambda: self.preempted is not None, seen, notice, epoch,
                               self.steps)

    def _progress(self, epoch: int, record: dict) -> None:
        """A per-interval record: kept for the next report (rank 0) and, unless stages run
        side by side, printed with an ETA."""
        if self.rank != 0:
            return
        steps, epochs = self.steps, self.epochs
        self.pending_steps.append(dict(record, step=epoch * steps + record["step"], world_size=self.world))
        if not self.config.get("step_lines", True):
            return
        rate = record["images_per_sec"]
        steps_left = steps - record["step"] + (epochs - epoch - 1) * steps
        eta = steps_left * self.recipe.batch_size / max(rate, 1e-9)
        say(f"{self.tag} epoch {epoch + 1}/{epochs} step {record['step']}/{steps} loss {record['train_loss']:.4f} "
            f"lr {record.get('lr', self.schedule.lr):.3g} {rate:.0f} img/s on {self.world} worker(s) "
            f"ETA {eta / 60:.1f} min")

    def report(self, metrics: dict, epoch: int, step: int, checkpoint: bool = True) -> None:
        """Every rank reports (Ray Train needs it); rank 0 attaches the checkpoint and the
        step records since its last report."""
        from pipeline import rng
        from pipeline.models import plain_names
        from pipeline.position import record

        streams = rng.gather_states(self.device) if checkpoint else None  # a collective: before rank 0 goes alone
        if self.sampler is not None:  # this node's figures since the last report, from any rank
            metrics = dict(metrics, system={"node": self.seat.node, "samples": self.sampler.drain()})
        if self.rank != 0:
            self.seat.report(metrics, None)
            return
        metrics = dict(metrics, step_log=list(self.pending_steps), **self.extra)
        self.pending_steps.clear()
        self.extra.clear()
        if not checkpoint:
            self.seat.report(metrics, None)
            return
        # What this report carries to MLflow goes into the checkpoint too, with all the stage's
        # reports before it: a resumed run sends them again, in case the driver died before
        # MLflow had them all (its sink drops what MLflow has: pipeline/metricsink.py).
        reported = {k: v for k, v in metrics.items()
                    if k not in ("replay", "data_hash", "data_root", "data_name", "system")}
        self.history.append(reported)
        # The folder is the seat's once reported: Ray Train uploads it in the background and
        # then deletes it, so the ranks train on while a checkpoint of ~1 GiB goes to storage.
        tmp = Path(tempfile.mkdtemp(prefix="vgg-checkpoint-"))
        write_checkpoint(tmp, {"model": plain_names(self.net.state_dict()), "optimizer": self.optimizer.state_dict(),
                               "schedule": self.schedule.state_dict(), "epoch": epoch, "step": step, "rng": streams,
                               "arch": self.stage.arch, "num_classes": self.info.num_classes, "reported": reported,
                               "history": self.history,
                               "position": record(self.split, self.steps, step, self.fingerprint, self.preempted),
                               **self._serving_facts()})
        self.seat.report(metrics, tmp)
        if self.preempted is not None and "committed_s" not in self.preempted:
            self._confirm_notice_checkpoint()

    def _confirm_notice_checkpoint(self) -> None:
        """Wait (up to the notice's deadline) until Ray Train has committed the checkpoint
        written on a drain notice: a checkpoint the controller has not registered when the
        node goes is lost, and the steps since the one before are redone."""
        notice = self.preempted
        left = notice["deadline_ms"] / 1000 - time.time() if notice.get("deadline_ms") else 60.0
        ok = self.seat.committed(max(left, 1.0)) if self.seat.committed else False
        notice["committed_s"] = notice["deadline_ms"] / 1000 - time.time() if notice.get("deadline_ms") else 0.0
        say(f"{self.tag} preemption: the notice's checkpoint is "
            + (f"committed, {notice['committed_s']:.0f} s before the deadline" if ok else
               "not confirmed committed before the deadline"))

    def _serving_facts(self) -> dict:
        """What a registered model needs to classify an image on its own (pipeline/serving.py),
        kept in every checkpoint: the driver that registers it may not see the shards."""
        classes_file = Path(str(self.data.root)) / "classes.json"
        info = self.info
        return {"mean_rgb": list(info.mean_rgb), "std_rgb": list(info.std_rgb) if self.recipe.normalize_std else None,
                "classes": json.loads(classes_file.read_text()) if classes_file.is_file() else []}

    def fail(self, kind: str, epoch: int, reason: str) -> dict:
        """A training failure (stalled, diverged): said once, returned to the driver; not a
        crash, so Ray Train does not retry it from a checkpoint."""
        if self.rank == 0:
            say(f"{self.tag} FAILED ({kind}) in epoch {epoch + 1}: {reason}")
        return {"kind": kind, "epoch": epoch + 1, "reason": reason}
