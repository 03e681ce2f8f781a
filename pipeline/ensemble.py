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
                 register: bool = True) -> dict:
    """`refs`: stage run ids, or stage names (latest finished run of that stage)."""
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
    members = {r.info.run_id: load_posteriors(client, r.info.run_id, prefix) for r in runs}
    choice = greedy(members, greedy_max) if greedy_max else average(members)
    by_id = {r.info.run_id: (r, s) for r, s in zip(runs, stages)}
    exp_id = runs[0].info.experiment_id
    label = name or "ensemble-" + "+".join(by_id[i][1].name for i in choice.run_ids)
    tags = {"kind": "ensemble", "protocol": prefix, "members": ",".join(choice.run_ids),
            "member_stages": ",".join(by_id[i][1].name for i in choice.run_ids),
            "selection": f"greedy (at most {greedy_max}) from {len(members)}" if greedy_max else "all"}
    run = client.create_run(exp_id, run_name=label, tags=tags)
    tracker = Tracker(tracking_uri, client.get_experiment(exp_id).name)
    tracker.log_metrics(run.info.run_id, {f"{prefix}/top1_error": choice.errors["top1_error"],
                                          f"{prefix}/top5_error": choice.errors["top5_error"]},
                        {"greedy_top1_error": [err for _, err in choice.trail]} if greedy_max else None)
    if register:
        from pipeline.evaluate import stage_bundle

        nets = [load_stage_model(by_id[i][1], by_id[i][0].data.tags["checkpoint"]) for i in choice.run_ids]
        parts = [stage_bundle(by_id[i][1], by_id[i][0].data.tags["checkpoint"],
                              by_id[i][0].data.params.get("data.root")) for i in choice.run_ids]
        # the classifier averages the members' softmax, each with its own preprocessing
        bundle = None if any(p is None for p in parts) else (
            [n for p in parts for n in p[0]], [m for p in parts for m in p[1]], parts[0][2])
        tracker.log_model(run.info.run_id, Ensemble(nets), f"{tracker.experiment}-ensemble", bundle)
    client.set_terminated(run.info.run_id, "FINISHED")
    return {"run_id": run.info.run_id, "name": label, "members": choice.run_ids,
            "member_stages": [by_id[i][1].name for i in choice.run_ids], "metric_prefix": prefix,
            **choice.errors}
