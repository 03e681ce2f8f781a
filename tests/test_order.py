"""The global data order, positions that survive a change of world size, and gradient
accumulation, without Ray: the real DALI loaders on the test shards, the real stage loop.
(The elastic run on a two-node Ray cluster: tests/test_elastic.py.)"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from services import tiny_plan

from pipeline.data import DatasetInfo, train_loader
from pipeline.order import split_batch
from pipeline.position import fingerprint, record, resume_at

ARGS = dict(scale_range=(40, 56), crop=32, threads=1, seed=3)


def _keys(info, *, world: int, global_batch: int, max_micro: int | None = None, epoch: int = 0,
          start: int = 0, stop: int | None = None) -> list[list[str]]:
    """Per rank, the keys the loader returned (through the graph), micro-step by micro-step."""
    layout = split_batch(global_batch, world, max_micro)
    out = []
    for rank in range(world):
        ld = train_loader(info, "train", rank=rank, world_size=world, batch_size=layout.micro, layout=layout,
                          epoch=epoch, start_step=start, **ARGS)
        keys = []
        for i, (images, labels) in enumerate(ld):
            if stop is not None and start + i >= stop:
                break
            assert len(ld.batch_keys) == labels.shape[0] == images.shape[0]
            keys.append(list(ld.batch_keys))
        out.append(keys)
    return out


def _per_step(keys: list[list[list[str]]], accumulate: int) -> list[set[str]]:
    steps = len(keys[0]) // accumulate
    return [{k for rank in keys for micro in rank[s * accumulate:(s + 1) * accumulate] for k in micro}
            for s in range(steps)]


def test_every_world_size_reads_the_same_images_in_the_same_steps(shards):
    """144 training images, global batch 16: 9 steps of the same 16 images on 1 worker, on
    2, on 3 (shares of 6, 5 and 5 images) and on 2 workers in micro-batches of 3 (8 a step
    each, as 3 + 3 + 2); every image at most once, 144 in all (9 x 16)."""
    info = DatasetInfo.load(shards)
    one = _per_step(_keys(info, world=1, global_batch=16), 1)
    assert len(one) == 9 and all(len(s) == 16 for s in one)
    assert len(set().union(*one)) == 144
    for world, max_micro in ((2, None), (3, None), (2, 3)):
        layout = split_batch(16, world, max_micro)
        got = _keys(info, world=world, global_batch=16, max_micro=max_micro)
        assert _per_step(got, layout.accumulate) == one, (world, max_micro)
        assert sum(Counter(k for rank in got for m in rank for k in m).values()) == 144
    # the order is a function of (seed, epoch): another epoch, another order of the same images
    other = _per_step(_keys(info, world=1, global_batch=16, epoch=1), 1)
    assert other != one


def test_a_resume_at_another_world_size_sees_the_rest_of_the_epoch_once(shards):
    """Checkpointed after 4 of 9 steps on 2 workers; resumed on 1 worker whose memory takes
    8 images a micro-batch (16 a step = 2 micro-batches): the images of the two parts are
    disjoint, and together they are the epoch's, each exactly once."""
    info = DatasetInfo.load(shards)
    before = _keys(info, world=2, global_batch=16, stop=4)
    after = _keys(info, world=1, global_batch=16, max_micro=8, start=4 * 2)
    seen = Counter(k for part in (before, after) for rank in part for m in rank for k in m)
    whole = Counter(k for rank in _keys(info, world=1, global_batch=16) for m in rank for k in m)
    assert seen == whole and set(seen.values()) == {1} and sum(seen.values()) == 144


def test_a_skipped_sample_is_read_as_the_next_good_one_and_no_other_position_moves():
    """Skip mode's substitution in the source (no DALI): each bad row reads as the next
    good row in shard order (a run of bad rows is passed over, the last wraps round),
    every other position reads its own sample, and a resumed source keeps the earlier ones."""
    import numpy as np

    from pipeline.order import EpochSource, SampleTable

    n = 8
    table = SampleTable(("a.tar",), np.zeros(n, np.int32), np.zeros((n, 2), np.int64), np.zeros((n, 2), np.int64),
                        tuple(f"k{i}" for i in range(n)))
    order = np.array([7, 2, 3, 0, 5, 1, 4, 6])
    source = EpochSource(table, order, {}, split=split_batch(4, 1), rank=0, start=0, stop=2, bad=frozenset({2, 3}))
    assert source.rows(0) + source.rows(1) == [7, 4, 4, 0, 5, 1, 4, 6]
    later = source.resumed(1, frozenset({7}))
    assert later.start == 1 and later.bad == {2, 3, 7} and later.rows(0) == [0, 4, 4, 0]
    with pytest.raises(ValueError, match="every sample"):
        EpochSource(table, order, {}, split=split_batch(4, 1), rank=0, start=0, stop=2, bad=frozenset(range(n)))


def test_split_batch_arithmetic_and_refusals():
    s = split_batch(256, 8)
    assert (s.micro, s.accumulate, s.even) == (32, 1, True)
    s = split_batch(256, 3, max_micro=32)  # shares 86, 85, 85 in 3 micro-batches of <= 29
    assert [s.share(r) for r in range(3)] == [86, 85, 85] and s.accumulate == 3 and s.micro == 29
    assert sum(s.size(k, r) for k in range(3) for r in range(3)) == 256 and not s.even
    # micro-step positions tile each global batch: micro-batch k of every rank, rank by rank
    covered = [p for t in range(2 * 3) for r in range(3) for p in range(*s.positions(t, r).indices(10 ** 6))]
    assert covered == list(range(2 * 256))
    with pytest.raises(ValueError, match="batch_size 4 is smaller than 5 workers"):
        split_batch(4, 5)
    with pytest.raises(ValueError, match="last micro-batch would be empty; raise max_worker_batch"):
        split_batch(7, 2, max_micro=1)  # shares 4 and 3 in 4 micro-batches of 1: rank 1's fourth is empty


def test_plans_refuse_what_no_world_size_in_range_can_honour(tmp_path, shards):
    from pipeline.config import ConfigError
    from pipeline.stages import load_plan

    path = tiny_plan(tmp_path, shards, name="el", experiment="el", stages={"A": {"arch": "A", "scale": 36}})
    plan = load_plan(path, ["resources.num_workers=[1,3]", "resources.max_worker_batch=4"])
    res = plan.stages["A"].resources
    assert res.elastic and res.worker_range == (1, 3) and res.max_preemption_failures == -1
    with pytest.raises(ConfigError, match=r"batch_size 16 is smaller than 17 workers.*allows \[1, 20\]"):
        load_plan(path, ["resources.num_workers=[1,20]"])
    with pytest.raises(ConfigError, match=r"num_workers: expected .* got \[2, 1\]"):
        load_plan(path, ["resources.num_workers=[2,1]"])


def test_resume_decisions_resize_refuse_and_record():
    from pipeline.order import SampleTable

    import numpy as np
    from pipeline.stages import Optim, Recipe

    table = SampleTable(("a.tar",), np.zeros(100, np.int32), np.zeros((100, 2)), np.zeros((100, 2)),
                        tuple(f"k{i}" for i in range(100)))
    recipe = Recipe(batch_size=10, optim=Optim(lr=0.1))
    fp = fingerprint(recipe, table)
    two, one = split_batch(10, 2), split_batch(10, 1, max_micro=5)
    mid = {"epoch": 3, "step": 4, "position": record(two, 10, 4, fp)}
    at = resume_at(mid, split=one, steps_per_epoch=10, fp=fp)
    assert (at.epoch, at.step, at.refused) == (3, 4, None)
    (event,) = at.events
    assert event["kind"] == "resize" and "2 -> 1 workers" in event["text"] and "image 40" in event["text"]
    # a drain notice recorded in the checkpoint is the resize's cause
    noticed = dict(mid, position=record(two, 10, 4, fp, preempted={"nodes": ["ab12cd34"], "deadline_ms": 1}))
    assert "preemption notice (nodes ab12cd34)" in resume_at(noticed, split=one, steps_per_epoch=10, fp=fp).events[0][
        "text"]
    # the global batch changed: mid-epoch refused with the reason, at an epoch's end resumed and recorded
    fp20 = fingerprint(replace(recipe, batch_size=20), table)
    refused = resume_at(mid, split=split_batch(20, 1), steps_per_epoch=5, fp=fp20).refused
    assert "mid-epoch (epoch 4, step 4 of 10, 40 images seen)" in refused and "batch_size: 10 -> 20" in refused
    end = {"epoch": 3, "step": 10, "position": record(two, 10, 10, fp)}
    at = resume_at(end, split=split_batch(20, 2), steps_per_epoch=5, fp=fp20)
    assert (at.epoch, at.step, at.refused) == (4, 0, None) and at.events[0]["kind"] == "recipe_change"
    fp_lr = fingerprint(replace(recipe, optim=Optim(lr=0.2)), table)
    assert "optim.lr: 0.1 -> 0.2" in resume_at(mid, split=two, steps_per_epoch=10, fp=fp_lr).refused
    # checkpoints from before positions were recorded: an epoch end resumes, a mid-epoch one cannot
    assert resume_at({"epoch": 2, "step": 7, "reported": {"val_top1_error": 50.0}}, split=two, steps_per_epoch=10,
                     fp=fp).epoch == 3
    assert "before checkpoints recorded" in resume_at({"epoch": 2, "step": 7, "reported": {}}, split=two,
                                                      steps_per_epoch=10, fp=fp).refused


def test_accumulated_and_uneven_micro_batches_make_the_same_step():
    """One step of batch 12 equals the same 12 images in micro-batches (4 + 4 + 4, or the
    uneven 5 + 4 + 3 weighted by their sizes): the same weights after two steps, up to
    float rounding."""
    from pipeline.engine import make_optimizer, train_one_epoch
    from pipeline.stages import Optim

    torch.manual_seed(0)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))

    def run(sizes: list[int], **kw) -> torch.Tensor:
        torch.manual_seed(1)
        model = torch.nn.Linear(6, 3)
        bounds = [0]
        for n in sizes * 2:
            bounds.append(bounds[-1] + n)
        batches = [(x[a:b], y[a:b]) for a, b in zip(bounds, bounds[1:])]
        train_one_epoch(model, batches, make_optimizer(model, Optim(lr=0.5, momentum=0.9), 12), torch.device("cpu"),
                        log_every=0, accumulate=len(sizes), **kw)
        return model.weight.detach()

    whole = run([12])
    assert torch.allclose(run([4, 4, 4]), whole, atol=1e-6)
    assert torch.allclose(run([5, 4, 3], global_batch=12), whole, atol=1e-6)
    assert not torch.allclose(run([5, 4, 3]), whole, atol=1e-4)  # unweighted, the shares would count unequally


def test_stage_loop_resumes_a_two_worker_mid_epoch_checkpoint_on_one_worker(tmp_path, shards, monkeypatch):
    """The stage loop itself: a checkpoint written at step 4 of epoch 1 by a 2-worker group
    (its ranks run here one after the other, without DDP) resumes on 1 worker with 8-image
    micro-batches: the same global batch and lr, a resize event for the stage's run, and
    every image of the epoch read exactly once across the two groups."""
    from pipeline.loader import Loader
    from pipeline.stageloop import Seat, read_checkpoint, run_stage
    from pipeline.stages import load_plan

    read: list[str] = []
    plain_iter = Loader.__iter__

    def counting(self):
        for batch in plain_iter(self):
            if self.epoch is not None:  # training loaders only
                read.extend(self.batch_keys)
            yield batch

    monkeypatch.setattr(Loader, "__iter__", counting)

    class Stop(Exception):
        pass

    plan = load_plan(tiny_plan(tmp_path, shards, name="rs", experiment="rs", epochs=1, log_every_steps=2,
                               checkpoint_every_steps=4, stages={"A": {"arch": "A", "scale": 36}}))
    stage = plan.stages["A"]
    saved: list = []

    def seat(rank: int, world: int, stop_at: int | None, resume=None, reports=None) -> Seat:
        def report(metrics: dict, checkpoint_dir: Path | None) -> None:
            if reports is not None:
                reports.append(metrics)
            if checkpoint_dir is not None:
                saved.append(read_checkpoint(checkpoint_dir))
                __import__("shutil").rmtree(checkpoint_dir)  # as Ray Train does once it has the folder
            if stop_at is not None and metrics.get("step") == stop_at:
                raise Stop  # the group is lost right after its mid-epoch checkpoint

        return Seat(rank=rank, world=world, device=torch.device("cpu"), report=report, wrap=lambda m: m,
                    resume=resume)

    for rank in (0, 1):
        with pytest.raises(Stop):
            run_stage({"stage": stage, "data": plan.data}, seat(rank, 2, stop_at=4))
    state = saved[0]
    assert state["position"]["world"] == 2 and state["position"]["images_seen"] == 64
    assert len(read) == 64 and len(set(read)) == 64
    one = replace(stage, resources=replace(stage.resources, num_workers=1, max_worker_batch=8))
    reports: list = []
    assert run_stage({"stage": one, "data": plan.data}, seat(0, 1, None, resume=state, reports=reports)) is None
    counts = Counter(read)
    assert len(counts) == 144 and set(counts.values()) == {1}  # 9 steps x 16: each image once
    (event,) = reports[0]["events"]
    assert event["kind"] == "resize" and event["step"] == 4 and "2 -> 1 workers" in event["text"]
    last = saved[-1]["position"]
    assert (last["world"], last["worker_batch"], last["accumulate"], last["global_batch"]) == (1, 8, 2, 16)
    assert all(r["world_size"] == 1 for m in reports for r in m.get("step_log", []))
    # the same lr (scaled to the global batch 16, not to a worker's share)
    lrs = [r["lr"] for m in reports for r in m.get("step_log", [])]
    assert lrs and all(lr == pytest.approx(0.1 * 16 / 256) for lr in lrs)
    # the same checkpoint under another global batch: refused with the reason, nothing trained
    bigger = replace(one, recipe=replace(one.recipe, batch_size=32))
    refused: list = []
    failure = run_stage({"stage": bigger, "data": plan.data}, seat(0, 1, None, resume=state, reports=refused))
    assert failure["kind"] == "refused" and "batch_size: 16 -> 32" in failure["reason"]
    assert refused == [{}]  # one report, as Ray Train expects of every rank, and no checkpoint
