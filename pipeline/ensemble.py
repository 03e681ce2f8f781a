"""`python -m pipeline ensemble`: average stored posteriors, no net re-run (Section 4.3).

Members are stage runs evaluated under the same protocol and scales (their
`posteriors/<prefix>.parquet` artifacts). `--greedy N` picks, from the candidates,
members one at a time while the validation top-1 error falls, at most N. Each
ensemble is an MLflow run (tags: members, their stages, the protocol) with its
own errors, and a registered PyTorch model that holds the members' nets and
averages their softmax outputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.protocols import Posteriors


class Ensemble(nn.Module):
    """The members' softmax posteriors, averaged (what the paper's ensembles compute)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        sizes = {getattr(m, "input_size", None) for m in members}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members take different input sizes: {sorted(map(str, sizes))}")
        self.members = nn.ModuleList(members)
        self.input_size = sizes.pop()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.softmax(m(x), dim=1) for m in self.members]).mean(0)


@dataclass
class Choice:
    run_ids: list[str]
    posteriors: Posteriors
    errors: dict
    trail: list[tuple[str, float]]  # (run id added, top-1 error after adding it)


def average(members: dict[str, Posteriors]) -> Choice:
    ids = list(members)
    post = Posteriors.mean([members[i] for i in ids], what="ensemble members: ")
    errors = post.errors()
    return Choice(ids, post, errors, [(i, float("nan")) for i in ids])


def greedy(candidates: dict[str, Posteriors], max_members: int) -> Choice:
    """Forward selection on validation top-1 error: start from the best single net, add
    the candidate that lowers the error most, stop when none does or at `max_members`."""
    ids = list(candidates)
    first = candidates[ids[0]]
    aligned = {i: first.aligned_with(candidates[i], f"run {i}: ") for i in ids}
    chosen: list[str] = []
    total = None
    best_err, trail = float("inf"), []
    while len(chosen) < max_members:
        scored = []
        for i in ids:
            if i in chosen:
                continue
            probs = aligned[i].probs if total is None else total + aligned[i].probs
            err = Posteriors(first.keys, first.labels, probs / (len(chosen) + 1)).errors()["top1_error"]
            scored.append((err, i, probs))
        if not scored:
            break
        err, i, probs = min(scored, key=lambda s: s[0])
        if chosen and err >= best_err:
            break
        chosen.append(i)
        total, best_err = probs, err
        trail.append((i, err))
    post = Posteriors(first.keys, first.labels, total / len(chosen))
    return Choice(chosen, post, post.errors(), trail)


def run_ensemble(refs: list[str], *, tracking_uri: str, experiment: str | None, protocol: str,
                 scales: list[int] | None, greedy_max: int | None = None, name: str | None = None,
                 register: bool = True, say=None) -> dict:
    """`refs`: stage run ids, or stage names (latest finished run of that stage). `say`
    is told each step as it starts (the command prints them)."""
    say = say or (lambda message: None)
    from pipeline.evaluate import load_posteriors, load_stage_model, stage_from_run
    from pipeline.protocols import default_scales, metric_prefix
    from pipeline.tracking import Tracker, _client, finished_stage_run

    if len(refs) < 2:
        raise ValueError("an ensemble needs at least two members")
    client = _client(tracking_uri)
    runs = [finished_stage_run(client, experiment, ref) if experiment and not re.fullmatch(r"[0-9a-f]{32}", ref)
            else client.get_run(ref) for ref in refs]
    stages = [stage_from_run(r) for r in runs]
    if scales is None:
        sets = {tuple(default_scales(protocol, s.scale_range, s.eval_scale, s.recipe.crop)) for s in stages}
        if len(sets) != 1:
            raise ValueError(f"members' default {protocol} scales differ ({sorted(sets)}); pass --scales")
        scales = list(sets.pop())
    prefix = metric_prefix(protocol, scales)
    exp_id = runs[0].info.experiment_id
    tracker = Tracker(tracking_uri, client.get_experiment(exp_id).name)
    # The same candidates, protocol and selection make the same ensemble: found, not made again.
    identity = {"kind": "ensemble", "protocol": prefix, "candidates": ",".join(sorted(r.info.run_id for r in runs)),
                "selection": f"greedy (at most {greedy_max}) from {len(runs)}" if greedy_max else "all"}
    found = _existing(client, exp_id, identity, name)
    if found is not None and (found.data.tags.get("registered") or not register):
        return _result(found, prefix, found=True)
    if found is not None:  # made with --no-register before; register it now, in the same run
        choice = None
        run, by_id = found, {r.info.run_id: (r, s) for r, s in zip(runs, stages)}
        chosen = found.data.tags["members"].split(",")
    else:
        say(f"reading the stored {prefix} posteriors of {len(runs)} members")
        members = {r.info.run_id: load_posteriors(client, r.info.run_id, prefix) for r in runs}
        choice = greedy(members, greedy_max) if greedy_max else average(members)
        chosen = choice.run_ids
        by_id = {r.info.run_id: (r, s) for r, s in zip(runs, stages)}
        label = name or "ensemble-" + "+".join(by_id[i][1].name for i in chosen)
        tags = {**identity, "members": ",".join(chosen), "member_stages": ",".join(by_id[i][1].name for i in chosen),
                "images": str(choice.errors["images"])}
        run = client.create_run(exp_id, run_name=label, tags=tags)
        tracker.log_metrics(run.info.run_id, {f"{prefix}/top1_error": choice.errors["top1_error"],
                                              f"{prefix}/top5_error": choice.errors["top5_error"]},
                            {"greedy_top1_error": [err for _, err in choice.trail]} if greedy_max else None)
    if register:
        from pipeline.evaluate import stage_bundle

        say(f"registering {tracker.experiment}-ensemble: loading {len(chosen)} nets and their preprocessing")

        nets = [load_stage_model(by_id[i][1], by_id[i][0].data.tags["checkpoint"]) for i in chosen]
        parts = [stage_bundle(by_id[i][1], by_id[i][0].data.tags["checkpoint"],
                              by_id[i][0].data.params.get("data.root")) for i in chosen]
        # the classifier averages the members' softmax, each with its own preprocessing
        bundle = None if any(p is None for p in parts) else (
            [n for p in parts for n in p[0]], [m for p in parts for m in p[1]], parts[0][2])
        tracker.log_model(run.info.run_id, Ensemble(nets), f"{tracker.experiment}-ensemble", bundle)
        client.set_tag(run.info.run_id, "registered", f"{tracker.experiment}-ensemble")
    if choice is None:
        return _result(client.get_run(run.info.run_id), prefix, found=True)
    client.set_terminated(run.info.run_id, "FINISHED")
    return {"run_id": run.info.run_id, "name": run.info.run_name, "members": chosen,
            "member_stages": [by_id[i][1].name for i in chosen], "metric_prefix": prefix, "found": False,
            **choice.errors}


def _existing(client, exp_id: str, identity: dict, name: str | None):
    """The latest finished ensemble run with these identity tags (and this name, if given)."""
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in identity.items()) + " and attributes.status = 'FINISHED'"
    for run in client.search_runs([exp_id], query, order_by=["attributes.start_time DESC"]):
        if name is None or run.info.run_name == name:
            return run
    return None


def _result(run, prefix: str, found: bool) -> dict:
    tags, metrics = run.data.tags, run.data.metrics
    return {"run_id": run.info.run_id, "name": run.info.run_name, "members": tags["members"].split(","),
            "member_stages": tags["member_stages"].split(","), "metric_prefix": prefix, "found": found,
            "top1_error": metrics[f"{prefix}/top1_error"], "top5_error": metrics[f"{prefix}/top5_error"],
            "images": int(tags["images"])}
