"""The stage-in's answers to two cluster failures, without a cluster: a GPU node whose
stage-in failed (ray_cluster.yaml's worker setup command, run here in bash as Ray runs
it, must not fail the setup, or the autoscaler relaunches the node in a loop; the node
keeps the reason and training on it stops with it), and a live node whose shards are
from before a data change (the next stage-in removes the old set's files; training on
the node stops while its set is not the driver's)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_prep.stagein import FAILED, check_staged, stage_in
from data_prep.store import data_hash

REPO = Path(__file__).resolve().parent.parent


def test_a_failed_gpu_stage_in_leaves_the_node_up_and_says_why(tmp_path):
    """The worker setup command, with the instance-store path moved into tmp_path and
    nvidia-smi and sudo stand-ins on PATH (this machine has no GPU): the bucket cannot be
    read, the command still succeeds, and the node's shard folder says why."""
    [command] = [c for c in yaml.safe_load((REPO / "ray_cluster.yaml").read_text())["worker_setup_commands"]
                 if "--stage-in" in c]
    nvme = tmp_path / "nvme"
    command = command.replace("/opt/dlami/nvme", str(nvme)).replace("chown ubuntu", "chown $(id -un)")
    home, bin_ = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    (home / "venv").symlink_to(sys.prefix)  # the node's venv: this one (nothing is installed here)
    (home / "vgg-pipeline").symlink_to(REPO)
    bin_.mkdir()
    for name, body in (("nvidia-smi", "exit 0"), ("sudo", 'exec "$@"')):
        (bin_ / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_ / name).chmod(0o755)
    env = {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(home), "VGG_BUCKET": "no-such-bucket",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]  # a failed setup: the autoscaler's relaunch loop
    assert "stage-in failed; the node stays up" in out.stderr
    why = (home / "shards" / FAILED).read_text()
    assert why.startswith("stage-in from s3://no-such-bucket/shards failed:"), why
    assert (home / "shards").resolve() == nvme / "shards"


def test_training_on_a_node_refuses_an_unfinished_stage_in_with_its_reason(tmp_path, shards):
    dest = tmp_path / "local"
    assert check_staged(dest) == (f"no shard set at {dest} on this node; python data_prep/shard.py --stage-in SRC "
                                  f"--to {dest} on this node (or replace the node)")
    stage_in(str(shards), dest, workers=1, log=lambda m: None)
    assert check_staged(dest, data_hash(shards)) is None and not (dest / FAILED).exists()
    (dest / "files.json").unlink()  # as a stage-in stopped part-way leaves it
    assert "its stage-in did not finish (it was stopped before the end)" in check_staged(dest)
    (dest / FAILED).write_text("stage-in from s3://b/shards failed: AccessDenied\n")
    assert "(stage-in from s3://b/shards failed: AccessDenied)" in check_staged(dest)
    with pytest.raises(FileNotFoundError):
        stage_in(str(tmp_path / "gone"), dest, workers=1, log=lambda m: None)
    assert "gone/files.json: not found" in (dest / FAILED).read_text()


def test_a_data_change_is_noticed_on_live_nodes(tmp_path, shards):
    """A node staged set 1; the bucket now holds set 2 (one training shard fewer, another
    manifest). Until the node stages in again, training on it stops naming both hashes;
    the next stage-in removes the shard set 2 no longer has, which DALI would otherwise
    read with the new ones."""
    old, new, dest = tmp_path / "v1", tmp_path / "v2", tmp_path / "node"
    shutil.copytree(shards, old)
    shutil.copytree(shards, new)
    listing = json.loads((new / "files.json").read_text())
    dropped = sorted(rel for rel in listing if rel.startswith("train/") and rel.endswith(".tar"))[-1]
    for rel in (dropped, dropped[:-4] + ".idx"):
        (new / rel).unlink()
        listing.pop(rel)
    (new / "classes.json").write_text((new / "classes.json").read_text() + " ")  # another set: another hash
    data = (new / "classes.json").read_bytes()
    listing["classes.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (new / "files.json").write_text(json.dumps(listing))

    stage_in(str(old), dest, workers=1, log=lambda m: None)
    assert (dest / dropped).exists()
    problem = check_staged(dest, data_hash(new))
    assert problem and "is not the one the driver sees" in problem and data_hash(new)[:12] in problem

    said = []
    result = stage_in(str(new), dest, workers=1, log=said.append)
    assert result["removed"] == 2 and not (dest / dropped).exists(), said
    assert check_staged(dest, data_hash(new)) is None
    tars = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.tar"))
    assert tars == sorted(rel for rel in listing if rel.endswith(".tar"))
