"""`python -m cluster.submit --plan PLAN`: train a plan on a Ray cluster as a Ray job.

The same as

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".venv", "data", ...], "env_vars": {"MLFLOW_TRACKING_URI": ...}}' \\
        -- python -m pipeline train --plan PLAN

with the excludes and the tracking address filled in. It prints the job id; then

    ray job logs --address http://127.0.0.1:8265 --follow JOB_ID    # progress lines from rank 0
    ray job status --address http://127.0.0.1:8265 JOB_ID
    ray job stop --address http://127.0.0.1:8265 JOB_ID             # stop; rerun the plan to resume

Rerunning the same plan (same run name) resumes it: finished stages are skipped,
the current one restarts from its last checkpoint.

Submitting is idempotent per plan run: the job id defaults to train-RUN_NAME, so a
resubmit (after a dropped tunnel, say) of a plan run whose job is pending, running or
finished follows that job instead of starting a second driver on the same runs; one
that FAILED or was STOPPED is submitted again as train-RUN_NAME-retry1, ..., which
resumes it. The tracking address the job gets is printed (relative SQLite paths are
made absolute: the job runs in Ray's copy of the working directory).
"""

from __future__ import annotations

import argparse
import sys

from cluster import jobs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="plan YAML inside this repository, e.g. pipeline/plans/paper.yaml")
    p.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument("--run-name", help="plan run name (default: the plan's name and content hash, so resubmitting "
                                      "resumes)")
    p.add_argument(jobs.SHARED_FLAG, dest="storage_is_shared", action="store_true",
                   help="the plan's storage is a local path that every node shares (an NFS mount, or a cluster on "
                        "this one machine); without it a local storage path is refused")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="plan overrides, as for `python -m pipeline train`")
    p.add_argument("--tracking-uri", help="MLflow address the job logs to (default: MLFLOW_TRACKING_URI); on a "
                                          "cluster, the head's http://127.0.0.1:5000")
    p.add_argument("--submission-id", help="job id (default: train-RUN_NAME; a job already standing under it is "
                                           "followed, not submitted again)")
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit 0 only if it succeeded")
    a = p.parse_args(argv)

    from pipeline.runner import default_run_name

    try:
        plan = jobs.checked_plan(a.plan, a.overrides, a.storage_is_shared)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        uri = jobs.resolve_tracking_uri(a.tracking_uri)
        client = jobs.client(a.address)
    except (ValueError, jobs.AuthError) as exc:
        print(f"cluster.submit: {exc}", file=sys.stderr)
        return 2
    run_name = a.run_name or default_run_name(plan)
    job_id, standing = jobs.submit_once(client, jobs.train_entrypoint(a.plan, run_name, a.overrides),
                                        a.submission_id or f"train-{run_name}", tracking_uri=uri)
    if standing:
        print(f"{job_id} was already submitted for plan run {run_name} ({standing}): not submitted again", flush=True)
    else:
        print(f"submitted {job_id} (plan run {run_name})", flush=True)
    print(f"  tracking: {uri}\n  follow: {jobs.ray_job_command(a.address, 'logs', job_id)}\n"
          f"  stop:   {jobs.ray_job_command(a.address, 'stop', job_id)}", flush=True)
    if not a.wait:
        return 0
    # The job's own output (the driver's progress lines and results table) as it comes.
    status = jobs.follow(client, job_id, out=sys.stdout)
    print(f"{job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
