"""The plain-PyTorch engine: Section 3.1's optimiser and schedule, the NaN guard, and
step numbering for epochs resumed mid-way."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.engine import (LrSchedule, NonFiniteLoss, effective_lr, evaluate, make_optimizer, stall_reason,
                             train_one_epoch)
from pipeline.models import build_model
from pipeline.stages import Optim, Recipe


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


def schedule(steps_per_epoch: int = 10, base_lr: float = 0.01, **optim) -> LrSchedule:
    w = nn.Parameter(torch.zeros(1))
    return LrSchedule(torch.optim.SGD([w], lr=base_lr), Optim(**optim), steps_per_epoch, base_lr)


def test_warmup_ramps_the_lr_linearly_per_step_then_holds():
    sched = schedule(steps_per_epoch=4, base_lr=0.8, warmup_epochs=1.5, warmup_start_factor=0.25)
    # 6 warmup steps from 0.25 x 0.8 = 0.2 up, +0.1 a step; full lr from step 6 on
    assert [sched.apply(s) for s in range(9)] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8])
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.8)
    off = schedule(base_lr=0.8)  # warmup_epochs 0: the paper's recipe, full lr from step 0
    assert off.apply(0) == pytest.approx(0.8)
    # a drop scales the whole curve; the same step gives the same lr after a restore
    sched.drops = 1
    assert sched.lr_at(2) == pytest.approx(0.04) and sched.lr_at(100) == pytest.approx(0.08)
    restored = schedule(steps_per_epoch=4, base_lr=0.8, warmup_epochs=1.5, warmup_start_factor=0.25)
    restored.load_state_dict(sched.state_dict())
    assert [restored.lr_at(s) for s in range(9)] == [sched.lr_at(s) for s in range(9)]


def test_no_drop_before_min_epochs_after_warmup():
    sched = schedule(patience=1, min_epochs_before_drop=4, warmup_epochs=2, cooldown=0, threshold=0.0)
    decisions = [sched.step(80.0) for _ in range(6)]  # flat from the first epoch
    # epochs 1-2 are warmup; epochs 3-5 are 1-3 epochs after it; the drop comes at epoch 6
    assert decisions == [None, None, None, None, None, "drop"] and sched.drops == 1


def test_only_improvements_beyond_the_threshold_reset_patience():
    sched = schedule(patience=3, min_epochs_before_drop=0, cooldown=0, threshold=0.01)
    sched.step(50.0)
    # creeping by less than 1% of the best (50 -> 49.5 is the bar): no reset; a drop at the third
    assert [sched.step(e) for e in (49.8, 49.6, 49.55)] == [None, None, "drop"]
    sched2 = schedule(patience=3, min_epochs_before_drop=0, cooldown=0, threshold=0.01)
    sched2.step(50.0)
    assert [sched2.step(e) for e in (49.0, 48.0, 47.0)] == [None, None, None]  # 2% a step: real progress


def test_cooldown_then_max_drops_then_finish():
    sched = schedule(patience=2, min_epochs_before_drop=0, cooldown=2, threshold=0.0, max_drops=2)
    sched.step(40.0)
    decisions = [sched.step(40.0) for _ in range(12)]
    # drop after 2 flat epochs, 2 cooldown epochs unjudged, 2 flat, drop, 2 cooldown, 2 flat: finish
    assert decisions[:10] == [None, "drop", None, None, None, "drop", None, None, None, "finish"]
    assert sched.finished and sched.drops == 2 and sched.lr == pytest.approx(1e-4)
    restored = schedule()
    restored.load_state_dict(sched.state_dict())
    assert restored.state_dict() == sched.state_dict()


def test_stall_rule_counts_epochs_after_warmup_and_names_the_figures():
    recipe = Recipe(stall_epochs=2, chance_margin=2.0, optim=Optim(warmup_epochs=1.5))
    assert stall_reason(89.0, 10, 3, recipe) is None  # 2 warmup epochs + 1: too early to judge
    why = stall_reason(89.0, 10, 4, recipe)
    assert why and "89.00%" in why and "90.00% for 10 classes" in why and "4 epochs" in why
    assert stall_reason(87.9, 10, 4, recipe) is None  # more than 2 points below chance: learning
    assert stall_reason(99.0, 10, 40, Recipe(stall_epochs=0)) is None  # 0: off


class Exploding(nn.Module):
    """Finite for `good` forward passes, then NaN."""

    def __init__(self, good: int):
        super().__init__()
        self.fc, self.calls, self.good = nn.Linear(3 * 32 * 32, 4), 0, good

    def forward(self, x):
        self.calls += 1
        out = self.fc(x.flatten(1))
        return out * float("nan") if self.calls > self.good else out


def test_non_finite_loss_stops_at_the_next_sync_naming_the_steps_and_before_a_checkpoint():
    model = Exploding(good=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = []
    with pytest.raises(NonFiniteLoss, match=r"\[A\] epoch 2: loss became non-finite between steps 3 and 4"):
        train_one_epoch(model, batches(8), opt, torch.device("cpu"), log_every=2, where="[A] epoch 2: ",
                        checkpoint_every=4, on_checkpoint=saved.append)
    assert saved == []  # the checkpoint at step 4 comes after the sync that caught the NaN
    assert model.calls == 4  # stopped at the sync after step 4, not at the end of the epoch


def test_sync_points_log_interval_figures_and_resumed_steps_count_on():
    model = build_model("A", num_classes=4, width_mult=0.125, input_size=32, init="kaiming")
    opt = make_optimizer(model, Optim(lr=0.01), 4)
    records, saved, lrs = [], [], []
    stats = train_one_epoch(model, batches(5), opt, torch.device("cpu"), log_every=2, on_log=records.append,
                            checkpoint_every=3, on_checkpoint=saved.append, start_step=6,
                            lr_at=lambda s: lrs.append(s) or 0.001 * s)
    assert lrs == [6, 7, 8, 9, 10] and opt.param_groups[0]["lr"] == pytest.approx(0.010)
    assert saved == [9] and stats.steps == 5 and stats.images == 20
    # steps 7-11 run; syncs after 8 (log), 9 (checkpoint), 10 (log) and 11 (the epoch's end)
    assert [r["step"] for r in records] == [8, 9, 10, 11] == [r["step"] for r in stats.step_log]
    assert [r["lr"] for r in records] == pytest.approx([0.007, 0.008, 0.009, 0.010])  # each interval's last
    assert all(r["train_loss"] > 0 and r["images_per_sec"] > 0 and 0 <= r["data_wait_fraction"] <= 1
               for r in records)
    per_step = [r["train_loss"] for r in records]
    assert stats.loss == pytest.approx((per_step[0] * 2 + sum(per_step[1:])) / 5)  # intervals of 2, 1, 1, 1
    result = evaluate(model, batches(3), torch.device("cpu"))
    assert result["images"] == 12 and 0 <= result["top1_error"] <= 100


# ---------------------------------------------------------------- no host round trips, placement (issue 20)


class HostTraffic:
    """Counts the ops that carry a value between the host and the tensors' device:
    a tensor made from host data (torch.tensor, new_tensor) and a value read back
    (.item(), .tolist(), bool(t)). On a GPU each is a copy that waits for the stream."""

    KINDS = ("aten.lift_fresh", "aten._local_scalar_dense")

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func).startswith(HostTraffic.KINDS):
                    outer.ops.append(str(func))
                return func(*args, **(kwargs or {}))

        self.ops, self._mode = [], Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


@pytest.mark.parametrize("loop", ["train", "evaluate"])
def test_no_step_copies_a_value_from_the_host(loop):
    """Host traffic is the same for 2 steps as for 6: none of it is per step (it was a
    new_tensor(n) per training step and per evaluation batch)."""
    def traffic(steps: int) -> list[str]:
        torch.manual_seed(0)
        model = build_model("A", num_classes=4, width_mult=0.125, input_size=32, init="kaiming")
        opt = make_optimizer(model, Optim(lr=0.001), 4)
        data = batches(steps)
        with HostTraffic() as seen:
            if loop == "train":
                train_one_epoch(model, data, opt, torch.device("cpu"), log_every=0)
            else:
                evaluate(model, data, torch.device("cpu"))
        return seen.ops

    assert traffic(2) == traffic(6)


def test_ddp_bucket_view_gradients_are_zeroed_in_place_not_remade():
    """With DDP's gradient_as_bucket_view the gradients are views of its buckets.
    zero_grad(set_to_none=True) destroyed that alias every step, so each backward made a
    new gradient and DDP copied it into the bucket (torch's DDP docs, batched_grad_copy).
    Seen from a gradient hook (it runs before the new gradient is accumulated): the
    parameter still holds its bucket view, the same one every step."""
    import tempfile

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)

    def held_at_backward(net, param, steps):
        held = []
        param.register_hook(lambda g: held.append(param.grad))
        train_one_epoch(net, batches(steps), make_optimizer(net, Optim(lr=0.001), 4), torch.device("cpu"),
                        log_every=0)
        return held

    model = build_model("A", num_classes=4, width_mult=0.125, input_size=32, init="kaiming")
    net = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    held = held_at_backward(net, model.features.conv1_1.weight, 4)
    # DDP makes the views in the first backward; from the second step on they are kept
    assert len(held) == 4 and held[1] is not None and all(g is held[1] for g in held[1:])
    plain = build_model("A", num_classes=4, width_mult=0.125, input_size=32, init="kaiming")
    held = held_at_backward(plain, plain.features.conv1_1.weight, 3)
    assert held == [None, None, None]  # without DDP's buckets: set_to_none, torch's default


def test_training_and_evaluation_make_no_tensor_at_the_default_dtype_or_device():
    """A float64 net on float64 batches while the default dtype stays float32, and the
    default device `meta` while every module checks its tensors against its input's."""
    from placement import elsewhere_by_default

    torch.manual_seed(0)
    model = build_model("A", num_classes=4, width_mult=0.125, input_size=32, init="kaiming").double()
    opt = make_optimizer(model, Optim(lr=0.001), 4)
    data = [(x.double(), y) for x, y in batches(3)]
    before = model.classifier.fc8.weight.clone()
    with elsewhere_by_default() as checked:
        stats = train_one_epoch(model, data, opt, torch.device("cpu"), log_every=2)
        result = evaluate(model, data, torch.device("cpu"))
    assert torch.get_default_dtype() == torch.float32
    assert stats.images == 12 and result["images"] == 12 and "Conv2d" in checked and "Linear" in checked
    assert model.classifier.fc8.weight.dtype == torch.float64 and not torch.equal(before, model.classifier.fc8.weight)


def test_the_gpu_recipe_runs_on_the_cpu_when_asked():
    """bf16 autocast and the fused SGD step are reachable on the CPU (CI's rehearsal of
    the GPU path), not silently dropped; "auto" keeps fp32 and foreach there."""
    torch.manual_seed(0)
    model = build_model("A", num_classes=4, width_mult=0.125, input_size=32, init="kaiming")
    model = model.to(memory_format=torch.channels_last)
    assert make_optimizer(model, Optim(), 4).defaults["foreach"] is True
    opt = make_optimizer(model, Optim(lr=0.01, impl="fused"), 4)
    assert opt.defaults["fused"] is True
    seen = []
    model.features.conv1_1.register_forward_hook(lambda m, i, o: seen.append((o.dtype, i[0].is_contiguous(
        memory_format=torch.channels_last))))
    before = model.features.conv1_1.weight.clone()
    stats = train_one_epoch(model, batches(2), opt, torch.device("cpu"), precision="bf16", channels_last=True,
                            log_every=0)
    assert seen == [(torch.bfloat16, True)] * 2 and stats.loss > 0
    assert model.features.conv1_1.weight.dtype == torch.float32 and not torch.equal(before, model.features.conv1_1.weight)
    seen.clear()
    evaluate(model, batches(1), torch.device("cpu"), precision="auto")
    assert seen == [(torch.float32, False)]
