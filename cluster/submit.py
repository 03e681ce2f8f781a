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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="plan overrides, as for `python -m pipeline train`")
    p.add_argument("--tracking-uri", help="MLflow address the job logs to (default: MLFLOW_TRACKING_URI); on a "
                                          "cluster, the head's http://127.0.0.1:5000")
    p.add_argument("--submission-id", help="job id (a second submission with the same id is refused)")
    p.add_argument("--wait", action="store_true", help="block until the job ends; exit 0 only if it succeeded")
    a = p.parse_args(argv)

    # Validate here, before anything reaches the cluster: a typo costs a second.
    from pipeline.config import ConfigError
    from pipeline.stages import load_plan

    from pipeline.preflight import check_from_afar

    try:
        plan = load_plan(a.plan, a.overrides)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"plan error: {exc}", file=sys.stderr)
        return 2
    problems = check_from_afar(plan)  # the job's own preflight checks the rest on the cluster
    if problems:
        print(f"preflight: {len(problems)} problem(s); nothing was submitted:", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    try:
        client = jobs.client(a.address)
    except jobs.AuthError as exc:
        print(f"cluster.submit: {exc}", file=sys.stderr)
        return 2
    job_id = jobs.submit(client, jobs.train_entrypoint(a.plan, a.run_name, a.overrides),
                         submission_id=a.submission_id, tracking_uri=a.tracking_uri)
    print(f"submitted {job_id}\n  follow: ray job logs --follow {job_id}\n  stop:   ray job stop {job_id}", flush=True)
    if not a.wait:
        return 0
    status = jobs.wait(client, job_id, on_status=lambda s: print(f"{job_id}: {s}", flush=True))
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())
