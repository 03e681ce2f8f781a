"""What a checkpoint's position means, and whether a run can resume from it exactly.

A checkpoint records its position in units that survive a change of world size
(`record`): the global batch B and steps per epoch, the step reached and the images of
the epoch seen so far (step x B, in the global order of pipeline/order.py), with the
world size, micro-batch and accumulation it was written at, and a fingerprint of the
recipe fields and data the position is measured in. `resume_at` turns it into where
this run starts, the events to record (a resize, a recipe change at an epoch's end), or
the reason it cannot be honoured.

Plain Python: the stage loop calls it; tests call it without Ray, DALI or torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from pipeline.order import SampleTable, Split

# The recipe fields a checkpoint's position and lr schedule are measured in: with any of
# them changed, "step 3,000 of epoch 7" no longer names the same images or the same lr.
POSITION_FIELDS = ("batch_size", "seed", "epochs", "max_iterations", "optim")


def data_digest(table: SampleTable) -> str:
    """The split's samples, in shard order, by key: a position names other images when
    this changes (shards added, removed or re-cut), wherever the shards are mounted."""
    return hashlib.sha256("\n".join(table.keys).encode()).hexdigest()[:12]


def fingerprint(recipe, table: SampleTable) -> dict:
    """What a position depends on, readably (for refusal messages) and as a short hash."""
    from pipeline.config import to_dict

    fields = {name: to_dict(getattr(recipe, name)) for name in POSITION_FIELDS}
    fields["train_images"] = len(table)
    fields["train_data"] = data_digest(table)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return {"hash": digest, "fields": fields}


def changed_fields(saved: dict, now: dict) -> list[str]:
    """`field: old -> new` for each fingerprint field that differs (dotted into optim)."""
    out = []
    old, new = saved.get("fields", {}), now["fields"]
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def record(split: Split, steps_per_epoch: int, step: int, fp: dict, preempted: dict | None = None) -> dict:
    # worker_batch: the largest micro-batch (ranks' shares differ by one where B does not divide)
    """The position of a checkpoint written after `step` steps of an epoch."""
    out = {"world": split.world, "worker_batch": split.micro, "accumulate": split.accumulate,
           "global_batch": split.global_batch, "layout": split.label(), "steps_per_epoch": steps_per_epoch,
           "step": step,
           "images_seen": step * split.global_batch, "fingerprint": fp}
    if preempted:
        out["preempted"] = preempted
    return out


@dataclass(frozen=True)
class Resume:
    epoch: int = 0  # the epoch to run next
    step: int = 0  # the global step of that epoch to start at
    events: list = field(default_factory=list)  # {"kind", "text"} to record in the stage's run
    refused: str | None = None  # why this checkpoint cannot be resumed exactly


def resume_at(state: dict, *, split: Split, steps_per_epoch: int, fp: dict) -> Resume:
    """Where a run at `split` resumes a checkpoint's `state` (its "epoch", "step",
    "position"), or why it cannot."""
    epoch = state["epoch"]
    pos = state.get("position")
    if pos is None:
        # Before positions were recorded: the step counted old per-worker batches of the
        # old reader's order. An epoch end is still an epoch end; a mid-epoch one names
        # images no run can find again.
        if "val_top1_error" in (state.get("reported") or {}) or "step" not in state:
            return Resume(epoch + 1, 0, [{"kind": "resume", "text": "checkpoint without a recorded position: "
                                          f"resumed after its epoch {epoch + 1}"}])
        return Resume(refused=f"the checkpoint (epoch {epoch + 1}, step {state['step']}) is mid-epoch and was "
                              "written before checkpoints recorded what their position means; its step cannot be "
                              "mapped to images. Resume from an epoch-end checkpoint or start the stage again")
    at_end = pos["images_seen"] >= pos["steps_per_epoch"] * pos["global_batch"]
    events = []
    if pos["fingerprint"]["hash"] != fp["hash"]:
        changes = changed_fields(pos["fingerprint"], fp)
        if not at_end:
            return Resume(refused=f"the checkpoint is mid-epoch (epoch {epoch + 1}, step {pos['step']} of "
                                  f"{pos['steps_per_epoch']}, {pos['images_seen']} images seen) and the recipe or data "
                                  f"its position is measured in changed: {'; '.join(changes)}. Its images and lr "
                                  "steps cannot be honoured in the new units: resume with the old values, or from "
                                  "an epoch-end checkpoint")
        events.append({"kind": "recipe_change", "text": f"resumed after epoch {epoch + 1} under a changed recipe: "
                                                        f"{'; '.join(changes)}"})
    if (pos["world"], pos["worker_batch"], pos["accumulate"]) != (split.world, split.micro, split.accumulate):
        cause = ("preemption notice" + (f" (nodes {', '.join(pos['preempted'].get('nodes', []))})"
                                        if pos.get("preempted", {}).get("nodes") else "")
                 if pos.get("preempted") and split.world < pos["world"] else
                 "more capacity" if split.world > pos["world"] else
                 "a node lost without notice, or less capacity" if split.world < pos["world"] else
                 "another micro-batch layout")
        events.append({"kind": "resize", "cause": cause,
                       "text": f"{pos['world']} -> {split.world} workers ({cause}); global batch {split.global_batch} "
                               f"as {pos.get('layout', pos['world'])} -> {split.label()}; resumed "
                               + (f"after epoch {epoch + 1}" if at_end else
                                  f"at epoch {epoch + 1} image {pos['images_seen']}")})
    elif pos.get("preempted"):
        events.append({"kind": "preemption", "cause": "preemption notice",
                       "text": f"resumed at epoch {epoch + 1} image {pos['images_seen']} after a preemption notice "
                               "on the same number of workers"})
    if at_end:
        return Resume(epoch + 1, 0, events)
    return Resume(epoch, pos["images_seen"] // split.global_batch, events)
