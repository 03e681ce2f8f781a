"""Submitting the pipeline to a Ray cluster through the Ray Jobs API.

The job's working directory is this repository without data, checkpoints, the
venv or git metadata (Ray uploads it to the cluster); MLflow's address and any
storage settings travel in the runtime environment, so the job logs to the same
tracking server as the person who submitted it.
"""

from __future__ import annotations

import os
import sys
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


class AuthError(RuntimeError):
    """The cluster wants Ray's authentication token and none was found here."""


def auth_token() -> str | None:
    """The cluster token the way Ray's own clients find it: RAY_AUTH_TOKEN, else the file
    RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token (where `ray start --head` and
    `ray get-auth-token --generate` keep it)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _needs_token(address: str) -> bool:
    """Whether the dashboard at `address` refuses a request that carries no token."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{address.rstrip('/')}/api/jobs/", timeout=10).close()
    except urllib.error.HTTPError as exc:
        return exc.code in (401, 403)
    except OSError:
        return False  # unreachable: the client reports that itself
    return False


def ensure_auth(address: str | None) -> str:
    """The dashboard address (http://HOST:8265; default RAY_ADDRESS, else the local
    head's), with Ray's token authentication settled for this process. A cluster has it
    on only when started in token mode with a token (ray_cluster.yaml and the KubeRay
    manifests do; a bare `ray start --head` in a fresh home does not): the token is
    found as Ray's clients find it and token mode is switched on; with none, and a
    dashboard that wants one, AuthError says what to run, before anything is submitted."""
    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    if "://" not in address:
        address = f"http://{address}"
    if auth_token():
        if "RAY_AUTH_MODE" not in os.environ:  # an explicit choice (e.g. disabled) is the user's
            os.environ["RAY_AUTH_MODE"] = "token"
            if "ray" in sys.modules:  # Ray caches its config at import: make it read the mode again
                from ray._raylet import Config

                Config.initialize("")
    elif os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled" and _needs_token(address):
        raise AuthError(
            f"the Ray cluster at {address} uses token authentication and no token was found here "
            "(RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token). On the head node run "
            "`ray get-auth-token`, then here: export RAY_AUTH_TOKEN=<that token> (for ray_cluster.yaml: "
            "export RAY_AUTH_TOKEN=$(ray exec ray_cluster.yaml 'ray get-auth-token' 2>/dev/null | tail -1)), "
            "and run this again")
    return address


def client(address: str | None):
    """A Jobs API client for the dashboard at `address` (see ensure_auth)."""
    address = ensure_auth(address)  # before Ray is imported, so it reads the auth mode from the start
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


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


RETRYABLE = {"FAILED", "STOPPED"}


def submit_once(jobs, entrypoint: str, base_id: str, *, tracking_uri: str | None = None,
                env: dict[str, str] | None = None) -> tuple[str, str | None]:
    """Submit under `base_id` unless that submission already stands: (job id, None) for a
    new job, (job id, its status) for one found PENDING, RUNNING or SUCCEEDED, which is
    not submitted again (a resubmit after a dropped tunnel, or a second scheduler,
    follows it). A FAILED or STOPPED one is retried under `base_id`-retry1, -retry2, ...
    (the Jobs API keeps a used id forever), with the same entrypoint: the same plan run
    name, so the retry resumes from the last checkpoint."""
    for attempt in range(1000):
        job_id = base_id if attempt == 0 else f"{base_id}-retry{attempt}"
        try:
            return submit(jobs, entrypoint, submission_id=job_id, tracking_uri=tracking_uri, env=env), None
        except RuntimeError as exc:
            if "already exists" not in str(exc):
                raise
        status = jobs.get_job_status(job_id).value
        if status not in RETRYABLE:
            return job_id, status
    raise RuntimeError(f"{base_id}: 1000 failed attempts; submit under another id")


SHARED_FLAG = "--storage-is-shared"


def checked_plan(path: str, overrides: list[str], storage_is_shared: bool, what: str = "submitted"):
    """The plan, validated here before anything reaches the cluster (keys and values, what
    of its shard set and storage this machine can see, storage every node can reach), or
    ValueError with every problem, one per line: a typo costs a second, not a job."""
    from pipeline.config import ConfigError
    from pipeline.preflight import check_from_afar
    from pipeline.stages import load_plan

    try:
        plan = load_plan(path, overrides)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise ValueError(f"plan error: {exc}") from None
    problems = check_from_afar(plan)  # the job's own preflight checks the rest on the cluster
    if problems:
        raise ValueError(f"preflight: {len(problems)} problem(s); nothing was {what}:\n"
                         + "\n".join(f"  {p}" for p in problems))
    try:
        check_storage(plan.storage, storage_is_shared)
    except ValueError as exc:
        raise ValueError(f"plan error: {exc}") from None
    return plan


def check_storage(storage: str, shared: bool) -> None:
    """Refuse a plan whose checkpoint `storage` is a path on one machine: Ray Train's
    workers on several nodes write and read checkpoints there, and each would see only
    its own disk. A URI (s3://, gs://, ...) passes; a local path passes only when the
    user says every node shares it (an NFS mount, or a cluster on one machine)."""
    if "://" in storage:
        return
    if not Path(storage).is_absolute():
        raise ValueError(f"plan storage {storage!r} is a relative path: the job runs in Ray's copy of the working "
                         "directory, so its checkpoints would land in a temporary folder; give s3://... or an "
                         "absolute path (--set storage=...)")
    if shared:
        return
    raise ValueError(f"plan storage {storage!r} is a path on one machine, and a Ray cluster's nodes need shared "
                     "checkpoint storage: --set storage=s3://$VGG_BUCKET/checkpoints (or, if that path is shared "
                     f"by every node or the cluster is this one machine, add {SHARED_FLAG})")


def resolve_tracking_uri(uri: str | None) -> str:
    """The MLflow address a job logs to, as the job will read it: given, else
    MLFLOW_TRACKING_URI, else the project's default store. A job runs in Ray's copy of
    the working directory, so a relative SQLite path would put its runs in a temporary
    folder on a cluster node: SQLite paths are made absolute, and a bare path (no
    scheme; MLflow's file store, refused by MLflow since 3.13) is refused."""
    from pipeline.tracking import tracking_uri as default_uri

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    if "://" not in uri:
        raise ValueError(f"MLflow tracking address {uri!r}: give a server (http://HOST:5000) or "
                         "sqlite:///ABSOLUTE/PATH, with --tracking-uri or MLFLOW_TRACKING_URI")
    return uri


def ray_job_command(address: str | None, verb: str, job_id: str) -> str:
    """A `ray job VERB` line that works when pasted into another shell: the dashboard
    address, and token mode where this process found a token (Ray's CLI reads the token
    from ~/.ray/auth_token or RAY_AUTH_TOKEN, but sends it only in token mode)."""
    import shlex

    address = ensure_auth(address)
    mode = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE") == "token" else ""
    follow = " --follow" if verb == "logs" else ""
    return f"{mode}ray job {verb} --address {shlex.quote(address)}{follow} {shlex.quote(job_id)}"


def follow(jobs, job_id: str, out) -> str:
    """Write the job's log to `out` as it grows, until the job ends; its final status."""
    import asyncio

    async def tail():
        async for lines in jobs.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001 - the log stream is a convenience; the status is what counts
        out.write(f"(the job's log stream stopped: {type(exc).__name__}: {exc}; waiting for its end)\n")
    return wait(jobs, job_id)


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
