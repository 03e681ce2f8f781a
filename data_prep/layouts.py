"""ImageNet as people have it on disk: find the layout, list (source, wnid) per split.

Supported:
- folders: SRC/<split>/<wnid>/*.JPEG (torchvision's ImageFolder layout);
- flat validation images SRC/val/ILSVRC2012_val_*.JPEG labelled by Kaggle's
  LOC_val_solution.csv, or by the devkit (ILSVRC2012_validation_ground_truth.txt
  with the ID-to-wnid table in meta.mat; the devkit folder or its .tar.gz);
- the distributed archives, read in place without unpacking:
  SRC/ILSVRC2012_img_train.tar (a tar of 1,000 per-class tars) and
  SRC/ILSVRC2012_img_val.tar (flat, labelled as above).
Class names come from the devkit or LOC_synset_mapping.txt when present.
"""

from __future__ import annotations

import csv
import io
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

WNID = re.compile(r"^n\d{8}$")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
GROUND_TRUTH, META = "ILSVRC2012_validation_ground_truth.txt", "meta.mat"
DEVKIT_DIRS = ("", "ILSVRC2012_devkit_t12/data", "devkit/data", "data")
DEVKIT_TGZ = "ILSVRC2012_devkit_t12.tar.gz"


class LayoutError(ValueError):
    """The source tree is not a layout we know, or a label file is missing or wrong."""


@dataclass(frozen=True)
class Source:
    """One input image: a file, or a member of an uncompressed archive at a byte offset."""

    path: str  # the image file, or the outer archive
    wnid: str
    member: str = ""  # archive members: "n01440764.tar/n01440764_10026.JPEG"
    offset: int = -1  # archive members: where the bytes start in `path`
    size: int = -1

    @property
    def name(self) -> str:
        return self.member.rsplit("/", 1)[-1] if self.member else os.path.basename(self.path)

    @property
    def label(self) -> str:
        """What the manifest and rejects file call it."""
        return f"{self.path}:{self.member}" if self.member else self.path

    def read(self) -> bytes:
        if self.path.startswith("s3://"):
            from data_prep.store import read_bytes

            return read_bytes(self.path, max(self.offset, 0), self.size)
        with open(self.path, "rb") as fh:
            if self.offset < 0:
                return fh.read()
            fh.seek(self.offset)
            return fh.read(self.size)


def _folder_split(split_dir: Path) -> list[Source]:
    sources = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if not WNID.match(class_dir.name):
            raise LayoutError(
                f"{class_dir}: class folders must be WordNet ids like n01440764 (found {class_dir.name!r})"
            )
        sources += [Source(path, class_dir.name) for path in _files(class_dir)]
    return sources


def _files(folder: Path) -> list[str]:
    """The candidate files of a folder as resolved paths, sorted by name (one `scandir`:
    no per-file stat or path resolution unless an entry is a link). Every regular,
    non-hidden file is a candidate: a non-image file in a class folder is rejected with
    a reason, never silently skipped."""
    base = str(folder.resolve())
    with os.scandir(folder) as entries:
        return [os.path.realpath(e.path) if e.is_symlink() else os.path.join(base, e.name)
                for e in sorted(entries, key=lambda e: e.name)
                if not e.name.startswith(".") and e.is_file()]


def _find(src: Path, name: str) -> Path | None:
    for base in (src, src.parent):
        for sub in DEVKIT_DIRS:
            cand = base / sub / name if sub else base / name
            if cand.is_file():
                return cand
    return None


# ---------------------------------------------------------------- validation labels


def _kaggle_labels(solution: Path) -> dict[str, str]:
    labels: dict[str, str] = {}
    with open(solution, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or header[:2] != ["ImageId", "PredictionString"]:
            raise LayoutError(f"{solution}: expected the header 'ImageId,PredictionString', got {header}")
        for lineno, row in enumerate(reader, start=2):
            if len(row) < 2 or not row[1].split() or not WNID.match(row[1].split()[0]):
                raise LayoutError(f"{solution}:{lineno}: no WordNet id in {row}")
            labels[row[0]] = row[1].split()[0]
    return labels


def _read_devkit_file(src: Path, name: str) -> tuple[str, bytes] | None:
    """(where, bytes) of a devkit file, from a devkit folder or the devkit .tar.gz."""
    path = _find(src, name)
    if path is not None:
        return str(path), path.read_bytes()
    for base in (src, src.parent):
        tgz = base / DEVKIT_TGZ
        if tgz.is_file():
            with tarfile.open(tgz) as tar:
                for m in tar:
                    if m.isfile() and m.name.endswith("/" + name):
                        return f"{tgz}:{m.name}", tar.extractfile(m).read()
    return None


def devkit_synsets(src: Path) -> tuple[dict[int, str], dict[str, str]] | None:
    """(ILSVRC2012_ID -> wnid, wnid -> words) from the devkit's meta.mat, if present."""
    found = _read_devkit_file(src, META)
    if found is None:
        return None
    where, data = found
    from scipy.io import loadmat

    try:
        synsets = loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
        ids = [int(i) for i in synsets["ILSVRC2012_ID"]]
        wnids = [str(w) for w in synsets["WNID"]]
        words = [str(w) for w in synsets["words"]]
        leaves = [int(c) == 0 for c in synsets["num_children"]]
    except (KeyError, ValueError, TypeError) as exc:
        raise LayoutError(f"{where}: not the devkit's meta.mat (no synsets table: {exc})") from None
    id_to_wnid = {i: w for i, w, leaf in zip(ids, wnids, leaves) if leaf}
    return id_to_wnid, {w: n for w, n, leaf in zip(wnids, words, leaves) if leaf}


def _devkit_labels(src: Path) -> dict[str, str] | None:
    found = _read_devkit_file(src, GROUND_TRUTH)
    if found is None:
        return None
    where, data = found
    synsets = devkit_synsets(src)
    if synsets is None:
        raise LayoutError(f"{where} needs the devkit's {META} (the ID-to-wnid table) beside it")
    id_to_wnid = synsets[0]
    labels = {}
    for lineno, line in enumerate(data.decode().splitlines(), start=1):
        text = line.strip()
        if not text.isdigit() or int(text) not in id_to_wnid:
            raise LayoutError(f"{where}:{lineno}: {text!r} is not an ILSVRC2012_ID of {META}")
        labels[f"ILSVRC2012_val_{lineno:08d}"] = id_to_wnid[int(text)]
    return labels


def flat_val_labels(src: Path) -> tuple[str, dict[str, str]]:
    """(label file, image stem -> wnid) for flat validation images."""
    solution = _find(src, "LOC_val_solution.csv")
    if solution is not None:
        return str(solution), _kaggle_labels(solution)
    labels = _devkit_labels(src)
    if labels is not None:
        return GROUND_TRUTH, labels
    raise LayoutError(
        f"{src}: flat validation images need labels: expected LOC_val_solution.csv (Kaggle) or the devkit's "
        f"{GROUND_TRUTH} and {META} (in {src}, {src}/ILSVRC2012_devkit_t12/data, or {DEVKIT_TGZ})"
    )


def _label_flat(items: list[tuple[str, Source]], src: Path) -> list[Source]:
    where, labels = flat_val_labels(src)
    out = []
    for stem, source in items:
        if stem not in labels:
            raise LayoutError(f"{where}: no label for {source.name}")
        out.append(Source(source.path, labels[stem], source.member, source.offset, source.size))
    return out


# ---------------------------------------------------------------- archives


def _scan(fh, start: int) -> list[tarfile.TarInfo]:
    """File members of the (uncompressed) tar that starts at `start` in `fh`; their
    offset_data are absolute positions in `fh`."""
    fh.seek(start)
    with tarfile.open(fileobj=fh, mode="r:") as tar:
        return [m for m in tar if m.isfile()]


def _train_archive(archive: Path) -> list[Source]:
    sources = []
    with open(archive, "rb") as fh:
        for outer in sorted(_scan(fh, 0), key=lambda m: m.name):
            wnid = Path(outer.name).stem
            if not outer.name.endswith(".tar") or not WNID.match(wnid):
                raise LayoutError(f"{archive}: member {outer.name!r} is not a per-class <wnid>.tar")
            for inner in sorted(_scan(fh, outer.offset_data), key=lambda m: m.name):
                if Path(inner.name).name.startswith("."):
                    continue
                sources.append(Source(str(archive), wnid, f"{outer.name}/{inner.name}", inner.offset_data, inner.size))
    return sources


def _val_archive(archive: Path, src: Path) -> list[Source]:
    with open(archive, "rb") as fh:
        members = sorted(_scan(fh, 0), key=lambda m: m.name)
    items = [(Path(m.name).stem, Source(str(archive), "", m.name, m.offset_data, m.size))
             for m in members if not Path(m.name).name.startswith(".")]
    return _label_flat(items, src)


# ---------------------------------------------------------------- entry points


def _remote_folder_split(src: str, split: str) -> list[Source]:
    """The folder layout in object storage: s3://.../SRC/<split>/<wnid>/<file>."""
    from data_prep.store import join, listdir

    base = join(src, split)
    found = listdir(base, recursive=True)
    if not found:
        raise LayoutError(f"{base}: no objects; on object storage the source must be the folder layout "
                          f"{src}/{split}/<wnid>/*.JPEG (archives and devkit files: copy them to a disk)")
    sources = []
    for rel, _ in found:
        wnid, _, name = rel.partition("/")
        if not name or "/" in name or not WNID.match(wnid):
            raise LayoutError(f"{join(base, rel)}: expected {base}/<wnid>/<file>, e.g. n01440764/x.JPEG")
        if not name.startswith("."):
            sources.append(Source(join(base, rel), wnid))
    return sources


def list_split(src: Path | str, split: str) -> list[Source]:
    if str(src).startswith("s3://"):
        return _remote_folder_split(str(src), split)
    if not src.is_dir():
        raise LayoutError(f"{src}: {'not a folder' if src.exists() else 'no such folder'}; --src is the folder "
                          f"that holds ImageNet's {split}/ folder (or its archives {TRAIN_TAR} / {VAL_TAR})")
    split_dir = src / split
    archive = src / (TRAIN_TAR if split == "train" else VAL_TAR if split == "val" else "")
    if not split_dir.is_dir():
        if archive.is_file():
            return _train_archive(archive) if split == "train" else _val_archive(archive, src)
        raise LayoutError(
            f"{src}: no {split}/ folder. Expected {src}/{split}/<wnid>/*.JPEG, flat "
            f"{src}/val/ILSVRC2012_val_*.JPEG with labels, or the archives {TRAIN_TAR} / {VAL_TAR}"
        )
    if any(p.is_dir() for p in split_dir.iterdir()):  # the folder layout
        return _folder_split(split_dir)
    flat = sorted(p for p in split_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if flat:
        return _label_flat([(p.stem, Source(str(p.resolve()), "")) for p in flat], src)
    raise LayoutError(f"{split_dir}: found neither <wnid>/ class folders nor images")


def class_names(src: Path | str) -> dict[str, str]:
    if str(src).startswith("s3://"):
        from data_prep.store import exists, join, read_bytes

        path = join(str(src), "LOC_synset_mapping.txt")
        return _synset_names(read_bytes(path).decode()) if exists(path) else {}
    synsets = devkit_synsets(src)
    if synsets is not None:
        return synsets[1]
    mapping = _find(src, "LOC_synset_mapping.txt")
    return _synset_names(mapping.read_text()) if mapping is not None else {}


def _synset_names(text: str) -> dict[str, str]:
    names: dict[str, str] = {}
    for line in text.splitlines():
        wnid, _, name = line.strip().partition(" ")
        if WNID.match(wnid):
            names[wnid] = name.strip()
    return names
