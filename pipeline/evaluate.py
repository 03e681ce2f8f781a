"""`python -m pipeline evaluate`: a finished stage under the paper's test protocols.

The stage's configuration is read back from its MLflow run (tag `stage_config`),
its weights from the checkpoint the run points at. The validation split is cut
over `workers` Ray tasks (DALI shard = task index), each returning its images'
posteriors with their keys; the driver checks that every image came back exactly
once, then logs `<protocol>_Q<scales>/top1_error` and `/top5_error` to the same
run and the posteriors as `posteriors/<protocol>_Q<scales>.parquet` (float16),
which ensembles average without re-running a net. A multi-scale evaluation also logs
each of its scales on its own (`dense_Q384/...`: Table 3's number comes with Table 4's).
The default protocol is the paper's: dense, with the flipped image averaged in.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import from_dict
from pipeline.stages import Stage

POSTERIORS_DIR = "posteriors"


def stage_from_run(run) -> Stage:
    raw = run.data.tags.get("stage_config")
    if not raw:
        raise ValueError(f"run {run.info.run_id} is not a stage run (no stage_config tag)")
    return from_dict(Stage, json.loads(raw), "stage_config")


def load_stage_model(stage: Stage, checkpoint):
    """The stage's net with the weights of `checkpoint` (a ray.train.Checkpoint or its URI), in eval mode."""
    from pipeline.models import build_model, load_state
    from pipeline.worker import checkpoint_from_uri, load_checkpoint_model

    if isinstance(checkpoint, str):
        checkpoint = checkpoint_from_uri(checkpoint)
    state = load_checkpoint_model(checkpoint)
    r = stage.recipe
    model = build_model(stage.arch, num_classes=state["num_classes"], width_mult=r.width_mult,
                        batch_norm=r.batch_norm, input_size=r.crop, dropout=r.dropout)
    model.load_state_dict(load_state(state))
    return model.eval()


def stage_bundle(stage: Stage, checkpoint, data_root: str | None = None):
    """(nets, members, classes) for a registered model that classifies images on its own
    (pipeline/serving.py): the stage's net, its evaluation preprocessing (Q, crop, the
    training mean and std) and the class names, from the checkpoint (or, for checkpoints
    from before they carried them, from the shards at `data_root`); None if neither has them."""
    from pipeline.serving import Member
    from pipeline.worker import checkpoint_from_uri, load_checkpoint_model

    if isinstance(checkpoint, str):
        checkpoint = checkpoint_from_uri(checkpoint)
    state = load_checkpoint_model(checkpoint)
    mean, std, classes = state.get("mean_rgb"), state.get("std_rgb"), state.get("classes")
    if mean is None and data_root:
        from pipeline.dataset import DatasetInfo

        try:
            info = DatasetInfo.load(data_root)
            mean, std = info.mean_rgb, info.std_rgb if stage.recipe.normalize_std else None
            classes = json.loads((Path(data_root) / "classes.json").read_text())
        except (OSError, ValueError):
            return None
    if mean is None:
        return None
    r = stage.recipe
    member = Member(stage.arch, state["num_classes"], r.width_mult, r.batch_norm, r.crop, stage.eval_scale,
                    tuple(mean), tuple(std) if std else None)
    return [load_stage_model(stage, checkpoint)], [member], classes or []


PROGRESS_EVERY_S = 10.0


class Progress:
    """One line every `every` seconds while an evaluation runs: images done of the
    protocol's passes over the split (a pass per scale and per protocol part), and an
    ETA from the rate so far."""

    def __init__(self, what: str, total: int, every: float | None = None, out=None):
        self.what, self.total, self.out = what, total, out or sys.stdout
        self.every = PROGRESS_EVERY_S if every is None else every
        self.done, self.start, self.last = 0, time.monotonic(), time.monotonic()

    def add(self, images: int) -> None:
        self.done += images
        now = time.monotonic()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            share = 100 * self.done / self.total
            self.out.write(f"{self.what}: {self.done:,} of {self.total:,} images ({share:.0f}%), "
                           f"{rate:.0f} img/s, ETA {(self.total - self.done) / max(rate, 1e-9) / 60:.1f} min\n")
            self.out.flush()


class _Sender:
    """A task's image counts to the driver's queue, at most once a second: each send is a
    round trip to the queue's actor, which the evaluation loop should not pay per batch.
    (What is held back at the end is not sent: the driver's line is a progress estimate,
    and the task's return value is the count that matters.)"""

    def __init__(self, queue, every: float = 1.0):
        self.queue, self.every, self.held, self.last = queue, every, 0, float("-inf")  # the first batch at once

    def add(self, images: int) -> None:
        self.held += images
        if time.monotonic() - self.last >= self.every:
            self.queue.put_nowait(self.held)
            self.held, self.last = 0, time.monotonic()


def _stage_posteriors(stage: Stage, checkpoint: str, root: str, split: str, parts: str, scales: list[int],
                      rank: int, world: int, batch_size: int, threads: int, progress=None):
    """This rank's posteriors of each pass in `parts` ("dense+multicrop": both passes) at
    each Q, keyed (pass, Q); `progress`: a Progress (in this process) or a Ray queue that
    the driver reads (in a Ray task)."""
    from pipeline.dataset import DatasetInfo
    from pipeline.protocols import parts_by_scale

    device = torch.device("cuda" if stage.resources.use_gpu and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, threads))
    on_images = progress.add if isinstance(progress, Progress) else (
        _Sender(progress).add if progress is not None else None)
    return parts_by_scale(load_stage_model(stage, checkpoint), DatasetInfo.load(root), split, parts.split("+"),
                          scales, crop=stage.recipe.crop, normalize_std=stage.recipe.normalize_std, rank=rank,
                          world=world, device=device, batch_size=batch_size, threads=threads, on_images=on_images)


def run_parts_by_scale(stage: Stage, checkpoint: str, root: str, split: str, parts: list[str],
                       scales: list[int], *, workers: int = 1, batch_size: int = 32,
                       ray_address: str | None = None) -> dict:
    """All of the split's posteriors of each pass at each Q, keyed (pass, Q): one Ray task
    per shard of the split when workers > 1, else in this process. Every image exactly
    once, or an error."""
    from pipeline.dataset import DatasetInfo
    from pipeline.protocols import Posteriors

    info = DatasetInfo.load(root)
    threads = max(1, int(stage.resources.cpus_per_worker))
    what = "+".join(parts)
    progress = Progress(f"evaluate {stage.name} {', '.join(parts)} Q={'-'.join(map(str, scales))}",
                        info.counts[split] * len(scales) * len(parts))
    if workers > 1:
        import ray
        from ray.util.queue import Empty, Queue

        if not ray.is_initialized():
            ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
        task = ray.remote(_stage_posteriors)
        counts = Queue(actor_options={"num_cpus": 0})  # images done, from every task
        names = {task.options(num_cpus=stage.resources.cpus_per_worker, num_gpus=1 if stage.resources.use_gpu else 0,
                              name=f"evaluate {stage.name} {what} {split} part {r + 1}/{workers}").remote(
            stage, checkpoint, root, split, what, scales, r, workers, batch_size, threads, counts): r
            for r in range(workers)}
        shares = [None] * workers
        waiting = list(names)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=2.0)
                try:
                    while True:
                        progress.add(counts.get_nowait())
                except Empty:
                    pass
                if not ready:
                    continue
                try:
                    shares[names[ready[0]]] = ray.get(ready[0])
                except Exception as exc:
                    for ref in waiting:  # the others' work is wasted once one part is missing
                        ray.cancel(ref, force=True)
                    cause = getattr(exc, "cause", None) or exc  # the task's own error, not Ray's wrapping of it
                    part = names[ready[0]] + 1
                    raise RuntimeError(f"evaluation task {part} of {workers} ({stage.name}, {what}, {split} part "
                                       f"{part}) failed; the other {len(waiting)} still running were cancelled: "
                                       f"{type(cause).__name__}: {str(cause)[:2000]}") from exc
        finally:
            counts.shutdown()
    else:
        shares = [_stage_posteriors(stage, checkpoint, root, split, what, scales, 0, 1, batch_size, threads,
                                    progress)]
    out = {}
    for key in shares[0]:
        post = Posteriors.concat([share[key] for share in shares])
        exactly_once(post, info, split, f"{key[0]} at Q={key[1]}")
        out[key] = post
    return out


def run_posteriors_by_scale(stage: Stage, checkpoint: str, root: str, split: str, protocol: str,
                            scales: list[int], *, workers: int = 1, batch_size: int = 32,
                            ray_address: str | None = None) -> dict:
    """All of the split's posteriors under `protocol` at each Q."""
    from pipeline.protocols import combine, protocol_parts

    parts = run_parts_by_scale(stage, checkpoint, root, split, protocol_parts([protocol]), scales, workers=workers,
                               batch_size=batch_size, ray_address=ray_address)
    return combine(parts, protocol, scales)


def exactly_once(post, info, split: str, protocol: str) -> None:
    """The keys the loaders returned, across every part, are the split's keys once each."""
    from pipeline.protocols import check_keys, rank_keys

    check_keys(post.keys, rank_keys(info, split, 0, 1), f"{protocol} over {split}: ")


def run_posteriors(stage: Stage, checkpoint: str, root: str, split: str, protocol: str, scales: list[int], *,
                   workers: int = 1, batch_size: int = 32, ray_address: str | None = None):
    """The split's posteriors under `protocol`, averaged over `scales`."""
    from pipeline.protocols import average_scales

    return average_scales(run_posteriors_by_scale(stage, checkpoint, root, split, protocol, scales, workers=workers,
                                                  batch_size=batch_size, ray_address=ray_address))


def evaluate_run(run_id: str, *, tracking_uri: str, protocol: str = "dense", scales: list[int] | None = None,
                 workers: int = 1, batch_size: int = 32, data_root: str | None = None, split: str = "val",
                 ray_address: str | None = None) -> dict:
    return evaluate_run_protocols(run_id, [protocol], tracking_uri=tracking_uri, scales=scales, workers=workers,
                                  batch_size=batch_size, data_root=data_root, split=split,
                                  ray_address=ray_address)[0]


def evaluate_run_protocols(run_id: str, protocols: list[str], *, tracking_uri: str, scales: list[int] | None = None,
                           workers: int = 1, batch_size: int = 32, data_root: str | None = None,
                           split: str = "val", ray_address: str | None = None) -> list[dict]:
    """Evaluate a finished stage run under each of `protocols`, each pass computed once:
    protocols at the same scales share their passes (dense, multicrop and dense+multicrop
    cost the dense and the multi-crop pass). Each protocol's figures and posteriors are
    logged to the run; one result per protocol, in order."""
    from pipeline.protocols import combine, default_scales, protocol_parts
    from pipeline.tracking import _client

    client = _client(tracking_uri)
    run = client.get_run(run_id)
    stage = stage_from_run(run)
    checkpoint = run.data.tags.get("checkpoint")
    if not checkpoint:
        raise ValueError(f"run {run_id}: stage {stage.name} has not finished (no checkpoint tag)")
    root = data_root or run.data.params.get("data.root")
    if not root:
        raise ValueError(f"run {run_id}: no data.root param; pass --data-root")
    at = {p: list(scales or default_scales(p, stage.scale_range, stage.eval_scale, stage.recipe.crop))
          for p in protocols}
    passes = {}
    for qs in dict.fromkeys(tuple(q) for q in at.values()):  # each set of scales once, its passes once
        group = [p for p in protocols if tuple(at[p]) == qs]
        passes[qs] = run_parts_by_scale(stage, checkpoint, root, split, protocol_parts(group), list(qs),
                                        workers=workers, batch_size=batch_size, ray_address=ray_address)
    return [_log_protocol(client, tracking_uri, run_id, stage.name, protocol,
                          combine(passes[tuple(at[protocol])], protocol, at[protocol]))
            for protocol in protocols]


def _log_protocol(client, tracking_uri: str, run_id: str, stage: str, protocol: str, by_scale: dict) -> dict:
    """One protocol's figures (over its scales, and each scale on its own) and posteriors,
    logged to the run."""
    from pipeline.protocols import average_scales, metric_prefix, write_parquet
    from pipeline.tracking import MetricsLogger

    scales = list(by_scale)
    post = average_scales(by_scale)
    result = post.errors()
    prefix = metric_prefix(protocol, scales)
    logged = {f"{prefix}/top1_error": result["top1_error"], f"{prefix}/top5_error": result["top5_error"]}
    per_scale = {}
    if len(scales) > 1:  # each scale on its own too (Table 3 is one of Table 4's scales)
        for q, p in by_scale.items():
            errors = average_scales({q: p}).errors()
            per_scale[q] = errors
            one = metric_prefix(protocol, [q])
            logged.update({f"{one}/top1_error": errors["top1_error"], f"{one}/top5_error": errors["top5_error"]})
    MetricsLogger(tracking_uri, run_id, enabled=True).log(logged, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{prefix}.parquet"
        write_parquet(post, path)
        client.log_artifact(run_id, str(path), POSTERIORS_DIR)
    return dict(result, metric_prefix=prefix, run_id=run_id, stage=stage, scales=scales, protocol=protocol,
                per_scale=per_scale)


def load_posteriors(client, run_id: str, prefix: str):
    """The posteriors a run stored for `prefix` (e.g. dense_Q256-384-512)."""
    from pipeline.protocols import read_parquet

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, f"{POSTERIORS_DIR}/{prefix}.parquet", tmp)
        except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            have = [os.path.basename(f.path) for f in client.list_artifacts(run_id, POSTERIORS_DIR)]
            raise ValueError(f"run {run_id} has no stored {prefix} posteriors (it has: {have or 'none'}); "
                             f"run `python -m pipeline evaluate --run-id {run_id} ...` first") from exc
        return read_parquet(local)
