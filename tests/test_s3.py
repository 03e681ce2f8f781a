"""Shards in object storage, against a real S3-compatible server (moto's standalone
server on loopback, started here): --src and --out as s3:// URIs, a kill during an S3
write then a rerun, the verified stage-in to local disk (kill, rerun, corruption), and
MLflow artifacts kept in the bucket behind cluster.tracking_server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from services import s3_server, wait_for

from data_prep import store
from data_prep.shard import build
from data_prep.shard import main as shard_main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


def objects(uri: str) -> dict[str, bytes]:
    return {rel: store.read_bytes(store.join(uri, rel)) for rel, _ in store.listdir(uri, recursive=True)}


def upload_tree(local: Path, uri: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        store.upload(path, store.join(uri, str(path.relative_to(local))))


def test_src_and_out_in_object_storage_give_the_local_bytes(s3, image_tree, tmp_path):
    upload_tree(image_tree, "s3://vgg-test/imagenet")
    local = build(image_tree, tmp_path / "local", samples_per_shard=20, workers=1, progress=False)
    remote = build("s3://vgg-test/imagenet", "s3://vgg-test/shards", samples_per_shard=20, workers=2,
                   progress=False)
    assert remote.counts == local.counts and remote.shards_written == local.shards_written
    got = objects("s3://vgg-test/shards")
    for rel in ("train/train-000000.tar", "train/train-000000.idx", "val/val-000001.tar", "stats.json",
                "classes.json"):
        assert got[rel] == (tmp_path / "local" / rel).read_bytes(), rel  # same bytes, wherever they come from
    # the recorded hashes of tars and indexes agree too (manifest and .meta.json name the sources)
    import json

    shard_files = lambda raw: {k: v for k, v in json.loads(raw).items() if k.endswith((".tar", ".idx"))}  # noqa: E731
    assert shard_files(got["files.json"]) == shard_files((tmp_path / "local" / "files.json").read_bytes())
    again = build("s3://vgg-test/imagenet", "s3://vgg-test/shards", samples_per_shard=20, workers=1,
                  progress=False)
    assert again.shards_written == 0 and again.shards_skipped == remote.shards_written


def test_kill_during_an_s3_write_then_rerun_gives_the_same_objects(s3, image_tree, tmp_path):
    build(image_tree, "s3://vgg-test/ref", samples_per_shard=8, workers=1, progress=False)
    cmd = [sys.executable, "data_prep/shard.py", "--src", str(image_tree), "--out", "s3://vgg-test/killed",
           "--samples-per-shard", "8", "--workers", "1", "--quiet"]
    first = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), start_new_session=True)
    deadline = time.monotonic() + 120
    while not any(rel.endswith(".tar") for rel, _ in store.listdir("s3://vgg-test/killed", recursive=True)):
        assert time.monotonic() < deadline and first.poll() is None, "the first shard should be committed"
        time.sleep(0.02)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    partial = objects("s3://vgg-test/killed")
    assert "manifest.parquet" not in partial  # killed before the end: no manifest, so not a finished set
    second = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "already done" in second.stdout
    assert objects("s3://vgg-test/killed") == objects("s3://vgg-test/ref")


def test_stage_in_verifies_resumes_after_a_kill_and_refetches_a_corrupted_copy(s3, image_tree, tmp_path):
    build(image_tree, "s3://vgg-test/stage", samples_per_shard=4, workers=2, progress=False)
    dest = tmp_path / "nvme"
    cmd = [sys.executable, "data_prep/shard.py", "--stage-in", "s3://vgg-test/stage", "--to", str(dest),
           "--workers", "1"]
    first = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (dest / ".stage-in.json").exists() and first.poll() is None:
        time.sleep(0.005)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not (dest / "files.json").exists()  # killed mid-way: the set is not marked complete
    out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "already verified" in out.stdout
    remote = objects("s3://vgg-test/stage")
    remote.pop("job.json")  # the writer's own record of its job, not part of the data set
    local = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()
             and p.name != ".stage-in.json"}
    assert local == remote  # every file, verified, and nothing half-written

    victim = dest / "train" / "train-000002.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF  # one flipped byte, same size
    victim.write_bytes(bytes(data))
    assert shard_main(["--stage-in", "s3://vgg-test/stage", "--to", str(dest), "--workers", "2"]) == 0
    assert victim.read_bytes() == remote["train/train-000002.tar"]

    # A source object that does not match its recorded hash is never taken.
    store.write_bytes("s3://vgg-test/stage/val/val-000000.idx", b"v1.2 0\n")
    bad = tmp_path / "fresh"
    assert shard_main(["--stage-in", "s3://vgg-test/stage", "--to", str(bad)]) == 1
    assert not (bad / "val" / "val-000000.idx").exists() and not (bad / "files.json").exists()


def test_foreign_shards_in_a_bucket_are_indexed_in_place_then_staged_in(s3, tmp_path):
    from test_foreign import write_wds

    from pipeline.data import DatasetInfo, eval_loader
    from pipeline.protocols import rank_keys

    labels = write_wds(tmp_path / "wds", "json")
    upload_tree(tmp_path / "wds", "s3://vgg-test/wds")
    tars_before = {k: v for k, v in objects("s3://vgg-test/wds").items() if k.endswith(".tar")}
    assert shard_main(["--index", "s3://vgg-test/wds", "--num-classes", "6", "--workers", "1"]) == 0
    after = objects("s3://vgg-test/wds")
    assert {k: v for k, v in after.items() if k.endswith(".tar")} == tars_before  # never rewritten
    assert {"files.json", "manifest.parquet", "stats.json", "train/train-0000.idx"} <= set(after)
    dest = tmp_path / "nvme"
    assert shard_main(["--stage-in", "s3://vgg-test/wds", "--to", str(dest)]) == 0
    info = DatasetInfo.load(dest)
    got = [int(v) for _, y in eval_loader(info, "val", rank=0, world_size=1, batch_size=4, scale=72, crop=64,
                                          threads=1) for v in y]
    assert got == [labels[k] for k in rank_keys(info, "val", 0, 1)]


def test_tracking_server_keeps_artifacts_in_the_bucket_and_clients_need_no_credentials(s3, tmp_path):
    """cluster.tracking_server with --artifacts-destination s3://...: a client with no
    AWS settings at all logs and reads artifacts through the server, and they land in
    the bucket (what a job on a GPU node without bucket credentials relies on)."""
    from services import free_port

    from cluster import tracking_server

    proc, url = tracking_server.start(f"sqlite:///{tmp_path / 'mlflow.db'}", f"s3://{s3['bucket']}/mlflow",
                                      free_port(), log=tmp_path / "server.log")
    try:
        client = ("import mlflow, sys\n"
                  "mlflow.set_experiment('artifacts-in-s3')\n"
                  "with mlflow.start_run() as run:\n"
                  "    mlflow.log_text('top-1 error 0.29', 'notes/result.txt')\n"
                  "    mlflow.log_dict({'arch': 'D'}, 'recipe.json')\n"
                  "back = mlflow.artifacts.load_text(run.info.artifact_uri + '/notes/result.txt')\n"
                  "print(run.info.artifact_uri, back, sep='\\n')\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        done = subprocess.run([sys.executable, "-c", client], env=dict(env, MLFLOW_TRACKING_URI=url),
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        artifact_uri, back = done.stdout.strip().splitlines()[-2:]
        assert artifact_uri.startswith("mlflow-artifacts:/") and back == "top-1 error 0.29"
        stored = objects(f"s3://{s3['bucket']}/mlflow")
        [result] = [v for k, v in stored.items() if k.endswith("/artifacts/notes/result.txt")]
        assert result == b"top-1 error 0.29"
        assert any(k.endswith("/artifacts/recipe.json") for k in stored)
    finally:
        tracking_server.stop(proc)


def test_prune_in_a_bucket_removes_the_folders_ray_trains_record_never_listed(s3, tmp_path, mlflow_uri):
    """`prune` on s3:// storage reads Ray Train's record of a run from the bucket: of two
    checkpoint folders it keeps the one the record lists (and a stage run's tag names),
    removes the one it never listed (a stopped worker's upload), and keeps the record."""
    import json

    import pyarrow.fs
    import torch
    from mlflow.tracking import MlflowClient

    from pipeline.prune import prune
    from pipeline.stageloop import write_checkpoint

    local = tmp_path / "runs" / "p-A"
    for name in ("checkpoint_1", "checkpoint_2"):
        (local / name).mkdir(parents=True)
        write_checkpoint(local / name, {"model": torch.nn.Linear(4, 2).state_dict(), "epoch": 0, "step": 1})
    upload_tree(tmp_path / "runs", "s3://vgg-test/ckpts")
    # Ray Train's record, written after both folders (S3 lists modification times to the second)
    result = {"version": 0, "checkpoint_dir_name": "checkpoint_1", "metrics": {"epoch": 0}}
    record = tmp_path / "checkpoint_manager_snapshot.json"
    record.write_text(json.dumps({"checkpoint_results": [result], "latest_checkpoint_result": result,
                                  "pending_training_results": []}))
    fs, base = pyarrow.fs.FileSystem.from_uri("s3://vgg-test/ckpts")
    newest = max(i.mtime_ns for i in fs.get_file_info(pyarrow.fs.FileSelector(base, recursive=True))
                 if i.type == pyarrow.fs.FileType.File)

    def record_written_after() -> bool:
        store.upload(record, "s3://vgg-test/ckpts/p-A/checkpoint_manager_snapshot.json")
        return fs.get_file_info(f"{base}/p-A/checkpoint_manager_snapshot.json").mtime_ns > newest

    wait_for(record_written_after, 10, "a record written after the folders")
    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("prune-s3")
    for tags in ({"kind": "plan"}, {"kind": "stage", "stage": "A", "trial": "p-A", "attempt": "1",
                                    "checkpoint": "s3://vgg-test/ckpts/p-A/checkpoint_1"}):
        run = client.create_run(exp, tags={"plan_run": "p", **tags})
        client.set_terminated(run.info.run_id, "FINISHED")
    said: list[str] = []
    verdicts = prune("s3://vgg-test/ckpts", 1, mlflow_uri, yes=True, say=said.append)
    assert {v.path for v in verdicts if v.remove} == {"vgg-test/ckpts/p-A/checkpoint_2"}, said
    assert set(objects("s3://vgg-test/ckpts")) == {"p-A/checkpoint_1/weights.pt", "p-A/checkpoint_1/state.pt",
                                                   "p-A/checkpoint_manager_snapshot.json"}
