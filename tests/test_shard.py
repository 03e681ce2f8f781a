"""data_prep/shard.py on small real ImageNet-layout trees, bad inputs and a SIGKILL."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep.layouts import LayoutError
from data_prep.shard import build, verify
from data_prep.synth import make_dataset, wnid

REPO = Path(__file__).resolve().parent.parent
SHARD = [sys.executable, str(REPO / "data_prep" / "shard.py")]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_folder_layout_outputs(shards, image_tree):
    manifest = pq.read_table(shards / "manifest.parquet").to_pylist()
    assert {"split", "key", "label", "wnid", "shard", "source", "bytes", "width", "height"} <= set(manifest[0])
    assert sum(r["split"] == "train" for r in manifest) == 6 * 24
    assert sum(r["split"] == "val" for r in manifest) == 6 * 8
    assert len({(r["split"], r["key"]) for r in manifest}) == len(manifest)  # nothing duplicated
    sources = {str(p.resolve()) for p in image_tree.rglob("*.JPEG")}
    assert {r["source"] for r in manifest} == sources  # nothing lost
    classes = json.loads((shards / "classes.json").read_text())
    assert [c["wnid"] for c in classes] == sorted(c["wnid"] for c in classes)
    assert classes[0]["name"] == "disc"  # from LOC_synset_mapping.txt
    assert all(r["label"] == [c["wnid"] for c in classes].index(r["wnid"]) for r in manifest)
    stats = json.loads((shards / "stats.json").read_text())
    assert stats["counts"] == {"train": 144, "val": 48}
    assert len(stats["mean_rgb"]) == 3 and all(0 < m < 255 for m in stats["mean_rgb"])
    assert stats["rgb_eigval"] == sorted(stats["rgb_eigval"], reverse=True)
    # files.json: every file's size and SHA-256 as written (what --stage-in verifies copies by)
    from data_prep.store import digest

    recorded = json.loads((shards / "files.json").read_text())
    on_disk = {str(p.relative_to(shards)) for p in shards.rglob("*") if p.is_file()} - {"files.json", "job.json"}
    assert set(recorded) == on_disk
    assert all(recorded[rel] == digest(shards / rel) for rel in recorded)
    # every shard mixes classes (seeded global shuffle)
    by_shard: dict[str, set] = {}
    for r in manifest:
        by_shard.setdefault(r["shard"], set()).add(r["label"])
    assert all(len(labels) >= 3 for labels in by_shard.values())


def test_tars_read_back_with_tarfile_and_webdataset(shards):
    import webdataset as wds

    manifest = {(r["key"]): r for r in pq.read_table(shards / "manifest.parquet").to_pylist()}
    tar_path = sorted((shards / "train").glob("*.tar"))[0]
    with tarfile.open(tar_path) as tar:
        names = tar.getnames()
        assert names[:3] == [names[0].split(".")[0] + ext for ext in (".cls", ".jpg", ".json")]
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    count = 0
    for sample in wds.WebDataset(str(tar_path), shardshuffle=False).decode("pil"):
        row = manifest[sample["__key__"]]
        assert sample["cls"] == row["label"]
        assert sample["json"]["wnid"] == row["wnid"]
        assert sample["jpg"].size == (row["width"], row["height"])
        count += 1
    assert count == 20


def test_index_matches_dalis_wds2idx(shards, tmp_path):
    tar_path = sorted((shards / "val").glob("*.tar"))[0]
    ours = tar_path.with_suffix(".idx").read_text()
    wds2idx = Path(sys.executable).parent / "wds2idx"
    subprocess.run([str(wds2idx), str(tar_path), str(tmp_path / "ref.idx")], check=True, capture_output=True)
    assert ours == (tmp_path / "ref.idx").read_text()


def test_same_inputs_and_seed_give_identical_bytes(image_tree, shards, tmp_path):
    build(image_tree, tmp_path / "again", samples_per_shard=20, workers=2, progress=False)
    a, b = tree_bytes(shards), tree_bytes(tmp_path / "again")
    assert a.keys() == b.keys() and a == b
    build(image_tree, tmp_path / "seeded", samples_per_shard=20, seed=1, progress=False)
    first = (tmp_path / "seeded" / "train" / "train-000000.tar").read_bytes()
    assert first != a["train/train-000000.tar"]


def _bad_tree(tmp_path: Path) -> Path:
    src = make_dataset(tmp_path / "src", train_per_class=4, val_per_class=2, min_side=48, max_side=64)
    folder = src / "train" / wnid(0)
    img = Image.new("RGB", (50, 40), (200, 30, 30))
    img.convert("CMYK").save(folder / "cmyk.JPEG", "JPEG")
    img.save(folder / "png_in_disguise.JPEG", "PNG")
    good = (folder / f"{wnid(0)}_train_00000.JPEG").read_bytes()
    (folder / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (folder / "empty.JPEG").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "odd name.with.dots;rm -rf.JPEG").write_bytes(good)
    return src


def test_bad_inputs_are_kept_converted_or_rejected_with_reason(tmp_path):
    src = _bad_tree(tmp_path)
    out = tmp_path / "out"
    summary = build(src, out, samples_per_shard=8, progress=False)
    assert summary.rejects == 3
    rejects = {Path(r["source"]).name: r["reason"] for r in
               __import__("csv").DictReader(io.StringIO((out / "rejects.csv").read_text()))}
    assert set(rejects) == {"truncated.JPEG", "empty.JPEG", "notes.txt"}
    assert rejects["empty.JPEG"] == "empty file"
    rows = {Path(r["source"]).name: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert "CMYK" in rows["cmyk.JPEG"]["action"] and "PNG" in rows["png_in_disguise.JPEG"]["action"]
    # converted images are RGB JPEGs in the shard
    key = rows["cmyk.JPEG"]["key"]
    with tarfile.open(out / rows["cmyk.JPEG"]["shard"]) as tar:
        data = tar.extractfile(f"{key}.jpg").read()
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.mode) == ("JPEG", "RGB")
    odd = rows["odd name.with.dots;rm -rf.JPEG"]["key"]
    assert "." not in odd and "/" not in odd and " " not in odd and ";" not in odd
    # exit 0 with rejects, non-zero with --strict
    ok = subprocess.run(SHARD + ["--src", str(src), "--out", str(tmp_path / "o2"), "--quiet"], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    assert "3 rejected, " in ok.stdout and f"each rejected input and why: {tmp_path / 'o2' / 'rejects.csv'}" in ok.stdout
    strict = subprocess.run(SHARD + ["--src", str(src), "--out", str(tmp_path / "o3"), "--strict", "--quiet"],
                            capture_output=True, text=True)
    assert strict.returncode != 0 and "rejected" in strict.stderr


def test_kaggle_flat_val_layout(tmp_path):
    src = make_dataset(tmp_path / "src", train_per_class=3, val_per_class=2, min_side=48, max_side=64)
    lines = ["ImageId,PredictionString"]
    for i, path in enumerate(sorted((src / "val").rglob("*.JPEG"))):
        flat = src / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG"
        lines.append(f"{flat.stem},{path.parent.name} 1 2 3 4")
        shutil.move(path, flat)
    for d in (src / "val").iterdir():
        if d.is_dir():
            d.rmdir()
    with pytest.raises(LayoutError, match="LOC_val_solution.csv"):
        build(src, tmp_path / "nolabels", progress=False)
    (src / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    build(src, tmp_path / "out", samples_per_shard=5, progress=False)
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    val = [r for r in rows if r["split"] == "val"]
    assert len(val) == 12 and all(r["key"].startswith("ILSVRC2012_val_") for r in val)
    wrong = lines[:1] + [lines[1].split(",")[0] + ",notawnid 1 2"] + lines[2:]
    (src / "LOC_val_solution.csv").write_text("\n".join(wrong) + "\n")
    with pytest.raises(LayoutError, match=r"LOC_val_solution.csv:2"):
        build(src, tmp_path / "bad", progress=False)


def test_unknown_layout_says_what_it_expected(tmp_path):
    (tmp_path / "train" / "cats").mkdir(parents=True)
    with pytest.raises(LayoutError, match="WordNet ids"):
        build(tmp_path, tmp_path / "out", progress=False)
    with pytest.raises(LayoutError, match="no train/ folder"):
        build(tmp_path / "train", tmp_path / "out", progress=False)
    missing = subprocess.run(SHARD + ["--src", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "o")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and f"{tmp_path / 'nonexistent'}: no such folder" in missing.stderr
    assert not (tmp_path / "o").exists()  # nothing written for a source that is not there


def test_sigkill_then_rerun_gives_identical_output(image_tree, tmp_path):
    reference = tmp_path / "reference"
    build(image_tree, reference, samples_per_shard=4, progress=False)
    out = tmp_path / "killed"
    cmd = SHARD + ["--src", str(image_tree), "--out", str(out), "--samples-per-shard", "4", "--workers", "1",
                   "--quiet"]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list(out.glob("train/*.tar"))) < 3:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(list(out.glob("train/*.tar")))
    assert 3 <= finished < 36, "the kill should land mid-job"
    assert not (out / "manifest.parquet").exists()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{finished}" in done.stdout and "already done" in done.stdout
    assert tree_bytes(out) == tree_bytes(reference)
    assert not list(out.rglob("*.tmp"))


def test_half_written_shard_is_not_counted_as_done(image_tree, tmp_path):
    out = tmp_path / "out"
    build(image_tree, out, samples_per_shard=20, progress=False)
    reference = tree_bytes(out)
    victim = out / "train" / "train-000002.tar"
    victim.rename(victim.with_name(victim.name + ".tmp"))  # as if killed before the final rename
    (victim.with_name(victim.name + ".tmp")).write_bytes(b"partial")
    summary = build(image_tree, out, samples_per_shard=20, progress=False)
    assert summary.shards_written == 1
    assert tree_bytes(out) == reference


def test_other_job_in_same_out_is_refused(image_tree, tmp_path):
    out = tmp_path / "out"
    build(image_tree, out, samples_per_shard=20, progress=False)
    with pytest.raises(RuntimeError, match="different job"):
        build(image_tree, out, samples_per_shard=30, progress=False)


def test_verify_finds_tampering(image_tree, tmp_path):
    out = tmp_path / "out"
    build(image_tree, out, samples_per_shard=20, progress=False)
    assert verify(out) == []
    ok = subprocess.run(SHARD + ["--out", str(out), "--verify"], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK" in ok.stdout
    (out / "val" / "val-000001.tar").unlink()
    problems = verify(out)
    assert problems and "val/val-000001.tar: missing" in problems[0]


def test_resize_shorter_reencodes_large_images(image_tree, tmp_path):
    out = tmp_path / "out"
    build(image_tree, out, samples_per_shard=50, resize_shorter=70, progress=False)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    resized = [r for r in rows if r["action"].startswith("resized")]
    assert resized and all(min(r["width"], r["height"]) > 70 for r in resized)
    kept = [r for r in rows if r["action"] == "kept"]
    assert kept and all(min(r["width"], r["height"]) <= 70 for r in kept)
    r = resized[0]
    with tarfile.open(out / r["shard"]) as tar:
        with Image.open(io.BytesIO(tar.extractfile(f"{r['key']}.jpg").read())) as im:
            assert min(im.size) == 70


# ---------------------------------------------------------------- devkit and archives


def _write_devkit(folder: Path, wnids: list[str], val_wnids: list[str]) -> None:
    """meta.mat (synsets with ILSVRC2012_ID, WNID, words, num_children, one non-leaf)
    and the ground truth file, as the devkit ships them."""
    import numpy as np
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    rows = [(i + 1, w, f"class {w}", 0) for i, w in enumerate(reversed(wnids))]  # IDs not in wnid order
    rows.append((len(wnids) + 1, "n99999999", "a non-leaf synset", 2))
    table = np.zeros((len(rows),), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                           ("num_children", "O")])
    for i, row in enumerate(rows):
        table[i] = row
    savemat(folder / "meta.mat", {"synsets": table})
    ids = {w: i for i, w, _, _ in rows}
    (folder / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[w]}\n" for w in val_wnids))


def _flatten_val(src: Path) -> list[str]:
    """Move val/<wnid>/*.JPEG to val/ILSVRC2012_val_N.JPEG; return the wnid of each N."""
    wnids = []
    for i, path in enumerate(sorted((src / "val").rglob("*.JPEG"))):
        wnids.append(path.parent.name)
        shutil.move(path, src / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    for d in [d for d in (src / "val").iterdir() if d.is_dir()]:
        d.rmdir()
    return wnids


def test_devkit_flat_val_layout(tmp_path):
    src = make_dataset(tmp_path / "src", train_per_class=3, val_per_class=2, min_side=48, max_side=64)
    (src / "LOC_synset_mapping.txt").unlink()
    val_wnids = _flatten_val(src)
    classes = sorted({p.name for p in (src / "train").iterdir()})
    devkit = src / "ILSVRC2012_devkit_t12" / "data"
    (devkit).mkdir(parents=True)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("1\n")
    with pytest.raises(LayoutError, match="needs the devkit's meta.mat"):
        build(src, tmp_path / "nometa", progress=False)
    _write_devkit(devkit, classes, val_wnids)
    build(src, tmp_path / "out", samples_per_shard=5, progress=False)
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    val = {r["key"]: r["wnid"] for r in rows if r["split"] == "val"}
    assert val == {f"ILSVRC2012_val_{i + 1:08d}": w for i, w in enumerate(val_wnids)}
    names = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert [c["wnid"] for c in names] == classes and names[0]["name"] == f"class {classes[0]}"
    gt = devkit / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text(gt.read_text().replace("\n", "\n", 1).replace(gt.read_text().split()[0], "5000", 1))
    with pytest.raises(LayoutError, match=r"ILSVRC2012_validation_ground_truth.txt:1: '5000'"):
        build(src, tmp_path / "mislabelled", progress=False)


def _archive_layout(tree: Path, dest: Path) -> Path:
    """The distributed files: a tar of per-class tars, a flat val tar, the devkit .tar.gz."""
    dest.mkdir(parents=True)
    inner_dir = dest / "_inner"
    inner_dir.mkdir()
    with tarfile.open(dest / "ILSVRC2012_img_train.tar", "w") as outer:
        for class_dir in sorted((tree / "train").iterdir()):
            inner = inner_dir / f"{class_dir.name}.tar"
            with tarfile.open(inner, "w") as tar:
                for img in sorted(class_dir.iterdir()):
                    tar.add(img, arcname=img.name)
            outer.add(inner, arcname=inner.name)
    shutil.rmtree(inner_dir)
    val_wnids = []
    with tarfile.open(dest / "ILSVRC2012_img_val.tar", "w") as tar:
        for i, img in enumerate(sorted((tree / "val").rglob("*.JPEG"))):
            val_wnids.append(img.parent.name)
            tar.add(img, arcname=f"ILSVRC2012_val_{i + 1:08d}.JPEG")
    devkit = dest / "_devkit" / "ILSVRC2012_devkit_t12" / "data"
    _write_devkit(devkit, sorted(p.name for p in (tree / "train").iterdir()), val_wnids)
    with tarfile.open(dest / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tgz:
        tgz.add(dest / "_devkit" / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    shutil.rmtree(dest / "_devkit")
    return dest


def test_distributed_archives_read_in_place_match_the_folder_layout(image_tree, shards, tmp_path):
    src = _archive_layout(image_tree, tmp_path / "dist")
    before = sorted(p.name for p in src.iterdir())
    out = tmp_path / "out"
    build(src, out, samples_per_shard=20, progress=False)
    assert sorted(p.name for p in src.iterdir()) == before  # nothing unpacked beside the archives
    folder, archive = tree_bytes(shards), tree_bytes(out)
    train = [k for k in folder if k.startswith("train/") and k.endswith((".tar", ".idx"))]
    assert train and all(archive[k] == folder[k] for k in train)  # same images -> same shards
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert sum(r["split"] == "val" for r in rows) == 48
    assert all(":" in r["source"] and "ILSVRC2012_img_" in r["source"] for r in rows)
    folder_val = Counter(r["wnid"] for r in pq.read_table(shards / "manifest.parquet").to_pylist()
                         if r["split"] == "val")
    assert Counter(r["wnid"] for r in rows if r["split"] == "val") == folder_val


@pytest.mark.slow
def test_shards_as_ray_tasks_equal_local_processes(image_tree, shards, tmp_path, ray_cluster):
    out = tmp_path / "ray"
    summary = build(image_tree, out, samples_per_shard=20, progress=False, ray_address="local")
    assert summary.shards_written == 11
    assert tree_bytes(out) == tree_bytes(shards)


def test_write_failure_names_the_shard_and_records_nothing(image_tree, shards, tmp_path):
    """A write error (here the file-size limit, as a full disk would be) stops the job
    with the shard's name; the rerun completes to the same bytes."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    out = tmp_path / "out"
    cmd = SHARD + ["--src", str(image_tree), "--out", str(out), "--samples-per-shard", "20", "--workers", "1",
                   "--quiet"]
    failed = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit)
    assert failed.returncode == 2
    assert re.search(r"writing shard .*/train/train-\d{6}\.tar: File too large", failed.stderr), failed.stderr
    assert not (out / "manifest.parquet").exists()
    for tar in out.rglob("*.tar"):  # whatever was renamed into place is complete
        assert tar.stat().st_size < 40_000 and tar.with_suffix(".meta.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert tree_bytes(out) == tree_bytes(shards)


@pytest.mark.parametrize("keep", [0.9, 0.99, "no EOI"])
def test_every_check_rejects_truncation_and_only_the_needed_pixels_are_decoded(keep):
    import numpy as np
    from PIL import Image

    from data_prep.writer import prepare_image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray((rng.random((375, 500, 3)) * 255).astype("uint8")).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    cut = data[:-2] if keep == "no EOI" else data[: int(len(data) * keep)]
    for check in ("scan", "decode", "full"):
        for pixels in (False, True):
            with pytest.raises(ValueError, match="truncated"):
                prepare_image(cut, None, check, pixels)
    assert prepare_image(data, None, "scan", pixels=False) == (data, 500, 375, "kept", None)  # nothing decoded
    _, w, h, action, small = prepare_image(data, None, "scan", pixels=True)
    assert (w, h, action) == (500, 375, "kept") and small.size == (500, 375)  # 1/2 would leave 188 < 256
    buf = io.BytesIO()
    Image.fromarray((rng.random((750, 1000, 3)) * 255).astype("uint8")).save(buf, "JPEG", quality=90)
    assert prepare_image(buf.getvalue(), None, "scan", pixels=True)[4].size == (500, 375)  # DCT-scaled by 1/2
    assert max(prepare_image(data, None, "decode", pixels=False)[4].size) < 500  # checked at 1/8 scale
    assert prepare_image(data, None, "full")[4].size == (500, 375)


def test_tar_headers_are_what_tarfile_writes():
    import tarfile

    from data_prep.writer import _Tar

    for name in ("a.jpg", "n01440764_10026.cls", "x" * 96 + ".jpg", "x" * 100 + ".json", "é_ü.json"):
        for size in (0, 1, 511, 512, 123_456, 8**11 - 1, 8**11):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
            try:
                expected = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
            except ValueError as exc:
                with pytest.raises(ValueError, match=str(exc)):
                    _Tar.header(name, size)
                continue
            assert _Tar.header(name, size) == expected, (name, size)


def test_colour_statistics_from_a_sample_estimate_those_of_every_image(image_tree, shards, tmp_path):
    from data_prep.shard import build
    from data_prep.writer import in_stats_sample

    full = json.loads((shards / "stats.json").read_text())  # 144 training images < the default sample: all
    build(image_tree, tmp_path / "sampled", samples_per_shard=20, workers=1, progress=False, stats_sample=72)
    sampled = json.loads((tmp_path / "sampled" / "stats.json").read_text())
    assert sampled["options"]["stats_sample"] == 72 and full["options"]["stats_sample"] == 10_000
    assert 0.3 * full["stats_pixels"] < sampled["stats_pixels"] < 0.7 * full["stats_pixels"]
    assert np.abs(np.subtract(sampled["mean_rgb"], full["mean_rgb"])).max() < 8  # of 255 levels
    principal = [np.asarray(s["rgb_eigvec"])[:, 0] for s in (sampled, full)]  # unit columns, sign arbitrary
    assert abs(principal[0] @ principal[1]) > 0.95
    # the same shards either way: the sample only decides whose pixels are counted
    def data_files(root):
        return {k: v for k, v in tree_bytes(root / "train").items() if k.endswith((".tar", ".idx"))}

    assert data_files(tmp_path / "sampled") == data_files(shards)
    picked = sum(in_stats_sample(f"n01440764_{i}", 0.01) for i in range(20_000))
    assert 150 < picked < 250  # about the fraction asked for (200 +- 5 sigma)


def _eigenvalues(pixels: np.ndarray) -> np.ndarray:
    px = pixels.reshape(-1, 3).astype(np.float64)
    return np.sort(np.linalg.eigvalsh(np.cov(px, rowvar=False, bias=True)))[::-1]


def test_colour_eigenvalues_at_training_scale_are_close_to_full_resolution_ones():
    """On real photos (scikit-image's bundled ones, ImageNet-sized), the eigenvalues shard.py
    computes (shorter side 256, the smallest training scale) come within 8% of the
    full-resolution ones; the 64-pixel thumbnails used before were 10-25% low."""
    import skimage.data
    from PIL import Image

    from data_prep.writer import ShardResult, _accumulate, prepare_image

    photos = {"astronaut": skimage.data.astronaut(), "chelsea": skimage.data.chelsea(),
              "coffee": skimage.data.coffee(), "rocket": skimage.data.rocket(),
              "motorcycle": skimage.data.stereo_motorcycle()[0]}
    ours, thumbs = [], []
    for name, array in photos.items():
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, "JPEG", quality=95)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            decoded = im.convert("RGB")
        full = _eigenvalues(np.asarray(decoded))
        stats = ShardResult("s")
        _accumulate(stats, prepare_image(buf.getvalue(), None, "scan", pixels=True)[4])
        mean = np.asarray(stats.rgb_sum) / stats.pixels
        cov = np.asarray(stats.rgb_outer) / stats.pixels - np.outer(mean, mean)
        got = np.sort(np.linalg.eigvalsh(cov))[::-1]
        thumb = decoded.copy()
        thumb.thumbnail((64, 64))
        ours.append(got[:2] / full[:2])
        thumbs.append(_eigenvalues(np.asarray(thumb))[:2] / full[:2])
        assert np.all(np.abs(got[:2] / full[:2] - 1) < 0.15), (name, got, full)
        assert abs(got.sum() / full.sum() - 1) < 0.08, (name, got, full)  # total colour variance
    assert np.mean(ours) > 0.93 and np.mean(thumbs) < 0.9
