"""The plain-PyTorch engine: Section 3.1's optimiser and schedule, the NaN guard, and
step numbering for epochs resumed mid-way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.engine import NonFiniteLoss, PlateauSchedule, effective_lr, evaluate, make_optimizer, train_one_epoch
from pipeline.models import build_model
from pipeline.stages import Optim


def batches(n: int, classes: int = 4, side: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, side, side, generator=g), torch.randint(0, classes, (4,), generator=g))
            for _ in range(n)]


def test_lr_scales_with_the_global_batch_and_biases_are_not_decayed():
    assert effective_lr(Optim(lr=0.01), 512) == pytest.approx(0.02)
    assert effective_lr(Optim(lr=0.01, scale_lr=False), 512) == 0.01
    model = build_model("A", num_classes=4, width_mult=0.125, input_size=32)
    opt = make_optimizer(model, Optim(), 256)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 5e-4 and plain["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(plain["params"]) == 11  # one bias per weight layer of net A
    assert opt.defaults["momentum"] == 0.9


def test_plateau_schedule_drops_three_times_then_finishes():
    w = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.01)
    sched = PlateauSchedule(opt, Optim(patience=2))
    sched.step(50.0)
    sched.step(40.0)  # improving: no drop
    assert sched.lr == pytest.approx(0.01)
    lrs = []
    for _ in range(8):  # flat from here on: a drop every 2 epochs, at most 3
        sched.step(40.0)
        lrs.append(sched.lr)
    assert lrs[:6] == pytest.approx([0.01, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5])
    assert sched.drops == 3 and sched.finished
    restored = PlateauSchedule(opt, Optim(patience=2))
    restored.load_state_dict(sched.state_dict())
    assert restored.state_dict() == sched.state_dict()


class Exploding(nn.Module):
    """Finite for `good` forward passes, then NaN."""

    def __init__(self, good: int):
        super().__init__()
        self.fc, self.calls, self.good = nn.Linear(3 * 32 * 32, 4), 0, good

    def forward(self, x):
        self.calls += 1
        out = self.fc(x.flatten(1))
        return out * float("nan") if self.calls > self.good else out


def test_non_finite_loss_stops_the_epoch_naming_the_step():
    model = Exploding(good=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLoss, match=r"\[A\] epoch 2: loss is nan at step 3"):
        train_one_epoch(model, batches(6), opt, torch.device("cpu"), log_every=0, where="[A] epoch 2: ")
    # the three good steps were applied, the bad one was not
    assert torch.isfinite(model.fc.weight).all()


def test_resumed_epoch_numbers_steps_from_the_checkpoint():
    model = build_model("A", num_classes=4, width_mult=0.125, input_size=32, init="kaiming")
    opt = make_optimizer(model, Optim(lr=0.01), 4)
    seen = []
    stats = train_one_epoch(model, batches(4), opt, torch.device("cpu"), log_every=0, on_step=seen.append,
                            start_step=6)
    assert seen == [7, 8, 9, 10] and stats.steps == 4 and stats.images == 16
    result = evaluate(model, batches(3), torch.device("cpu"))
    assert result["images"] == 12 and 0 <= result["top1_error"] <= 100
