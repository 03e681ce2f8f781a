"""Ray Train glue: one stage = one TorchTrainer run of `train_loop_per_worker`.

The only module that imports Ray Train. Each worker builds its net, reads its
DALI shard (shard_id = world rank), runs the engine's loops under DDP (gloo on
CPU, NCCL on GPU, set up by Ray), and reports metrics every epoch; rank 0 attaches
the checkpoint. A restarted worker group resumes from `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import ray.train
import torch

from pipeline.stageloop import CHECKPOINT_FILE



class MlflowEpochMetrics(ray.train.UserCallback):
    """Logs rank 0's reports to the stage's MLflow run: per-epoch metrics with the epoch
    as step, and the per-interval records each report carries (`step/train_loss`,
    `step/lr`, `step/images_per_sec`, `step/data_wait_fraction`) with the global step as
    step, so the UI's charts show the curve inside epochs and across a resumed stage.

    Runs in the Ray Train controller, which Ray pins to the driver's node: on a
    cluster that is the head, where MLflow listens on 127.0.0.1, so workers never
    need a route to the tracking server. Sends that fail are buffered and retried.
    A record is only reported with the checkpoint after it, so a resumed worker
    redoes exactly the records that were lost with it; records at or below the last
    step already in the run are dropped, so a resumed driver adds no duplicates."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._logger = None
        self._last_step = self._last_epoch = None

    def after_report(self, run_context, metrics, checkpoint):
        from pipeline.tracking import MetricsLogger

        if self._logger is None:
            self._logger = MetricsLogger(self.tracking_uri, self.run_id, enabled=True)
            self._last_step = self._logger.last_step(STEP_METRIC)
            self._last_epoch = self._logger.last_step(EPOCH_METRIC)
        for rank in metrics:  # each node's system figures, from the worker that samples it
            if rank.get("system"):
                self._log_system(rank["system"])
        rank0 = dict(metrics[0])
        rank0.pop("system", None)
        replay = rank0.pop("replay", None)
        if replay:  # what came with the checkpoint this run resumed from: a driver killed
            self._log(dict(replay))  # right after it was written may never have logged it
            self._log_events(dict(replay).pop("events", None))
        self._log_events(rank0.pop("events", None))
        if "data_hash" in rank0:  # the shard set, as the run's MLflow dataset input
            self._logger.log_dataset(rank0.pop("data_name"), rank0.pop("data_hash"), rank0.pop("data_root"))
        self._log(rank0)

    def _log_events(self, events: list | None) -> None:
        """Resizes, preemptions and recipe changes, each as a tag of the run (idempotent)."""
        for event in events or []:
            text = event["text"] + (f" [cause: {event['cause']}]" if event.get("cause") else "")
            self._logger.log_event(event["kind"], text, event["step"])

    def _log_system(self, system: dict) -> None:
        """A node's samples as `system/<node>/<figure>` (pipeline/sysmetrics.py), each at
        the second it was taken (the step) and with its own timestamp."""
        for taken_ms, figures in system["samples"]:
            self._logger.log({f"system/{system['node']}/{k}": v for k, v in figures.items()},
                             step=taken_ms // 1000, timestamp_ms=taken_ms, flush=False)
        self._logger.flush()

    def _log(self, rank0: dict) -> None:
        """A report's step records and epoch figures, each once (steps and epochs already
        in the run are skipped)."""
        for record in rank0.pop("step_log", None) or []:
            record = dict(record)
            step = int(record.pop("step"))
            if self._last_step is not None and step <= self._last_step:
                continue
            self._logger.log({f"step/{k}": v for k, v in record.items()}, step=step)
            self._last_step = step
        if EPOCH_METRIC not in rank0:
            return  # a mid-epoch checkpoint or a failure inside an epoch: no epoch figures
        epoch = int(rank0.pop("epoch"))
        rank0.pop("step", None)
        if self._last_epoch is not None and epoch <= self._last_epoch:
            return
        self._logger.log({k: v for k, v in rank0.items() if isinstance(v, (int, float))}, step=epoch)
        self._last_epoch = epoch


STEP_METRIC, EPOCH_METRIC = "step/train_loss", "val_top1_error"


def _quiet_ray_train_info() -> None:
    """Ray Train logs two INFO lines per report per worker; progress lines are ours.
    Its loggers are named by file path, so match those too."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.train") or "ray/train" in name:
            logging.getLogger(name).setLevel(logging.WARNING)


def _load_state(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)


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
                init=_load_state(config["init_checkpoint"]) if config.get("init_checkpoint") is not None else None,
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
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir)
                     if checkpoint_dir is not None else None)


@dataclass(frozen=True)
class StageOutcome:
    checkpoint: object  # ray.train.Checkpoint of the last epoch (after a failure: the last good one, or None)
    metrics: dict  # those reported with that checkpoint
    failure: dict | None = None  # {"kind", "epoch", "reason"} when training failed (stalled, diverged)


def fit_stage(stage, data, *, trial_name: str, storage: str, tracking_uri: str | None, mlflow_run_id: str | None,
              init_checkpoint=None, init_layers=None, init_from_label: str | None = None,
              step_lines: bool = True, controls: "StageControls | None" = None) -> StageOutcome:
    """Train one stage with Ray Train. Reusing `trial_name` under the same `storage`
    resumes that stage from its last checkpoint. `init_layers` overrides the stage's
    `init_from.layers` (a retry fine-tunes "all" of a failed attempt's last good weights).
    `step_lines=False` keeps the console to one line per epoch (stages running side by
    side); the step figures still go to MLflow."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = stage.resources
    per_worker = {"CPU": res.cpus_per_worker} | ({"GPU": 1} if res.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dict(stage=stage, data=data, init_checkpoint=init_checkpoint, init_layers=init_layers,
                               init_from_label=init_from_label, step_lines=step_lines),
        # [min, max] is elastic: Ray Train restarts the group at a new size from the latest
        # checkpoint when capacity changes; the loop reads the new size (pipeline/order.py).
        scaling_config=ScalingConfig(num_workers=res.worker_range if res.elastic else res.num_workers,
                                     use_gpu=res.use_gpu, resources_per_worker=per_worker,
                                     elastic_resize_monitor_interval_s=res.resize_check_s),
        run_config=RunConfig(name=trial_name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=res.max_failures,
                                                          max_preemption_failures=res.max_preemption_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=[MlflowEpochMetrics(tracking_uri, mlflow_run_id)]
                             + ([controls.callback(stage.name)] if controls else [])),
    )
    result = trainer.fit()
    failure = result.return_value if isinstance(result.return_value, dict) else None
    if failure is None and result.checkpoint is None:
        raise RuntimeError(f"stage {stage.name}: Ray Train finished without a checkpoint")
    return StageOutcome(result.checkpoint, dict(result.metrics or {}), failure)


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


class _Board:
    """A Ray actor in the driver's job: each running stage's Ray Train controller and its
    state, as the controllers report them (StageControls' callback)."""

    def __init__(self):
        self.controllers, self.states = {}, {}

    def started(self, stage: str, controller) -> None:
        self.controllers[stage] = controller

    def state(self, stage: str, state: str) -> None:
        self.states[stage] = (state, time.time())

    def read(self) -> tuple[dict, dict]:
        return dict(self.controllers), dict(self.states)


class StageControls:
    """The driver's hold on the stages it runs in threads. Ray Train installs its Ctrl-C
    abort only when fit() runs on the main thread; here every controller announces itself
    (and each state it enters: scheduling means waiting for resources) to a board, so
    `abort` can stop every running stage the way Ray's own handler would."""

    def __init__(self):
        self._board = ray.remote(num_cpus=0)(_Board).remote()

    def callback(self, stage: str):
        from ray.train.v2._internal.execution.callback import ControllerCallback

        board = self._board

        class Announce(ControllerCallback):
            def after_controller_start(self, train_run_context):
                board.started.remote(stage, ray.get_runtime_context().current_actor)

            def after_controller_state_update(self, previous_state, current_state):
                board.state.remote(stage, current_state._state_type.name)

        return Announce()

    def states(self) -> dict[str, tuple[str, float]]:
        """stage -> (controller state, since when, epoch seconds)."""
        return ray.get(self._board.read.remote(), timeout=10)[1]

    def abort(self, stages, timeout: float = 20.0) -> list[str]:
        """Abort these stages' Ray Train runs (worker groups killed, controllers ended);
        the stages that had no controller to abort yet are returned."""
        controllers = ray.get(self._board.read.remote(), timeout=10)[0]
        refs = [controllers[s].abort.remote() for s in stages if s in controllers]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=timeout)
        return [s for s in stages if s not in controllers]

