"""Evaluate a finished stage again, outside Ray: single-scale centre-crop protocol.

The stage's configuration is read back from its MLflow run (tag `stage_config`),
its weights from the checkpoint the run points at; the result is logged to the
same run as `single_Q<Q>/top1_error` and `single_Q<Q>/top5_error`.
"""

from __future__ import annotations

import json

import torch

from pipeline.config import from_dict
from pipeline.stages import Stage


def stage_from_run(run) -> Stage:
    raw = run.data.tags.get("stage_config")
    if not raw:
        raise ValueError(f"run {run.info.run_id} is not a stage run (no stage_config tag)")
    return from_dict(Stage, json.loads(raw), "stage_config")


def evaluate_run(run_id: str, *, tracking_uri: str, scale: int | None = None, batch_size: int = 64,
                 data_root: str | None = None, split: str = "val") -> dict:
    from pipeline.data import DatasetInfo, eval_loader
    from pipeline.engine import evaluate
    from pipeline.models import build_model
    from pipeline.tracking import MetricsLogger, _client
    from pipeline.worker import checkpoint_from_uri, load_checkpoint_model

    client = _client(tracking_uri)
    run = client.get_run(run_id)
    stage = stage_from_run(run)
    checkpoint = run.data.tags.get("checkpoint")
    if not checkpoint:
        raise ValueError(f"run {run_id}: stage {stage.name} has not finished (no checkpoint tag)")
    state = load_checkpoint_model(checkpoint_from_uri(checkpoint))
    r = stage.recipe
    model = build_model(stage.arch, num_classes=state["num_classes"], width_mult=r.width_mult,
                        batch_norm=r.batch_norm, input_size=r.crop, dropout=r.dropout)
    model.load_state_dict(state["model"])
    root = data_root or run.data.params.get("data.root")
    info = DatasetInfo.load(root)
    q = scale or stage.eval_scale
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = eval_loader(info, split, rank=0, world_size=1, batch_size=batch_size, scale=q, crop=r.crop,
                         normalize_std=r.normalize_std, device=device)
    result = evaluate(model.to(device), loader, device, precision=r.precision)
    prefix = f"single_Q{q}"
    logger = MetricsLogger(tracking_uri, run_id, enabled=True)
    logger.log({f"{prefix}/top1_error": result["top1_error"], f"{prefix}/top5_error": result["top5_error"]}, step=0)
    return dict(result, metric_prefix=prefix)
