"""The one training loop and the one evaluation loop: plain PyTorch, no Ray, no MLflow.

`train_one_epoch` and `evaluate` take a model and an iterable of (images, labels)
batches; under torch.distributed they all-reduce their counts so every rank
returns the global figures.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.stages import Optim


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the stage stops and keeps its last good checkpoint."""


def effective_lr(optim: Optim, global_batch: int) -> float:
    """Section 3.1's lr (quoted at batch 256), scaled linearly with the global batch."""
    return optim.lr * global_batch / optim.reference_batch if optim.scale_lr else optim.lr


def make_optimizer(model: nn.Module, optim: Optim, global_batch: int) -> torch.optim.SGD:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Biases and batch-norm scales are 1-d; Caffe's VGG solver does not decay biases.
        (decay if p.dim() > 1 or optim.decay_biases else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=effective_lr(optim, global_batch), momentum=optim.momentum)


class PlateauSchedule:
    """Divide the lr by 10 when validation top-1 error stops improving (Section 3.1),
    at most `max_drops` times; after that a further plateau ends the stage."""

    def __init__(self, optimizer: torch.optim.Optimizer, optim: Optim):
        self.optimizer, self.cfg = optimizer, optim
        self.best, self.bad_epochs, self.drops, self.finished = math.inf, 0, 0, False

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, val_top1_error: float) -> None:
        if val_top1_error < self.best - 1e-9:
            self.best, self.bad_epochs = val_top1_error, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs < self.cfg.patience:
            return
        self.bad_epochs = 0
        if self.drops >= self.cfg.max_drops:
            self.finished = True
            return
        self.drops += 1
        for group in self.optimizer.param_groups:
            group["lr"] *= self.cfg.lr_drop

    def state_dict(self) -> dict:
        return dict(best=self.best, bad_epochs=self.bad_epochs, drops=self.drops, finished=self.finished)

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs = state["best"], state["bad_epochs"]
        self.drops, self.finished = state["drops"], state["finished"]


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    data_wait_seconds: float
    steps: int

    @property
    def images_per_sec(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    @property
    def data_wait_fraction(self) -> float:
        return self.data_wait_seconds / max(self.seconds, 1e-9)


def autocast(device: torch.device, precision: str):
    """bf16 autocast on GPU ("auto" or "bf16"); full fp32 elsewhere."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_input(images: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """DALI's GPU graph emits float16; bf16 autocast takes it as is, fp32 needs a cast."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return images
    return images.float()


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


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
    on_log: Callable[[int, float, float], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    start_step: int = 0,
    where: str = "",
) -> EpochStats:
    """One pass over `loader`. Steps are numbered from `start_step` (a loader fast-forwarded
    to a mid-epoch checkpoint). `on_log(step, loss, images_per_sec)` every `log_every`
    steps; `on_step(step)` after every optimizer step (mid-epoch checkpoints)."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    total_loss, images, steps, wait = 0.0, 0, start_step, 0.0
    start = tick = time.perf_counter()
    for images_b, labels in loader:
        got = time.perf_counter()
        wait += got - tick
        if channels_last:
            images_b = images_b.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            loss = criterion(model(model_input(images_b, device, precision)), labels)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"{where}loss is {loss.item()} at step {steps}; stopping the stage "
                                "(the last good checkpoint is kept)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        n = labels.shape[0]
        total_loss += loss.item() * n
        images += n
        steps += 1
        if on_log and log_every and steps % log_every == 0:
            on_log(steps, loss.item(), images / max(time.perf_counter() - start, 1e-9))
        if on_step:
            on_step(steps)
        tick = time.perf_counter()
    seconds = time.perf_counter() - start
    loss_sum, count, wait_sum, secs = _all_reduce([total_loss, images, wait, seconds], device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    # images/s is global (all ranks); wait share is the mean over ranks.
    return EpochStats(loss_sum / max(count, 1), int(count), secs / world, wait_sum / world, steps - start_step)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return [int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, *, precision: str = "auto") -> dict:
    """Top-1/top-5 error (percent) over every image of every rank's loader, once each."""
    model.eval()
    correct1 = correct5 = count = 0
    loss_sum = 0.0
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for images_b, labels in loader:
        with autocast(device, precision):
            logits = model(model_input(images_b, device, precision)).float()
        c1, c5 = topk_correct(logits, labels)
        correct1, correct5 = correct1 + c1, correct5 + c5
        loss_sum += criterion(logits, labels).item()
        count += labels.shape[0]
    correct1, correct5, count, loss_sum = _all_reduce([correct1, correct5, count, loss_sum], device)
    if count == 0:
        raise ValueError("evaluate: the loader yielded no images")
    return {
        "top1_error": 100.0 * (1 - correct1 / count),
        "top5_error": 100.0 * (1 - correct5 / count),
        "loss": loss_sum / count,
        "images": int(count),
    }
