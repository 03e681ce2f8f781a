"""ImageNet as people have it on disk: find the layout, list (source, wnid) per split.

Supported here:
- folders: SRC/<split>/<wnid>/*.JPEG (torchvision's ImageFolder layout);
- Kaggle's flat validation: SRC/val/ILSVRC2012_val_*.JPEG + LOC_val_solution.csv
  (also found one level up, as the Kaggle download places it).
Class names come from LOC_synset_mapping.txt when present.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

WNID = re.compile(r"^n\d{8}$")
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


class LayoutError(ValueError):
    """The source tree is not a layout we know, or a label file is missing or wrong."""


@dataclass(frozen=True)
class Source:
    path: str  # absolute path of the image file
    wnid: str


def _is_candidate(path: Path) -> bool:
    # Everything that is a regular file and not hidden is a candidate: a non-image
    # file in a class folder is rejected with a reason, never silently skipped.
    return path.is_file() and not path.name.startswith(".")


def _folder_split(split_dir: Path) -> list[Source]:
    sources = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        if not WNID.match(class_dir.name):
            raise LayoutError(
                f"{class_dir}: class folders must be WordNet ids like n01440764 "
                f"(found {class_dir.name!r})"
            )
        sources += [Source(str(p.resolve()), class_dir.name) for p in sorted(class_dir.iterdir()) if _is_candidate(p)]
    return sources


def _find(src: Path, name: str) -> Path | None:
    for cand in (src / name, src.parent / name):
        if cand.is_file():
            return cand
    return None


def _kaggle_val(split_dir: Path, solution: Path) -> list[Source]:
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
    sources = []
    for path in sorted(p for p in split_dir.iterdir() if _is_candidate(p)):
        if path.stem not in labels:
            raise LayoutError(f"{solution}: no label for {path.name}")
        sources.append(Source(str(path.resolve()), labels[path.stem]))
    return sources


def list_split(src: Path, split: str) -> list[Source]:
    split_dir = src / split
    if not split_dir.is_dir():
        raise LayoutError(
            f"{src}: no {split}/ folder. Expected {src}/{split}/<wnid>/*.JPEG "
            f"or, for val, flat {src}/val/ILSVRC2012_val_*.JPEG with LOC_val_solution.csv"
        )
    subdirs = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if subdirs:  # the folder layout; _folder_split names any folder that is not a wnid
        return _folder_split(split_dir)
    flat = [p for p in split_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    if flat:
        solution = _find(src, "LOC_val_solution.csv")
        if solution is None:
            raise LayoutError(
                f"{split_dir}: flat images need labels; expected LOC_val_solution.csv in {src} or {src.parent}"
            )
        return _kaggle_val(split_dir, solution)
    raise LayoutError(f"{split_dir}: found neither <wnid>/ class folders nor images")


def class_names(src: Path) -> dict[str, str]:
    mapping = _find(src, "LOC_synset_mapping.txt")
    names: dict[str, str] = {}
    if mapping is not None:
        for line in mapping.read_text().splitlines():
            wnid, _, name = line.strip().partition(" ")
            if WNID.match(wnid):
                names[wnid] = name.strip()
    return names
