"""Ray Train glue: one stage = one TorchTrainer run of `train_loop_per_worker`.

The only module that imports Ray Train. Each worker builds its net, reads its share
of each global batch of the epoch's order (pipeline/order.py: the same at any world
size), runs the engine's loops under DDP (gloo on CPU, NCCL on GPU, set up by Ray), and
reports; rank 0 attaches the checkpoint. A restarted or resized worker group resumes
from `ray.train.get_checkpoint()` at the same image (pipeline/position.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train

# No torch and no pipeline.stageloop at import: the driver's desk unpickles its actor
# from this module and needs neither (torch is 1.5-2.3 CPU-s on the CI machine; Ray
# Train's controller loads it anyway, through TorchConfig). The functions that read
# checkpoints or train import them.



class MlflowEpochMetrics(ray.train.UserCallback):
    """Hands rank 0's reports to the stage's MLflow sink (pipeline/metricsink.py): per-epoch
    figures with the epoch as step, the per-interval records each report carries
    (`step/train_loss`, `step/lr`, `step/images_per_sec`, `step/data_wait_fraction`) with
    the global step as step, each node's system figures, and the shard set as the run's
    dataset input. The callback never waits for MLflow: the sink lives on the driver's
    desk, a Ray actor on this node (or, in a test, is a plain MetricsSink), and its own
    thread sends and retries.

    Runs in the Ray Train controller, which Ray pins to the driver's node: on a cluster
    that is the head, where MLflow listens on 127.0.0.1, so workers never need a route to
    the tracking server. What a resumed run's checkpoint carried (`replay`: every report's
    figures since the stage began) goes first; the sink drops what MLflow already has."""

    def __init__(self, sink):
        self.sink = sink

    def after_report(self, run_context, metrics, checkpoint):
        from pipeline.metricsink import event_items, report_items, system_items

        items = []
        for rank in metrics:  # each node's system figures, from the worker that samples it
            if rank.get("system"):
                items += system_items(rank["system"])
        rank0 = dict(metrics[0])
        rank0.pop("system", None)
        replay = rank0.pop("replay", None)
        # a driver killed before these reached MLflow may never have logged them (a checkpoint
        # from before the history was kept carries its last report alone)
        for reported in ([replay] if isinstance(replay, dict) else replay or []):
            items += report_items(reported) + event_items(reported.get("events"))
        if "data_hash" in rank0:  # the shard set, as the run's MLflow dataset input
            items.append(("dataset", None, (rank0.pop("data_name"), rank0.pop("data_hash"), rank0.pop("data_root")), 0))
        items += report_items(rank0) + event_items(rank0.pop("events", None))
        self.sink.put(items)




def _quiet_ray_train_info() -> None:
    """Ray Train logs two INFO lines per report per worker; progress lines are ours.
    Its loggers are named by file path, so match those too."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.train") or "ray/train" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def _load_state(checkpoint) -> dict:
    """Everything a resume needs (both files of the checkpoint)."""
    from pipeline.stageloop import read_checkpoint

    with checkpoint.as_directory() as d:
        return read_checkpoint(Path(d), where=checkpoint_uri(checkpoint))


def _load_weights(checkpoint) -> dict:
    """The weights (and serving facts) alone: only the weights file is read from storage,
    not the optimizer state beside it (for init_from and booking). Checkpoints written
    before the split have no weights file: all of theirs is read."""
    import io

    import pyarrow.fs

    from pipeline.stageloop import WEIGHTS_FILE, load_checkpoint_file

    fs, path = checkpoint.filesystem, f"{checkpoint.path.rstrip('/')}/{WEIGHTS_FILE}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
        return _load_state(checkpoint)
    with fs.open_input_stream(path) as stream:
        data = io.BytesIO(stream.read())
    return load_checkpoint_file(data, f"{checkpoint_uri(checkpoint).rstrip('/')}/{WEIGHTS_FILE}")


def train_loop_per_worker(config: dict) -> dict | None:
    """Train one stage on this worker (pipeline/stageloop.py), seated by Ray Train: its
    rank, device, DDP wrap, reports, and the checkpoint to resume or start from. Returns
    (on rank 0) None when the stage finished, or {"kind": "stalled" | "diverged", "epoch":
    n, "reason": ...} when it must FAIL: a training failure is not a crash, so it is not
    retried from a checkpoint."""
    import ray.train.torch

    from pipeline.stageloop import Seat, run_stage

    _quiet_ray_train_info()
    ctx = ray.train.get_context()
    resume = ray.train.get_checkpoint()
    seat = Seat(rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=ray.train.torch.get_device(),
                report=_report,
                # Gradients as views of DDP's buckets: no copy into the buckets, less memory.
                wrap=lambda model: ray.train.torch.prepare_model(
                    model, parallel_strategy_kwargs={"gradient_as_bucket_view": True}),
                resume=_load_state(resume) if resume is not None else None,
                init=_load_weights(config["init_checkpoint"]) if config.get("init_checkpoint") is not None else None,
                node=ray.get_runtime_context().get_node_id()[:8], samples_node=ctx.get_local_rank() == 0,
                preemption=_preemption_notice, committed=_committed)
    return run_stage(config, seat)


def _committed(timeout_s: float) -> bool:
    """Whether Ray Train has committed every checkpoint reported so far, waiting up to
    `timeout_s` (a checkpoint written on a drain notice must be registered before the node goes)."""
    from ray.train import CheckpointConsistencyMode

    try:
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED,
                                               timeout_s=timeout_s)
        return True
    except Exception:  # noqa: BLE001 - a timeout, or the controller busy with the preemption: unconfirmed
        return False


def _preemption_notice() -> dict | None:
    """Ray Train's preemption info (a drained node of this group), the same on every rank:
    the call is a collective (rank 0's answer broadcast), so every rank must make it."""
    info = ray.train.get_preemption_info()
    if info is None:
        return None
    return {"deadline_ms": info.deadline_ms, "nodes": [n[:8] for n in info.preempted_node_ids],
            "ranks": info.preempted_ranks}


def _report(metrics: dict, checkpoint_dir: Path | None) -> None:
    """A report, and rank 0's checkpoint folder uploaded by Ray Train in the background
    (ASYNC: the ranks train on meanwhile; reports still reach the controller in order,
    each once its checkpoint is in storage) and deleted once uploaded. Ray Train waits for
    every upload before the stage's run ends."""
    from ray.train import CheckpointUploadMode

    if checkpoint_dir is None:
        ray.train.report(metrics)
        return
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                     checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=True)


@dataclass(frozen=True)
class StageOutcome:
    checkpoint: object  # ray.train.Checkpoint of the last epoch (after a failure: the last good one, or None)
    metrics: dict  # those reported with that checkpoint
    failure: dict | None = None  # {"kind", "epoch", "reason"} when training failed (stalled, diverged)
    tracking: "TrackingSink | None" = None  # the stage's figures on their way to MLflow: flush before booking


def stored_outcome(storage: str, trial_name: str) -> StageOutcome:
    """What Ray Train's run `trial_name` under `storage` ended with, read back without
    training: its latest checkpoint and the figures reported with it. This is what
    fit_stage returns when it resumes a stage whose last epoch is in that checkpoint
    (pipeline/stageloop.py books such a checkpoint as it is)."""
    from ray.train import Result

    _quiet_ray_train_info()  # its note that a run snapshot was found: this is a read, not a resume
    result = Result.from_path(f"{storage.rstrip('/')}/{trial_name}")
    if result.checkpoint is None or "val_top1_error" not in (result.metrics or {}):
        raise RuntimeError(f"Ray Train run {trial_name} under {storage} has no epoch-end checkpoint")
    return StageOutcome(result.checkpoint, dict(result.metrics))


def fit_stage(stage, data, *, trial_name: str, storage: str, tracking_uri: str | None, mlflow_run_id: str | None,
              init_checkpoint=None, init_layers=None, init_from_label: str | None = None,
              controls: "StageControls", step_lines: bool = True) -> StageOutcome:
    """Train one stage with Ray Train. Reusing `trial_name` under the same `storage`
    resumes that stage from its last checkpoint. `init_layers` overrides the stage's
    `init_from.layers` (a retry fine-tunes "all" of a failed attempt's last good weights).
    `step_lines=False` keeps the console to one line per epoch (stages running side by
    side); the step figures still go to MLflow. `controls` is the driver's desk, where
    the stage's controller announces itself and its MLflow sink lives."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from data_prep.store import data_hash

    try:  # the set every worker must have: the driver's (on a cluster, the head's stage-in)
        expected = data_hash(data.root)
    except (FileNotFoundError, OSError):  # the driver does not see the shards: nothing to hold them to
        expected = None
    res = stage.resources
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": 1} if res.use_gpu else {})
    sink = controls.sink(stage.name, tracking_uri, mlflow_run_id) if tracking_uri and mlflow_run_id else None
    trainer = _stage_trainer()(
        train_loop_per_worker,
        train_loop_config=dict(stage=stage, data=data, init_checkpoint=init_checkpoint, init_layers=init_layers,
                               init_from_label=init_from_label, step_lines=step_lines, data_hash=expected),
        # [min, max] is elastic: Ray Train restarts the group at a new size from the latest
        # checkpoint when capacity changes; the loop reads the new size (pipeline/order.py).
        scaling_config=ScalingConfig(num_workers=res.worker_range if res.elastic else res.num_workers,
                                     use_gpu=res.use_gpu, resources_per_worker=per_worker,
                                     elastic_resize_monitor_interval_s=res.resize_check_s),
        run_config=RunConfig(name=trial_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=res.max_failures,
                                                          max_preemption_failures=res.max_preemption_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=([MlflowEpochMetrics(sink.feed())] if sink else [])
                             + [controls.callback(stage.name)]),
    )
    try:
        result = trainer.fit()
    except BaseException as exc:
        exc.tracking = sink  # the driver still flushes what the stage logged before it crashed
        raise
    failure = result.return_value if isinstance(result.return_value, dict) else None
    if failure is None and result.checkpoint is None:
        raise RuntimeError(f"stage {stage.name}: Ray Train finished without a checkpoint")
    return StageOutcome(result.checkpoint, dict(result.metrics or {}), failure, sink)


class TrackingSink:
    """The driver's hold on one stage attempt's MetricsSink (pipeline/metricsink.py), which
    lives on the driver's desk (a Ray actor on the driver's node, the controller's node,
    where MLflow listens: see _Desk). It outlives the Ray Train run, so the driver flushes
    it after fit() returns and then closes it (metricsink.flush_stage); run_plan ends the
    desk. Nothing here waits for the desk to start: it makes the sink at its first call."""

    closed = False

    def __init__(self, desk, uri: str, run_id: str):
        self.desk, self.key = desk, (uri, run_id)

    def feed(self) -> "_SinkFeed":
        """What the stage's controller callback puts its items into."""
        return _SinkFeed(self.desk, self.key)

    def flush(self, timeout: float) -> dict:
        """As MetricsSink.flush, asked in slices of at most half a second (the desk answers
        every other call in between); an actor that does not answer counts as nothing sent."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                wait = max(0.0, min(0.5, deadline - time.monotonic()))
                state = ray.get(self.desk.flush.remote(self.key, wait), timeout=60 + wait)
                if state["ok"] or time.monotonic() >= deadline:
                    return state
        except Exception as exc:  # noqa: BLE001 - the driver says so and goes on
            return {"ok": False, "pending": -1, "error": f"{type(exc).__name__}: {exc}", "dropped": 0, "sent": 0}

    def close(self) -> None:
        self.closed = True
        try:
            self.desk.close.remote(self.key)
        except Exception:  # noqa: BLE001 - Ray already gone: the desk went with it
            pass


class _SinkFeed:
    """A stage's sink as its controller's callback sees it (pickled into the controller):
    `put` returns at once, and the desk takes one caller's items in the order sent."""

    def __init__(self, desk, key: tuple[str, str]):
        self.desk, self.key = desk, key

    def put(self, items: list) -> None:
        self.desk.put.remote(self.key, items)


def _stage_trainer():
    """TorchTrainer without the Ray Data `DatasetManager` actor that Ray Train 2.60 starts
    at every worker-group start, restart and resize even for a run with no Ray Datasets
    (ours read their shards with DALI): one process, with Ray Data's imports, fewer each
    time. A run given Ray Datasets, or a Ray whose callbacks differ, keeps Ray's own list."""
    from ray.train.torch import TorchTrainer

    class StageTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if self.datasets:
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "DatasetsCallback"]

    return StageTrainer


def checkpoint_uri(checkpoint) -> str:
    """A string that `checkpoint_from_uri` turns back into the checkpoint."""
    fs = getattr(checkpoint, "filesystem", None)
    scheme = getattr(fs, "type_name", "local") if fs is not None else "local"
    return checkpoint.path if scheme == "local" else f"{scheme}://{checkpoint.path}"


def checkpoint_from_uri(uri: str):
    return ray.train.Checkpoint(uri)


def load_checkpoint_model(checkpoint) -> dict:
    """The weights of a stage checkpoint and what serving needs ({"model", "arch",
    "num_classes", "mean_rgb", ...}; for MLflow and evaluation), without its optimizer state."""
    return _load_weights(checkpoint)


class _Desk:
    """One Ray actor per driver, on the driver's node: each running stage's Ray Train
    controller and state, as the controllers report them (StageControls' callback), and
    each stage attempt's MLflow sink (pipeline/metricsink.py), filled by that stage's
    controller. One process for them all, where a sink per stage cost a Python with
    MLflow's imports at every stage start (about 4 CPU-s each, measured on this project's
    2-core CI machine). Every call is short (a flush waits at most half a second), so the
    actor's one-call-at-a-time order keeps each sender's items in order and the desk
    answers an abort's read within about half a second."""

    def __init__(self):
        from pipeline.metricsink import MetricsSink  # MLflow's imports now, while the stages start

        self.new_sink = MetricsSink
        self.controllers, self.states, self.sinks = {}, {}, {}

    def started(self, stage: str, controller) -> None:
        self.controllers[stage] = controller

    def state(self, stage: str, state: str) -> None:
        self.states[stage] = (state, time.time())

    def read(self) -> tuple[dict, dict]:
        return dict(self.controllers), dict(self.states)

    def _sink(self, key: tuple[str, str]):
        """The sink for (tracking URI, MLflow run id), made at its first call. A put that
        comes after its close (the controller's and the driver's calls are not ordered
        with each other) gets a new one, which sends it while the desk lives; the stage's
        checkpoint carries those figures either way (a rerun logs what MLflow lacks)."""
        if key not in self.sinks:
            self.sinks[key] = self.new_sink(*key)
        return self.sinks[key]

    def put(self, key: tuple[str, str], items: list) -> None:
        self._sink(key).put(items)

    def flush(self, key: tuple[str, str], wait_s: float) -> dict:
        return self._sink(key).flush(min(wait_s, 0.5))

    def close(self, key: tuple[str, str]) -> None:
        sink = self.sinks.pop(key, None)
        if sink is not None:
            sink.close()


class StageControls:
    """The driver's hold on the stages it runs in threads. Ray Train installs its Ctrl-C
    abort only when fit() runs on the main thread; here every controller announces itself
    (and each state it enters: scheduling means waiting for resources) to the driver's
    desk (_Desk), so `abort` can stop every running stage the way Ray's own handler
    would; the stages' MLflow sinks live on the same desk."""

    def __init__(self):
        # The desk is made when the first stage starts (from its thread, hence the lock): a
        # plan run with nothing left to train runs without Ray.
        self._lock, self._made, self._closed = threading.Lock(), None, False
        self.sinks: dict[str, TrackingSink] = {}  # each stage's figures on their way to MLflow (flushed at exit)

    @property
    def _desk(self):
        with self._lock:
            if self._made is None:
                if self._closed:  # a stage thread still starting after an abort: no desk left behind
                    raise RuntimeError("the driver has closed its desk: this plan run is ending")
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                self._made = ray.remote(num_cpus=0, scheduling_strategy=here)(_Desk).remote()
            return self._made

    def sink(self, stage: str, uri: str, run_id: str) -> TrackingSink:
        """A new sink for this attempt of `stage` (its MLflow run), on the desk."""
        self.sinks[stage] = TrackingSink(self._desk, uri, run_id)
        return self.sinks[stage]

    def callback(self, stage: str):
        from ray.train.v2._internal.execution.callback import ControllerCallback

        desk = self._desk

        class Announce(ControllerCallback):
            def after_controller_start(self, train_run_context):
                desk.started.remote(stage, ray.get_runtime_context().current_actor)

            def after_controller_state_update(self, previous_state, current_state):
                desk.state.remote(stage, current_state._state_type.name)

        return Announce()

    def states(self) -> dict[str, tuple[str, float]]:
        """stage -> (controller state, since when, epoch seconds)."""
        return ray.get(self._desk.read.remote(), timeout=10)[1] if self._made else {}

    def abort(self, stages, timeout: float = 20.0) -> list[str]:
        """Abort these stages' Ray Train runs (worker groups killed, controllers ended);
        the stages that had no controller to abort yet are returned."""
        controllers = ray.get(self._desk.read.remote(), timeout=10)[0] if self._made else {}
        refs = [controllers[s].abort.remote() for s in stages if s in controllers]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        return [s for s in stages if s not in controllers]


    def close(self) -> None:
        """End the desk once every sink on it is flushed: a driver process that runs
        several plans (a notebook, a test session) would otherwise keep one desk, a Python
        with MLflow's imports, per plan it ran."""
        with self._lock:
            self._closed = True
        if self._made is None:
            return
        try:
            ray.kill(self._made, no_restart=True)
        except Exception:  # noqa: BLE001 - Ray already gone (the driver is exiting)
            pass
