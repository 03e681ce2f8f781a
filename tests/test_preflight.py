"""Preflight: what `python -m pipeline train` finds wrong before Ray is started, one line
per problem naming the path, key or stage and the command that fixes it, exit 2, in a
few seconds. Real shard sets (the session's, copied and then broken), a real MLflow
SQLite file, a closed loopback port for a tracking server that is down. No Ray."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.preflight import check, check_shards, check_storage, check_tracking
from pipeline.stages import PLANS_DIR, load_plan

REPO = Path(__file__).resolve().parent.parent
SPLITS = {"data.train_split": "train", "data.val_split": "val"}


@pytest.fixture
def shard_copy(shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    return out


def lines(problems) -> list[str]:
    return [str(p) for p in problems]


def test_a_finished_shard_set_and_a_local_store_pass(shard_copy, tmp_path):
    plan = load_plan(PLANS_DIR / "demo.yaml", [f"data.root={shard_copy}", f"storage={tmp_path / 'runs'}"])
    assert check(plan, f"sqlite:///{tmp_path / 'mlflow.db'}") == []


def test_a_missing_shard_set_names_the_root_and_the_command(tmp_path):
    [problem] = check_shards(str(tmp_path / "nowhere"), SPLITS)
    assert problem.where == f"data.root {tmp_path / 'nowhere'}"
    assert f"python data_prep/shard.py --src IMAGENET_DIR --out {tmp_path / 'nowhere'}" in problem.fix


def test_a_foreign_set_that_was_never_indexed_says_index(shard_copy):
    for path in list(shard_copy.rglob("*")):  # leave only the tars, as another tool would
        if path.is_file() and path.suffix != ".tar":
            path.unlink()
    [problem] = check_shards(str(shard_copy), SPLITS)
    assert "never indexed" in problem.what and problem.fix == f"python data_prep/shard.py --index {shard_copy}"


def test_a_half_written_set_names_each_missing_or_disagreeing_file(shard_copy):
    (shard_copy / "manifest.parquet").unlink()  # written last: the job did not finish
    idx = sorted((shard_copy / "train").glob("*.idx"))[0]
    idx.unlink()
    tar = sorted((shard_copy / "val").glob("*.tar"))[0]
    with open(tar, "ab") as fh:  # a tar that is not the one that was written
        fh.write(b"\0" * 512)
    out = lines(check_shards(str(shard_copy), SPLITS))
    assert any(line.startswith(f"{shard_copy / 'manifest.parquet'}: missing") for line in out), out
    assert any(line.startswith(f"{idx}: DALI index missing") for line in out), out
    assert any(line.startswith(f"{tar}: ") and "files.json recorded" in line for line in out), out
    # the stats' count no longer matches what the indexes hold once one index is gone
    assert any(line.startswith(f"{shard_copy / 'train'}: the DALI indexes hold") for line in out), out
    assert all("--out" in line for line in out)  # our own set: rerun the job that made it


def test_a_split_that_is_not_there_names_the_plan_key(shard_copy):
    out = lines(check_shards(str(shard_copy), {"data.train_split": "train", "data.val_split": "validation"}))
    assert out[0].startswith(f"data.val_split {shard_copy / 'validation'}: no .tar shards for split 'validation'")


def test_stats_that_disagree_with_the_indexes(shard_copy):
    stats = json.loads((shard_copy / "stats.json").read_text())
    stats["counts"]["val"] += 1
    (shard_copy / "stats.json").write_text(json.dumps(stats))
    out = lines(check_shards(str(shard_copy), SPLITS))
    assert any(line.startswith(f"{shard_copy / 'val'}: the DALI indexes hold") and f"says {stats['counts']['val']}"
               in line for line in out), out


def test_storage_that_cannot_be_written_and_tracking_that_does_not_answer(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    [problem] = check_storage(str(blocker / "runs"))
    assert problem.where == f"storage {blocker / 'runs'}" and "--set storage=" in problem.fix
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    [problem] = check_tracking(f"http://127.0.0.1:{port}")
    assert "not reachable" in problem.what and "cluster.tracking_server" in problem.fix
    # a fresh machine's default store: its folder is made, as MLflow makes the file
    assert check_tracking(f"sqlite:///{tmp_path / 'fresh' / 'home' / 'mlflow.db'}") == []
    assert (tmp_path / "fresh" / "home").is_dir()
    [problem] = check_tracking(f"sqlite:///{blocker / 'home' / 'mlflow.db'}")
    assert f"folder {blocker / 'home'} cannot be made" in problem.what


def test_a_global_batch_larger_than_the_training_split_names_the_stage(shards, tmp_path):
    """The session's set has 144 training images (conftest.py): a batch of 145 gives no step
    an epoch; 144 is one. (Found in the workers otherwise, a minute and a traceback later.)"""
    plan = load_plan(PLANS_DIR / "demo.yaml", [f"data.root={shards}", f"storage={tmp_path / 'runs'}",
                                               "stages.B.recipe.batch_size=145", "stages.A.recipe.batch_size=144"])
    [problem] = check(plan, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert str(problem) == ("stage B: recipe.batch_size: a global batch of 145 is more than the 144 images of split "
                            "'train' (not one step an epoch); fix: --set stages.B.recipe.batch_size=144 (or less), "
                            "or a larger shard set")


def test_train_exits_2_in_seconds_without_starting_ray(shard_copy, tmp_path):
    """The command as a user types it, with everything wrong at once: each problem on a
    line of its own, exit 2, no Ray imported (so none started), in under 5 s."""
    (shard_copy / "manifest.parquet").unlink()
    plan = yaml.safe_load((PLANS_DIR / "demo.yaml").read_text())
    plan.update(storage=str(tmp_path / "file" / "runs"), data=dict(plan["data"], root=str(shard_copy)))
    (tmp_path / "file").write_text("")
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    probe = ("import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
             "print('ray imported' if 'ray' in sys.modules else 'no ray'); sys.exit(rc)")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", probe, "train", "--plan", str(path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    seconds = time.monotonic() - started
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout.strip() == "no ray"
    err = out.stderr.splitlines()
    assert err[0] == "preflight: 3 problem(s); nothing was started:", out.stderr
    assert err[1].startswith(f"  {shard_copy / 'manifest.parquet'}: missing")
    assert err[2].startswith(f"  storage {tmp_path / 'file' / 'runs'}: not writable")
    assert err[3].startswith(f"  MLFLOW_TRACKING_URI http://127.0.0.1:{port}: not reachable")
    assert "Traceback" not in out.stderr
    assert seconds < 5, f"preflight took {seconds:.1f} s"


def test_submit_checks_what_it_can_see_before_contacting_the_cluster(tmp_path, capsys):
    """cluster.submit, with the shard set on a mount it shares with the cluster: an unindexed
    foreign set is refused with the --index command, before the (unreachable) cluster is asked."""
    from cluster.submit import main

    for split in ("train", "val"):
        (tmp_path / "wds" / split).mkdir(parents=True)
        (tmp_path / "wds" / split / f"{split}-0000.tar").write_bytes(b"")
    rc = main(["--plan", str(PLANS_DIR / "demo.yaml"), "--set", f"data.root={tmp_path / 'wds'}",
               "--address", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert rc == 2 and "nothing was submitted" in err, err
    assert f"fix: python data_prep/shard.py --index {tmp_path / 'wds'}" in err


def test_ready_stages_start_on_the_critical_path_first():
    """paper.yaml: A feeds every deeper net, so it goes before A-LRN (a leaf); of wave 2,
    the D and E chains (D-256 -> D-384 -> D-multi, deeper nets) go before B-256 (a leaf)."""
    from pipeline.schedule import critical_path_priority

    plan = load_plan(PLANS_DIR / "paper.yaml")
    p = critical_path_priority(plan)
    assert p["A"] > p["A-LRN"]
    assert p["E-256"] > p["D-256"] > p["C-256"] > p["B-256"]
    assert p["D-256"] > p["D-384"] > p["D-multi"]
    ready = sorted(["B-256", "C-256", "D-256", "E-256"], key=lambda n: -p[n])
    assert ready == ["E-256", "D-256", "C-256", "B-256"]
