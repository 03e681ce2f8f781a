"""The stage loop on its own, without Ray: set up, restore, run, each report and its
checkpoint, as pipeline/worker.py seats it for Ray Train (here: one rank, no DDP wrap,
reports kept in a list). The Ray tests (test_train, test_failures, test_parallel) run
the same loop under Ray Train with two ranks."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch
from services import tiny_plan

from pipeline.stageloop import (CHECKPOINT_FILE, WEIGHTS_FILE, Seat, StageLoop, read_checkpoint, run_stage,
                                write_checkpoint)
from pipeline.stages import load_plan


def _seat(reports: list, resume: dict | None = None, samples_node: bool = False) -> Seat:
    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        state = None
        if checkpoint_dir:  # the seat's to delete, as Ray Train does once it has uploaded it
            # each tensor once: the weights apart from the training state
            assert "model" in torch.load(checkpoint_dir / WEIGHTS_FILE, weights_only=False)
            assert "model" not in torch.load(checkpoint_dir / CHECKPOINT_FILE, weights_only=False)
            state = read_checkpoint(checkpoint_dir)
            shutil.rmtree(checkpoint_dir)
        reports.append((metrics, state))

    return Seat(rank=0, world=1, device=torch.device("cpu"), report=report, wrap=lambda m: m, resume=resume,
                node="n0", samples_node=samples_node)


def test_each_epoch_reports_with_its_checkpoint_and_a_resume_continues_where_it_stopped(tmp_path, shards,
                                                                                        monkeypatch):
    monkeypatch.setattr("pipeline.sysmetrics.INTERVAL_S", 0.05)
    plan = load_plan(tiny_plan(tmp_path, shards, name="loop", experiment="loop", epochs=3, log_every_steps=4,
                               optim={"lr": 0.05, "patience": 50}, stages={"A": {"arch": "A", "scale": 36}}))
    stage = plan.stages["A"]
    config = {"stage": stage, "data": plan.data}
    first: list = []
    # two epochs, then the worker "dies": the second epoch's checkpoint is what a restart gets
    two = {"stage": replace(stage, recipe=replace(stage.recipe, epochs=2)), "data": plan.data}
    assert run_stage(two, _seat(first, samples_node=True)) is None
    epochs = [m["epoch"] for m, s in first if s is not None]
    assert epochs == [0, 1] and first[0][0]["data_hash"] and first[0][0]["step_log"]  # the dataset rides once
    assert "data_hash" not in first[1][0]
    # the node's system figures ride with the reports, each sample once, none in the checkpoint
    samples = [s for m, _ in first for s in m["system"]["samples"]]
    assert samples and all(m["system"]["node"] == "n0" for m, _ in first)
    assert len({ts for ts, _ in samples}) == len(samples) and "system" not in first[-1][1]["reported"]
    last = first[-1][1]
    assert (last["epoch"], last["step"], last["arch"], last["num_classes"]) == (1, 9, "A", 6)
    assert set(last["model"]) == set(StageLoop(config, _seat([])).model.state_dict())  # plain names, no module.
    # the full recipe resumes at epoch 3, replaying what the checkpoint's report carried
    resumed: list = []
    assert run_stage(config, _seat(resumed, resume=last)) is None
    assert [m["epoch"] for m, s in resumed if s is not None] == [2]
    # every report with a checkpoint so far, in order: MLflow's sink drops what it has already
    assert [r["epoch"] for r in resumed[0][0]["replay"]] == [0, 1] and resumed[0][0]["resumed_from_epoch"] == 1
    # a checkpoint of the last epoch is booked as it is: one report, nothing trained
    booked: list = []
    assert run_stage(config, _seat(booked, resume=resumed[-1][1])) is None
    assert len(booked) == 1 and booked[0][1] is None and [r["epoch"] for r in booked[0][0]["replay"]] == [0, 1, 2]


def test_a_torn_checkpoint_is_named_in_the_error_wherever_it_is_read(tmp_path):
    """A worker stopped while Ray Train uploads its checkpoint leaves a folder cut short
    in storage (copied straight into its final name, never reported). Reading it, as a
    user who picks a folder by name would (`pipeline evaluate --checkpoint`), fails with
    the file or folder named, not torch's bare "failed finding central directory", and a
    folder whose weights file never arrived is not taken for one from before the split."""
    import re

    import pytest

    from pipeline.worker import checkpoint_from_uri, load_checkpoint_model

    net = torch.nn.Linear(64, 32)
    state = {"model": net.state_dict(), "arch": "A", "num_classes": 32, "epoch": 3, "step": 9,
             "optimizer": torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9).state_dict()}
    whole = tmp_path / "checkpoint_whole"
    whole.mkdir()
    write_checkpoint(whole, state)
    assert read_checkpoint(whole)["epoch"] == 3
    assert load_checkpoint_model(checkpoint_from_uri(str(whole)))["arch"] == "A"
    before_split = tmp_path / "checkpoint_before_split"  # everything in one file: still read
    before_split.mkdir()
    torch.save(state, before_split / CHECKPOINT_FILE)
    assert torch.equal(load_checkpoint_model(checkpoint_from_uri(str(before_split)))["model"]["weight"], net.weight)

    def both_readers_fail(folder: Path, what: str) -> None:
        with pytest.raises((RuntimeError, FileNotFoundError), match=re.escape(what)):
            read_checkpoint(folder)
        # and as evaluation and init_from read it
        with pytest.raises((RuntimeError, FileNotFoundError), match=re.escape(what)):
            load_checkpoint_model(checkpoint_from_uri(str(folder)))

    for torn_file, cut in ((WEIGHTS_FILE, 0.5), (CHECKPOINT_FILE, 0.5), (WEIGHTS_FILE, 0.0)):
        torn = tmp_path / f"checkpoint_torn_{torn_file}_{cut}"
        shutil.copytree(whole, torn)
        data = (whole / torn_file).read_bytes()
        (torn / torn_file).write_bytes(data[:int(len(data) * cut)])  # the bytes copied before the kill
        if torn_file == WEIGHTS_FILE:
            both_readers_fail(torn, f"checkpoint file {torn / torn_file} cannot be read")
        else:  # the weights alone are whole: evaluation reads them; a resume fails
            assert load_checkpoint_model(checkpoint_from_uri(str(torn)))["arch"] == "A"
            with pytest.raises(RuntimeError, match=re.escape(f"checkpoint file {torn / torn_file} cannot be read")):
                read_checkpoint(torn)
    no_weights = tmp_path / "checkpoint_no_weights"  # killed between the two files
    shutil.copytree(whole, no_weights)
    (no_weights / WEIGHTS_FILE).unlink()
    both_readers_fail(no_weights, f"checkpoint folder {no_weights} has {CHECKPOINT_FILE} but no {WEIGHTS_FILE}")
    empty = tmp_path / "checkpoint_empty"  # killed before the first file
    empty.mkdir()
    both_readers_fail(empty, f"checkpoint folder {empty} has no {CHECKPOINT_FILE}")
