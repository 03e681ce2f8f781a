"""The driver's hold on the stages it runs: Ctrl-C and SIGTERM, aborting every running
stage, and the cluster's resources (a stage it can never hold is refused before it
starts; one that waits for its workers to be placed is reported every few minutes).

Ray Train aborts a run on Ctrl-C only when fit() runs on the driver's main thread; the
plan's stages run in threads, so this module does that job for all of them at once
(through worker.StageControls). Ray core only; MLflow through the runner's Tracker.
"""

from __future__ import annotations

import time

from pipeline.stages import Plan, Stage


class PlanInterrupted(RuntimeError):
    """SIGINT or SIGTERM: every running stage was aborted and its MLflow run marked KILLED;
    the same command resumes them. `signal` is the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signal = signum


def _needs(stage: Stage) -> dict[str, float]:
    res = stage.resources
    return {"CPU": res.cpus_per_worker} | ({"GPU": 1.0} if res.use_gpu else {})


def unplaceable(plan: Plan) -> list:
    """Stages that need more workers than the cluster's nodes can ever hold (each worker
    whole on one node), as preflight problems. Ray Train would retry placing them every
    60 s without end."""
    import ray

    from pipeline.preflight import Problem

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problems = []
    for stage in plan.order():
        need = _needs(stage)
        fits = sum(int(min(node.get(k, 0.0) / v for k, v in need.items()) + 1e-9) for node in nodes)
        if fits < stage.resources.min_workers:  # an elastic stage starts on min and grows
            total = {k: sum(node.get(k, 0.0) for node in nodes) for k in need}
            have = ", ".join(f"{v:g} {k}" for k, v in total.items())
            each = " + ".join(f"{v:g} {k}" for k, v in need.items())
            problems.append(Problem(
                f"stage {stage.name}", f"needs {stage.resources.min_workers} workers of {each} each; the cluster's "
                f"{len(nodes)} node(s) ({have}) can hold {fits}",
                f"--set stages.{stage.name}.resources.num_workers={max(fits, 1)} (the global batch stays "
                "recipe.batch_size), or add nodes to the cluster"))
    return problems


def note_waiting(plan: Plan, controls, names: list[str], after: float, say) -> None:
    """One line for each running stage whose Ray Train run has been waiting for its
    workers to be placed (Ray retries every 60 s without a word)."""
    import ray

    now = time.time()
    try:
        states, free = controls.states(), ray.available_resources()
    except Exception:  # noqa: BLE001 - a progress note, never a failure
        return
    for name in names:
        state, since = states.get(name, ("INITIALIZING", now))
        if state in ("INITIALIZING", "SCHEDULING", "RESCHEDULING", "RESTARTING") and now - since >= min(after, 60):
            need = _needs(plan.stages[name])
            each = " + ".join(f"{v:g} {k}" for k, v in need.items())
            spare = ", ".join(f"{free.get(k, 0.0):g} {k}" for k in need)
            say(f"[{name}] waiting for resources for {(now - since) / 60:.0f} min: "
                f"{plan.stages[name].resources.min_workers} workers of {each}; free now: {spare}")


def catch_signals(interrupted: list[int]):
    """SIGINT and SIGTERM ask the scheduling loop to abort the plan (noted in `interrupted`);
    a second one stops waiting for that. Only the main thread can take signals; elsewhere
    (a test driving run_plan from a thread) this does nothing. Returns the undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_signal(signum, frame):
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]


def abort(signum: int, tracker, controls, parent_id: str, run_name: str, running: dict, say,
           grace: float = 25.0) -> None:
    """Abort every running stage's Ray Train run (its checkpoints are kept), mark its MLflow
    run and the plan's KILLED, and raise PlanInterrupted; within `grace` seconds."""
    import signal
    from concurrent.futures import wait

    name = signal.Signals(signum).name
    stages = {future: stage.name for future, (stage, _) in running.items()}
    say(f"{name}: aborting {', '.join(stages.values()) or 'nothing'} (checkpoints are kept; the same command "
        "resumes)")
    deadline = time.monotonic() + grace

    def stop(names: list[str]) -> list[str]:
        try:
            return controls.abort(names, timeout=max(1.0, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - what cannot be aborted is disconnected below
            say(f"could not abort {', '.join(names)}: {type(exc).__name__}: {str(exc)[:200]}")
            return []

    left = stop(list(stages.values()))
    pending = set(running)
    while pending and time.monotonic() < deadline:
        _, pending = wait(pending, timeout=1.0)
        if left:  # a controller that had not announced itself yet
            left = stop(left)
    for future, (stage, srun) in running.items():
        try:
            tracker.client.set_tag(srun.run_id, "interrupted", name)
            tracker.client.set_terminated(srun.run_id, "KILLED")
        except Exception as exc:  # noqa: BLE001 - say so, and go on stopping
            say(f"[{stage.name}] could not mark MLflow run {srun.run_id} KILLED: {type(exc).__name__}: {exc}")
    try:
        tracker.finish_parent(parent_id, {}, status="KILLED", tags={"interrupted": name})
    except Exception as exc:  # noqa: BLE001
        say(f"could not mark the plan's MLflow run {parent_id} KILLED: {type(exc).__name__}: {exc}")
    stuck = [stages[f] for f in pending]
    if stuck:  # disconnecting ends whatever this driver still owns on the cluster
        import ray

        say(f"{', '.join(stuck)} did not stop within {grace:.0f} s; disconnecting from Ray")
        ray.shutdown()
    raise PlanInterrupted(f"plan run {run_name} interrupted by {name}: stage(s) "
                          f"{', '.join(stages.values()) or 'none'} aborted and marked KILLED in MLflow. Run the same "
                          "command to resume them from their last checkpoints.", signum)
