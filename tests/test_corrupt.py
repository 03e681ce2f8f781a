"""A training sample that went bad after sharding (bit rot): the rank that meets it
names shard and key from the failing micro-batches alone (the training source knows
which samples they hold; each image decoded alone: no scan of the split), and every
rank stops together at the next sync with that message, as a training failure; with
data.on_corrupt_sample=skip the stage trains through and counts it. Two real ranks
(torch.distributed over gloo, two processes) run the real stage loop on real DALI over a
copy of the test shards with one JPEG zeroed; no Ray (its seat is pipeline/worker.py's
few lines, exercised by the Ray tests)."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from services import free_port, tiny_plan

from pipeline.data import DatasetInfo, train_loader
from pipeline.dataset import _index_keys
from pipeline.elastic import audited
from pipeline.stages import load_plan

pytestmark = pytest.mark.slow  # two spawned ranks (torch, DALI), three tiny epochs: 7 s idle, 60 s on a busy machine


def corrupt_copy(shards: Path, dest: Path, tar_name: str = "train-000003", line: int = 4) -> tuple[Path, str]:
    """A copy of the shard set with one training JPEG's bytes zeroed past its header."""
    copy = dest / "shards"
    shutil.copytree(shards, copy)
    tar = copy / "train" / f"{tar_name}.tar"
    fields = (copy / "train" / f"{tar_name}.idx").read_text().splitlines()[line].split()
    at = fields.index("jpg")
    offset, size, name = int(fields[at + 1]), int(fields[at + 2]), fields[at + 3]
    data = bytearray(tar.read_bytes())
    data[offset + 100 : offset + size] = b"\0" * (size - 100)
    tar.write_bytes(bytes(data))
    return tar, name.split(".")[0]


def _rank(rank: int, port: int, configs: list[dict], out) -> None:
    """One rank: each config's stage in turn, in one process (one start-up for all)."""
    import torch.distributed as dist

    from pipeline.stageloop import Seat, run_stage

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    for i, config in enumerate(configs):
        reports: list = []

        def report(metrics: dict, checkpoint_dir) -> None:
            reports.append(metrics)
            if checkpoint_dir is not None:  # the seat's to delete, as Ray Train does once uploaded
                shutil.rmtree(checkpoint_dir)

        seat = Seat(rank=rank, world=2, device=torch.device("cpu"), report=report,
                    wrap=torch.nn.parallel.DistributedDataParallel)
        start = time.monotonic()
        try:
            result = run_stage(config, seat)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            result = {"kind": "raised", "reason": f"{type(exc).__name__}: {exc}"}
        out.put((i, rank, result, time.monotonic() - start, [m.get("skipped_samples") for m in reports]))
    dist.destroy_process_group()


def run_two_ranks(configs: list[dict]) -> list[dict]:
    """[{rank: (result, seconds, each report's skipped_samples)}] per config. A rank left
    waiting in a collective would hold its result back until the timeout here fails it."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, configs, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    got: list[dict] = [{} for _ in configs]
    try:
        for _ in range(2 * len(configs)):
            i, rank, result, seconds, skipped = out.get(timeout=240)
            got[i][rank] = (result, seconds, skipped)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return got


def test_a_corrupt_sample_stops_every_rank_together_naming_it_or_is_skipped_and_counted(shards, tmp_path):
    tar, key = corrupt_copy(shards, tmp_path)
    plan = load_plan(tiny_plan(tmp_path, tar.parent.parent, name="bad", experiment="bad", epochs=2,
                               log_every_steps=4, stages={"A": {"arch": "A", "scale": 36}}))
    stage, data = plan.stages["A"], plan.data
    failing, skipping = run_two_ranks([{"stage": stage, "data": data},
                                       {"stage": stage, "data": replace(data, on_corrupt_sample="skip")}])
    got = failing
    for rank in (0, 1):
        result, seconds, _ = got[rank]
        assert result["kind"] == "corrupt" and result["epoch"] == 1, result
        assert f"sample {key!r} in shard {tar} cannot be decoded" in result["reason"], result
        assert "data.on_corrupt_sample=skip" in result["reason"]
        assert seconds < 60, seconds  # the whole stage: set up, train until the sample, locate, stop
    assert abs(got[0][1] - got[1][1]) < 10  # together, not one rank waiting for a collective's timeout

    for rank in (0, 1):
        result, _, skipped = skipping[rank]
        assert result is None, result
        # epoch 1 met it once (on one rank; 144 images, 9 whole steps: none left out); epoch 2 reads past it
        # from the start, silently, on whichever rank the order puts it
        assert [s for s in skipped if s is not None] == [1, 0], skipped


def test_skip_mode_reads_the_next_sample_in_the_corrupt_ones_place_and_keeps_every_other(shards, tmp_path):
    """Found from its micro-batch alone and read past without moving any other sample: the
    keys of every batch match the clean shards' except the corrupt sample's slot, which
    holds the next sample of its shard. Without skip mode the rank that meets it yields
    placeholders (zeros) to the epoch's end and says why (`failure`)."""
    tar, key = corrupt_copy(shards, tmp_path)
    keys = _index_keys(str(tar.with_suffix(".idx")))
    args = dict(world_size=2, batch_size=8, scale_range=(36, 36), crop=32, threads=1, seed=0, epoch=0)

    def read(ld) -> list[list[str]]:
        return [list(ld.batch_keys) for _ in ld]

    met = []
    for rank in (0, 1):
        clean = read(train_loader(DatasetInfo.load(shards), "train", rank=rank, **args))
        ld = train_loader(DatasetInfo.load(tar.parent.parent), "train", rank=rank, skip_corrupt=True, **args)
        started = time.monotonic()
        got = read(ld)
        assert time.monotonic() - started < 30
        assert len(got) == len(clean) and ld.failure is None
        differ = [(a, b) for a, b in zip(sum(clean, []), sum(got, [])) if a != b]
        if ld.skipped:
            met.append(rank)
            assert [(t, k) for t, k, _ in ld.skipped] == [(str(tar), key)]
            assert differ == [(key, keys[keys.index(key) + 1])]
            # through the keys audit (data.keys_log), as the stage loop hands it to the engine
            failing = audited(train_loader(DatasetInfo.load(tar.parent.parent), "train", rank=rank, **args),
                              str(tmp_path / "keys"), "A", 0, 0, 1)
            batches = [images for images, _ in failing]
            assert len(batches) == len(clean) and failing.skipped == []
            assert f"sample {key!r} in shard {tar} cannot be decoded" in str(failing.failure)
            at = next(i for i, ks in enumerate(clean) if key in ks)
            (log,) = (tmp_path / "keys").iterdir()  # the batches read are audited, the placeholders not
            assert [ln.split()[2] for ln in log.read_text().splitlines()] == sum(clean[:at], [])
            assert all(float(b.abs().sum()) == 0 for b in batches[at:])  # placeholders from the failing batch on
            assert all(float(b.abs().sum()) > 0 for b in batches[:at])
        else:
            assert differ == []
    assert len(met) == 1  # one rank reads each sample of an epoch
    assert key in keys  # the shard itself is left as it is


def test_a_corrupt_sample_books_the_stage_failed_naming_it_and_a_rerun_resumes_it(shards, tmp_path, mlflow_uri):
    """Not a training failure: the recipe is fine, so the same plan run (after a re-shard,
    or with skipping on) resumes the stage in its MLflow run instead of refusing it."""
    from concurrent.futures import Future

    from pipeline.booking import book, stage_tags
    from pipeline.runner import _attempt
    from pipeline.tracking import Tracker
    from pipeline.worker import StageOutcome

    plan = load_plan(tiny_plan(tmp_path, shards, name="bad", experiment="bad", stages={"A": {"arch": "A",
                                                                                             "scale": 36}}))
    stage, tracker = plan.stages["A"], Tracker(mlflow_uri, "bad")
    parent, _ = tracker.parent_run("bad-1", {}, {})
    srun = tracker.stage_run(parent, "bad-1", "A", {}, stage_tags(plan, stage))
    reason = "DALI train pipeline over x: sample 'k1' in shard /s/train-000003.tar cannot be decoded (why)"
    done: Future = Future()
    done.set_result(StageOutcome(None, {}, {"kind": "corrupt", "epoch": 1, "reason": reason}))
    failed, said = {}, []
    result = book(tracker, plan, stage, srun, done, "bad-1", {}, failed, said.append)
    assert result.status == "failed (corrupt sample)" and "sample 'k1' in shard /s/train-000003.tar" in said[0]
    assert "--run-name bad-1" in said[0] and "data.on_corrupt_sample=skip" in said[0]
    run = tracker.client.get_run(srun.run_id)
    assert run.info.status == "FAILED" and run.data.tags["data_failure"] == reason
    assert "failure_kind" not in run.data.tags and "stage_status" not in run.data.tags
    again = tracker.stage_run(parent, "bad-1", "A", {}, stage_tags(plan, stage))
    assert again.run_id == srun.run_id and not again.finished
    attempt = _attempt(tracker, plan, stage, again, parent, "bad-1", {}, {})
    assert not isinstance(attempt, str) and attempt[1] == "bad-1-A"  # the same Ray Train run: resumed
    # ... its booking fails once (as booking_failed marks it), and then it is booked: its run
    # no longer reads as failed, and both reasons are kept apart, oldest first
    tracker.fail(srun.run_id, "stage A could not be booked: OperationalError: database is locked")
    assert reason in tracker.client.get_run(srun.run_id).data.tags["earlier_failure"]
    tracker.finish_stage(srun.run_id, {"top1_error": 0.5, "top5_error": 0.1}, "file:///ckpt")
    run = tracker.client.get_run(srun.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stage_status"] == "finished"
    assert not {"failure", "data_failure", "failure_epoch"} & set(run.data.tags), run.data.tags
    earlier = run.data.tags["earlier_failure"].splitlines()
    assert reason in earlier[0] and earlier[-1].endswith("database is locked"), earlier


def test_the_error_naming_a_sample_survives_the_trip_from_a_ray_task():
    """Evaluation runs in Ray tasks, which pickle a task's exception to the driver: an
    exception whose constructor takes more than its message must say how to rebuild it
    (Ray reported "UnserializableException" instead of the sample before it did)."""
    import pickle

    from pipeline.loader import CorruptSample

    error = CorruptSample("eval pipeline over /x/val", [("/x/val/val-000001.tar", "n9_val_00002", "bad Huffman")], (7,))
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is CorruptSample and str(back) == str(error)
    assert back.culprits == error.culprits and back.rows == (7,)
