"""`python -m cluster.retrain --plan PLAN`: retrain when the data changed, promote only on improvement.

Run by cron, a systemd timer or a Kubernetes CronJob (examples in cluster/schedule/
and cluster/k8s/). Each run:

1. hashes the shards' manifest (manifest.parquet, classes.json) and compares it with
   the `data_hash` tag of the registered model's `champion` version; unchanged data
   (and no --force) ends here, exit 0;
   A tracking server that cannot be read (down, timing out) is not "no champion":
   nothing is submitted or changed, exit 3;
2. submits the plan as a Ray job whose submission id is derived from the plan's
   fingerprint and the data hash: a second scheduler that fires while the first
   retrain runs finds the job already submitted and follows it instead of starting
   it again (the Jobs API refuses a duplicate id);
3. waits for the job. A failed or stopped job leaves the champion untouched, says
   so, exits 1; the next run retries it (id suffix -retry1, ...; same plan run, so it
   resumes from the last checkpoint), no --force needed;
4. compares the new net's validation top-1 error with the champion's, both under the
   same protocol on the current validation data (the champion is re-evaluated
   when it was trained on other data), and moves the `champion` alias only if the
   new one is better. Either way the new version's tags say what was compared and
   what was decided.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

from cluster import jobs
from data_prep.store import data_hash  # noqa: F401 - the gate's hash (tests import it from here)

ALIAS = "champion"


def submission_id(plan, digest: str, force: bool) -> str:
    key = hashlib.sha256(f"{plan.fingerprint()}:{digest}".encode()).hexdigest()[:16]
    sid = f"retrain-{plan.name}-{key}"
    return f"{sid}-forced-{time.strftime('%Y%m%d-%H%M%S')}" if force else sid


def _top1(client, run_id: str, protocol: str, data_root: str, same_data: bool) -> tuple[float, str]:
    """Validation top-1 error of a stage run under `protocol` on `data_root`: the logged
    figure when the run was evaluated on this data, else evaluated now (not logged to
    that run, whose figures belong to its own data)."""
    from pipeline.evaluate import run_posteriors, stage_from_run
    from pipeline.protocols import default_scales, metric_prefix

    run = client.get_run(run_id)
    stage = stage_from_run(run)
    scales = default_scales(protocol, stage.scale_range, stage.eval_scale, stage.recipe.crop)
    prefix = metric_prefix(protocol, scales)
    logged = run.data.metrics.get(f"{prefix}/top1_error")
    if same_data and logged is not None:
        return logged, f"{prefix} (logged)"
    post = run_posteriors(stage, run.data.tags["checkpoint"], data_root, "val", protocol, scales)
    return post.errors()["top1_error"], f"{prefix} (re-evaluated on the current data)"


def _decided_elsewhere(client, model: str, version: str, say, grace: float = 60.0) -> bool:
    """One decision per job: the retrain that submitted it makes it, and a follower only
    reports it. Should the submitter be gone (killed, or timed out), the follower decides
    after `grace` seconds."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        decided = client.get_model_version(model, version).tags.get("promotion")
        if decided:
            say(f"{model} v{version}: decided by the retrain that submitted the job: {decided}")
            return True
        time.sleep(2)
    say(f"{model} v{version}: no decision from the submitting retrain after {grace:.0f} s; deciding here")
    return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.retrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", required=True, help="plan YAML inside this repository")
    p.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    p.add_argument(jobs.SHARED_FLAG, dest="storage_is_shared", action="store_true",
                   help="the plan's storage is a local path that every node shares (an NFS mount, or a cluster on "
                        "this one machine); without it a local storage path is refused")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--model", help="registered model whose champion is compared (default: the one of the plan's "
                                   "last stage, <experiment>-<arch>)")
    p.add_argument("--protocol", default="single", choices=["single", "dense", "multicrop", "dense+multicrop"],
                   help="test protocol both nets are compared under (default: single-scale centre crop)")
    p.add_argument("--force", action="store_true", help="retrain even if the data did not change")
    p.add_argument("--timeout", type=float, default=None, help="give up waiting for the job after this many seconds")
    a = p.parse_args(argv)

    from pipeline.booking import registered_model_name
    from pipeline.tracking import TrackingUnreachable, _client, champion, tracking_uri

    try:
        plan = jobs.checked_plan(a.plan, a.overrides, a.storage_is_shared, what="retrained")
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:  # the cluster's token before any work: a missing one is said at once
        jobs.ensure_auth(a.address)
    except jobs.AuthError as exc:
        print(f"cluster.retrain: {exc}", file=sys.stderr)
        return 2
    final = plan.order()[-1]
    model = a.model or registered_model_name(plan, final)
    uri = tracking_uri()
    client = _client(uri)
    digest = data_hash(plan.data.root)
    try:
        champ = champion(client, model, ALIAS)
    except TrackingUnreachable as exc:
        print(f"cluster.retrain: cannot read {model}'s champion from the tracking server at {uri}: "
              f"{str(exc)[:500]}\nNothing was submitted and no alias was changed; run again once the server "
              "answers.", file=sys.stderr)
        return 3
    if champ is not None and champ.tags.get("data_hash") == digest and not a.force:
        print(f"data unchanged ({digest[:12]}) since champion {model} v{champ.version}: nothing to retrain")
        return 0

    sid = submission_id(plan, digest, a.force)
    run_name = sid.removeprefix("retrain-")
    jc = jobs.client(a.address)
    say = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    # the job id is fixed by plan and data, so two schedules that fire together start one
    # job; one that FAILED or was STOPPED is retried under -retry1, -retry2, ... (same run
    # name: it resumes from the last checkpoint) by the next run, without --force
    sid, standing = jobs.submit_once(jc, jobs.train_entrypoint(a.plan, run_name, a.overrides), sid, tracking_uri=uri)
    following = standing is not None and standing not in jobs.TERMINAL  # another retrain is waiting on it
    if standing:
        say(f"retrain job {sid} was already submitted (status {standing}): following it, not starting it twice")
    else:
        say(f"data {digest[:12]}: submitted retrain job {sid}")
    where = f"champion untouched ({f'{model} v{champ.version}' if champ else 'there is none'})"
    try:
        status = jobs.wait(jc, sid, timeout=a.timeout, on_status=lambda s: say(f"{sid}: {s}"))
    except TimeoutError as exc:
        say(f"{exc}; {where}. Rerunning this command follows the same job and decides when it ends")
        return 1
    if status != "SUCCEEDED":
        say(f"retrain job {sid} {status}; {where}. Logs: ray job logs {sid}")
        return 1

    exp = client.get_experiment_by_name(plan.experiment)
    found = client.search_runs([exp.experiment_id], f"tags.plan_run = '{run_name}' and tags.stage = '{final.name}' "
                               "and tags.kind = 'stage' and tags.stage_status = 'finished'", max_results=1)
    if not found:
        say(f"job {sid} succeeded but stage {final.name} of run {run_name} is not finished in {uri}; {where}")
        return 1
    new_run = found[0]
    versions = client.search_model_versions(f"name = '{model}' and run_id = '{new_run.info.run_id}'")
    if not versions:
        say(f"no version of {model} was registered by run {new_run.info.run_id}; {where}")
        return 1
    new = max(versions, key=lambda v: int(v.version))
    if following and _decided_elsewhere(client, model, new.version, say):
        return 0
    if champ is not None and champ.version == new.version:
        say(f"{model} v{new.version} is already the champion")
        return 0

    new_err, how = _top1(client, new_run.info.run_id, a.protocol, plan.data.root, same_data=True)
    tags = {"data_hash": digest, "plan_fingerprint": plan.fingerprint(), "retrain_job": sid,
            "val_top1_error": f"{new_err:.4f}", "compared_by": how}
    if champ is None:
        promote, reason = True, f"first champion: top-1 error {new_err:.2f}%"
    else:
        champ_err, champ_how = _top1(client, champ.run_id, a.protocol, plan.data.root,
                                     same_data=champ.tags.get("data_hash") == digest)
        promote = new_err < champ_err
        verdict = "better than" if promote else "not better than"
        reason = (f"top-1 error {new_err:.2f}% {verdict} champion v{champ.version}'s {champ_err:.2f}% "
                  f"({champ_how})")
    if promote:
        client.set_registered_model_alias(model, ALIAS, new.version)
    # `promotion` last: a following retrain takes it as "decided" (see _decided_elsewhere)
    for k, v in dict(tags, promotion=("promoted: " if promote else "kept the champion: ") + reason).items():
        client.set_model_version_tag(model, new.version, k, v)
    if promote:
        say(f"{model} v{new.version} is the new champion: {reason}")
    else:
        say(f"{model} v{new.version} not promoted: {reason}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
