"""Submitting the pipeline to a Ray cluster through the Ray Jobs API.

The job's working directory is this repository without data, checkpoints, the
venv or git metadata (Ray uploads it to the cluster); MLflow's address and any
storage settings travel in the runtime environment, so the job logs to the same
tracking server as the person who submitted it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXCLUDES = [".venv", "data", "runs", "mlflow.db", "mlartifacts", "mlruns", "mlflow-server", ".git", "tests",
            "bench/results", "**/__pycache__"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def runtime_env(tracking_uri: str | None = None, env: dict[str, str] | None = None,
                working_dir: Path = REPO) -> dict:
    env_vars = dict(env or {})
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        env_vars["MLFLOW_TRACKING_URI"] = uri
    return {"working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env_vars}


def client(address: str | None):
    """A Jobs API client for the dashboard at `address` (http://HOST:8265; default
    RAY_ADDRESS, else the local head's dashboard)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")


def train_entrypoint(plan: str, run_name: str | None = None, overrides: list[str] | None = None) -> str:
    import shlex

    args = ["python", "-m", "pipeline", "train", "--plan", plan]
    if run_name:
        args += ["--run-name", run_name]
    for o in overrides or []:
        args += ["--set", o]
    return shlex.join(args)


def submit(jobs, entrypoint: str, *, submission_id: str | None = None, tracking_uri: str | None = None,
           env: dict[str, str] | None = None, retries: int = 30) -> str:
    """Submit, retrying while the head's job agent is still starting."""
    for attempt in range(retries):
        try:
            return jobs.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                   runtime_env=runtime_env(tracking_uri, env))
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or attempt == retries - 1:
                raise
            time.sleep(2)
    raise AssertionError("unreachable")


def wait(jobs, job_id: str, poll: float = 2.0, timeout: float | None = None, on_status=None) -> str:
    """Block until the job ends; returns its final status (SUCCEEDED, FAILED, STOPPED)."""
    start, last = time.monotonic(), None
    while True:
        status = jobs.get_job_status(job_id).value  # a JobStatus (str) enum
        if status != last and on_status:
            on_status(status)
        last = status
        if status in TERMINAL:
            return status
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)
