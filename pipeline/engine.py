"""The one training loop and the one evaluation loop: plain PyTorch, no Ray, no MLflow.

`train_one_epoch` and `evaluate` take a model and an iterable of (images, labels)
batches; under torch.distributed they all-reduce their counts so every rank
returns the global figures.

The training loop never waits for the device inside a step: loss sums and the
count of non-finite losses stay on the device and are read only at sync points
(every `log_every` steps, before every mid-epoch checkpoint, and at the epoch's
end). A non-finite loss therefore stops the epoch at the next sync point, naming
the step range, before any checkpoint of the bad weights can be written.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from pipeline.stages import Optim


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the stage stops and keeps its last good checkpoint."""


class DataFailure(RuntimeError):
    """A sample the input pipeline cannot read (pipeline/data.py names it). Raised on every
    rank together, with every rank's message, so no rank is left waiting in a collective."""


def _failure_of(loader) -> str:
    """What ended this rank's loader early, or "" (a host attribute: no device sync)."""
    failure = getattr(loader, "failure", None)
    return str(failure) if failure is not None else ""


def _every_rank_says(message: str) -> str:
    """The distinct non-empty messages of all ranks, joined (a collective)."""
    if not _distributed():
        return message
    said = [None] * dist.get_world_size()
    dist.all_gather_object(said, message)
    return "; ".join(dict.fromkeys(m for m in said if m))


def effective_lr(optim: Optim, global_batch: int) -> float:
    """Section 3.1's lr (quoted at batch 256), scaled linearly with the global batch."""
    return optim.lr * global_batch / optim.reference_batch if optim.scale_lr else optim.lr


def make_optimizer(model: nn.Module, optim: Optim, global_batch: int) -> torch.optim.SGD:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Biases and batch-norm scales are 1-d: decayed only with decay_biases (paper.yaml: yes, as the paper).
        (decay if p.dim() > 1 or optim.decay_biases else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # One fused kernel per step (all parameters at once): "auto" takes it on GPU and the
    # multi-tensor (foreach) path elsewhere; "fused" asks for it on the CPU too (torch
    # has a CPU fused SGD), which is how CI rehearses the GPU's optimiser step. All are
    # the same SGD as the per-tensor loop.
    impl = optim.impl if optim.impl != "auto" else "fused" if any(p.is_cuda for p in decay + no_decay) else "foreach"
    kind = {impl: True}
    return torch.optim.SGD(groups, lr=effective_lr(optim, global_batch), momentum=optim.momentum, **kind)


class LrSchedule:
    """The learning rate of every step: a linear warmup from `warmup_start_factor` x lr
    to lr over `warmup_epochs` (Goyal et al. 2017, for large batches), then Section
    3.1's rule, divide by 10 when validation error stops improving, made safe:

    - no drop before `min_epochs_before_drop` epochs after warmup;
    - an epoch counts as an improvement only if it beats the best error by more than
      `threshold` (relative), so noise does not reset the count;
    - a drop needs `patience` epochs in a row without an improvement;
    - `cooldown` epochs after each drop are not counted;
    - after `max_drops` drops, a further plateau ends the stage (`finished`).

    `lr_at(step)` is a pure function of the global step and the drops so far, so a
    stage resumed from a checkpoint continues the exact curve."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: Optim, steps_per_epoch: int, base_lr: float):
        self.optimizer, self.cfg, self.base_lr = optimizer, optim, base_lr
        self.warmup_steps = round(optim.warmup_epochs * steps_per_epoch)
        self.warmup_epochs = math.ceil(optim.warmup_epochs)  # whole epochs in which the lr still rises
        self.best, self.bad_epochs, self.drops, self.finished = math.inf, 0, 0, False
        self.epochs_seen, self.cooldown_left = 0, 0

    def lr_at(self, step: int) -> float:
        lr = self.base_lr * self.cfg.lr_drop ** self.drops
        if step < self.warmup_steps:
            f = self.cfg.warmup_start_factor
            lr *= f + (1.0 - f) * step / self.warmup_steps
        return lr

    def apply(self, step: int) -> float:
        """Set the optimizer's lr for global step `step` (0-based) and return it."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    @property
    def lr(self) -> float:
        """The lr after warmup at the current number of drops."""
        return self.base_lr * self.cfg.lr_drop ** self.drops

    def step(self, val_top1_error: float) -> str | None:
        """Feed one epoch's validation error; returns "drop", "finish" or None."""
        self.epochs_seen += 1
        if val_top1_error < self.best * (1.0 - self.cfg.threshold):
            self.best, self.bad_epochs = val_top1_error, 0
            return None
        if self.epochs_seen <= self.warmup_epochs:
            return None  # the lr is still rising: nothing to judge yet
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            return None
        self.bad_epochs += 1
        after_warmup = self.epochs_seen - self.warmup_epochs
        if self.bad_epochs < self.cfg.patience or after_warmup < self.cfg.min_epochs_before_drop:
            return None
        self.bad_epochs, self.cooldown_left = 0, self.cfg.cooldown
        if self.drops >= self.cfg.max_drops:
            self.finished = True
            return "finish"
        self.drops += 1
        return "drop"

    def state_dict(self) -> dict:
        return dict(best=self.best, bad_epochs=self.bad_epochs, drops=self.drops, finished=self.finished,
                    epochs_seen=self.epochs_seen, cooldown_left=self.cooldown_left)

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
        self.drops, self.finished = state["drops"], state["finished"]
        # Checkpoints from before warmup and cooldown existed lack these two.
        self.epochs_seen, self.cooldown_left = state.get("epochs_seen", 0), state.get("cooldown_left", 0)


def stall_reason(val_top1_error: float, num_classes: int, epochs_done: int, recipe) -> str | None:
    """Why a stage that is still at chance after `recipe.stall_epochs` epochs past warmup
    must stop, or None. Chance is 1 - 1/classes; `chance_margin` is in error points."""
    if not recipe.stall_epochs or epochs_done < math.ceil(recipe.optim.warmup_epochs) + recipe.stall_epochs:
        return None
    chance = 100.0 * (1.0 - 1.0 / num_classes)
    if val_top1_error < chance - recipe.chance_margin:
        return None
    return (f"validation top-1 error {val_top1_error:.2f}% after {epochs_done} epochs is within "
            f"{recipe.chance_margin:g} points of chance ({chance:.2f}% for {num_classes} classes)")


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    data_wait_seconds: float
    steps: int
    step_log: list[dict] = field(default_factory=list)  # per-interval figures, see train_one_epoch
    skipped_samples: int = 0  # corrupt samples read past (skip mode), all ranks

    @property
    def images_per_sec(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_seconds / max(self.seconds, 1e-9)


def autocast(device: torch.device, precision: str):
    """bf16 autocast: "auto" on GPU only, "bf16" on any device (on the CPU it is how CI
    rehearses the GPU's mixed precision); full precision otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_input(images: torch.Tensor, device: torch.device, precision: str,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DALI's GPU graph emits float16, which bf16 autocast takes as is; otherwise the
    batch is cast to the net's own dtype (`dtype`: float32, or float64 in the tests
    that catch tensors made at torch's default dtype)."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return images
    return images.to(dtype)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters(), torch.empty(0)).dtype


def _grads_in_buckets(model: nn.Module) -> bool:
    """DDP with gradient_as_bucket_view (also under torch.compile): the gradients are views
    of DDP's buckets, to be zeroed in place, never dropped and re-made each step."""
    return bool(getattr(getattr(model, "_orig_mod", model), "gradient_as_bucket_view", False))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a copy; `t` itself is left as it is)."""
    if _distributed():
        t = t.clone()
        dist.all_reduce(t)
    return t


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    return _all_reduce_tensor(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    precision: str = "auto",
    channels_last: bool = False,
    grad_clip: float | None = None,
    log_every: int = 50,
    on_log: Callable[[dict], None] | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[int], None] | None = None,
    lr_at: Callable[[int], float] | None = None,
    start_step: int = 0,
    where: str = "",
    accumulate: int = 1,
    global_batch: int | None = None,
    poll: Callable[[int], bool] | None = None,
) -> EpochStats:
    """One pass over `loader`. Steps are numbered from `start_step` (a loader fast-forwarded
    to a mid-epoch checkpoint); `lr_at(step)`, if given, is the lr of each step (warmup).

    Every `log_every` steps, on every rank alike (it is a collective under DDP), the
    loop syncs: a non-finite loss since the last sync raises NonFiniteLoss naming the
    steps, else a record {step, train_loss (mean over the interval, all ranks), lr,
    images_per_sec (all ranks), data_wait_fraction} is kept in `step_log` and passed to
    `on_log`. `on_checkpoint(step)` runs every `checkpoint_every` steps, after a sync.

    `accumulate`: the loader yields micro-batches, `accumulate` of them per optimizer
    step (gradients summed, each micro-batch's loss divided by `accumulate`, so a step
    is the mean over the worker's share; DDP averages the shares). Shares of unequal
    size (a global batch that does not divide over the ranks, pipeline/order.py) give
    `global_batch`: each micro-batch of n images is then weighted by world x n /
    global_batch, so the step is still the mean over all its images. Under DDP only the
    step's last micro-batch all-reduces (`no_sync` before it). Steps count optimizer
    steps; images count every image.

    `poll(step)`, if given, runs on every rank at every sync; True (the same answer on
    every rank: the caller makes it a collective decision) asks for `on_checkpoint(step)`
    now, e.g. inside a preemption notice's window."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    world = dist.get_world_size() if _distributed() else 1
    dtype, set_to_none = _dtype(model), not _grads_in_buckets(model)
    # [loss sum, images, non-finite losses, steps on placeholder batches] for the epoch and
    # for the current interval, on the device: adding to them never waits for the GPU, and
    # no step copies a value from the host (the count is made on the device: ones_like * n).
    epoch_acc = torch.zeros(4, dtype=torch.float64, device=device)
    interval_acc = torch.zeros(4, dtype=torch.float64, device=device)
    images = wait = interval_wait = 0.0
    steps, synced_at, lr = start_step, start_step, None
    step_log: list[dict] = []
    start = tick = interval_start = time.perf_counter()

    def sync() -> None:
        nonlocal interval_acc, interval_wait, interval_start, synced_at
        loss_sum, count, bad, broken = _all_reduce_tensor(interval_acc).tolist()
        if broken:  # a rank's loader hit a sample it cannot read: every rank stops here, together
            raise DataFailure(f"{where}{_every_rank_says(_failure_of(loader))}; stopping the stage "
                              "(the last good checkpoint is kept)")
        if bad:
            raise NonFiniteLoss(f"{where}loss became non-finite between steps {synced_at + 1} and {steps} "
                                f"({int(bad)} of {int(count)} losses); stopping the stage "
                                "(the last good checkpoint is kept)")
        now = time.perf_counter()
        seconds = max(now - interval_start, 1e-9)
        record = {"step": steps, "train_loss": loss_sum / max(count, 1), "images_per_sec": count / seconds,
                  "data_wait_fraction": interval_wait / seconds}
        if lr is not None:
            record["lr"] = lr
        step_log.append(record)
        if on_log:
            on_log(record)
        epoch_acc.add_(interval_acc)
        interval_acc = torch.zeros_like(interval_acc)
        interval_wait, interval_start, synced_at = 0.0, now, steps

    no_sync = getattr(getattr(model, "_orig_mod", model), "no_sync", None)
    micro = 0
    for images_b, labels in loader:
        got = time.perf_counter()
        wait += got - tick
        interval_wait += got - tick
        if micro == 0:
            if lr_at is not None:
                lr = lr_at(steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            optimizer.zero_grad(set_to_none=set_to_none)
        if channels_last:  # a no-op (no copy) for the channels_last batches the loaders give
            images_b = images_b.contiguous(memory_format=torch.channels_last)
        # A placeholder batch (this rank's loader failed): the step runs, so DDP's collectives
        # stay in step, but teaches nothing and is not counted; the next sync stops the epoch.
        broken = bool(_failure_of(loader))
        micro += 1
        with no_sync() if no_sync is not None and micro < accumulate else contextlib.nullcontext():
            with autocast(device, precision):
                loss = criterion(model(model_input(images_b, device, precision, dtype)), labels)
            n = 0 if broken else labels.shape[0]
            weight = world * n / global_batch if global_batch else (0.0 if broken else 1.0 / accumulate)
            (loss * weight if weight != 1.0 else loss).backward()
        loss = loss.detach().double()
        finite = torch.isfinite(loss)
        zero = torch.zeros_like(loss)
        interval_acc += torch.stack([torch.where(finite, loss, zero) * n, zero.add(n), (~finite).double(),
                                     zero.add(float(broken))])
        images += n
        if micro < accumulate:
            tick = time.perf_counter()
            continue
        micro = 0
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        steps += 1
        wants_checkpoint = bool(on_checkpoint and checkpoint_every and steps % checkpoint_every == 0)
        synced = bool(log_every and steps % log_every == 0) or wants_checkpoint
        if synced:
            sync()
        if synced and poll is not None and poll(steps) and on_checkpoint:
            wants_checkpoint = True
        if wants_checkpoint:
            on_checkpoint(steps)
        tick = time.perf_counter()
    if steps > synced_at:
        sync()  # the epoch's tail; every rank ran the same steps, so every rank meets here
    seconds = time.perf_counter() - start
    loss_sum, count, _, _ = _all_reduce_tensor(epoch_acc).tolist()
    wait_sum, secs, skipped = _all_reduce([wait, seconds, len(getattr(loader, "skipped", ()))], device)
    # images/s is global (all ranks); wait share is the mean over ranks.
    return EpochStats(loss_sum / max(count, 1), int(count), secs / world, wait_sum / world, steps - start_step,
                      step_log, int(skipped))


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """Correct top-k predictions for each k, as a tensor on the logits' device (no sync)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return torch.stack([hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks])


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, *, precision: str = "auto") -> dict:
    """Top-1/top-5 error (percent) over every image of every rank's loader, once each.
    Counts stay on the device until the end (one sync per evaluation)."""
    model.eval()
    dtype = _dtype(model)
    acc = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, images, loss sum
    criterion = nn.CrossEntropyLoss(reduction="sum")
    failure = ""
    try:
        for images_b, labels in loader:
            with autocast(device, precision):
                logits = model(model_input(images_b, device, precision, dtype)).float()
            hits = topk_hits(logits, labels).double()
            # the count is made on the device (no per-batch copy from the host)
            acc += torch.stack([hits[0], hits[1], torch.zeros_like(hits[0]).add(labels.shape[0]),
                                criterion(logits, labels).double()])
    except DataFailure as exc:  # to the collective below, where every rank learns of it
        failure = str(exc)
    correct1, correct5, count, loss_sum, broken = _all_reduce_tensor(
        torch.cat([acc, torch.tensor([float(bool(failure))], dtype=torch.float64, device=device)])).tolist()
    if broken:
        raise DataFailure(_every_rank_says(failure))
    if count == 0:
        raise ValueError("evaluate: the loader yielded no images")
    return {
        "top1_error": 100.0 * (1 - correct1 / count),
        "top5_error": 100.0 * (1 - correct5 / count),
        "loss": loss_sum / count,
        "images": int(count),
    }
