"""Stage NVIDIA DALI for a GPU machine that reaches no package registry and takes at
most 64 MiB per call: only what DALI loads at run time, for one Python version, in
the fewest call-sized parts.

    python tools/stage_dali.py                      # Python 3.12 (the lent GPU machine)
    python tools/stage_dali.py --python 3.11 --out .gpu-wheels

What it leaves behind, and why that is safe:
- DALI's extension modules for every other Python ABI (backend_impl, the python
  function plugin; nvImageCodec's Python binding likewise): ~45 MB unpacked.
- C++ headers (nvidia/dali/include, for building plugins), bytecode caches, and the
  `nvidia/__init__.py` one wheel ships (it would hide the machine's own nvidia.*
  namespace packages, the CUDA libraries beside torch, behind the staged folder).
- nvJPEG2000, nvTIFF and nvCOMP, with nvImageCodec's JPEG2000 and TIFF extensions that
  would load them: no library DALI or nvImageCodec links (ELF NEEDED) names them; they
  are opened on demand for JPEG 2000 and TIFF decoding and for
  fn.experimental.inflate, none of which this project uses (the shards hold JPEGs).
Everything DALI links against (its own .libs: FFmpeg, the AWS and Google Cloud SDKs,
CV-CUDA) stays: the dynamic loader needs all of it to load libdali.so at all.

The staged tree is one tar.xz (xz shrinks the 470 MB of libraries far more than the
wheels' zip deflate), split into parts of at most --part-mib. It prints one device
call per part and the line that unpacks them there.
"""

from __future__ import annotations

import argparse
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REQUIREMENTS = [
    "nvidia-dali-cuda130==2.4.0",
    "nvidia-nvimgcodec-cu13>=0.9,<0.10",  # DALI's decoders run on nvImageCodec
    "nvidia-nvjpeg",  # nvImageCodec's GPU JPEG decoder
    # small run-time dependencies of DALI, and what `bench gpu` needs beyond the machine's own packages
    "optree", "makefun", "libcst~=1.8", "gast<=0.7.0", "astunparse<=1.6.3", "nvtx", "webdataset", "braceexpand",
    "pyyaml",  # the plans (pipeline/config.py); the GPU machine may lack it
]
LEFT_BEHIND = ["nvidia-nvjpeg2k-cu13", "nvidia-nvtiff-cu13", "nvidia-libnvcomp-cu13"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
_ABI_SO = re.compile(r"\.cpython-(\d+t?)-x86_64-linux-gnu\.so$")
_DROP_DIRS = ("nvidia/dali/include", "nvidia/nvimgcodec/include")
_DROP_NAMES = re.compile(r"^lib(nvjpeg2k|nvtiff)_ext\.so")  # extensions that would load the left-behind libraries


def download(python: str, dest: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
           python, "--implementation", "cp", *[x for p in PLATFORMS for x in ("--platform", p)], "-d", str(dest),
           *REQUIREMENTS]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def keep(rel: str, abi: str) -> bool:
    """Whether the file at `rel` (a path inside site-packages) is staged."""
    if "__pycache__" in rel or any(rel == d or rel.startswith(d + "/") for d in _DROP_DIRS):
        return False
    if rel == "nvidia/__init__.py":  # would make `nvidia` a regular package in front of the machine's own
        return False                 # nvidia.* namespace (CUDA libraries next to torch)
    m = _ABI_SO.search(rel)
    if m and m.group(1) != abi:
        return False
    return not _DROP_NAMES.match(Path(rel).name)


def unpack(wheels: list[Path], tree: Path, abi: str) -> dict:
    kept = dropped = 0
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                if not keep(info.filename, abi):
                    dropped += info.file_size
                    continue
                target = tree / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    target.chmod(mode)
                kept += info.file_size
    return {"kept_mb": round(kept / 1e6, 1), "dropped_mb": round(dropped / 1e6, 1)}


def pack(tree: Path, archive: Path) -> None:
    # preset 6 with the 64 MiB dictionary of preset 9 (-e): most of the gain on the big .so
    # files at a fraction of preset 9's time.
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 6 | lzma.PRESET_EXTREME, "dict_size": 64 << 20}]
    with lzma.open(archive, "wb", format=lzma.FORMAT_XZ, filters=filters) as xz:
        with tarfile.open(fileobj=xz, mode="w|") as tar:
            for path in sorted(tree.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=str(path.relative_to(tree)))


def split(archive: Path, out: Path, part_mib: int) -> list[Path]:
    parts, size = [], part_mib << 20
    with open(archive, "rb") as src:
        while chunk := src.read(size):
            folder = out / f"part{len(parts)}"
            folder.mkdir(parents=True)
            piece = folder / f"dali-stage.tar.xz.{len(parts):02d}"
            piece.write_bytes(chunk)
            parts.append(piece)
    return parts


INSTALL = ("{ [ -f /tmp/site/.staged ] || { mkdir -p /tmp/site && cat .gpu-stage/dali-stage.tar.xz.* | python3 -c "
           "\"import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode='r|xz').extractall('/tmp/site')\" "
           "&& touch /tmp/site/.staged; }; } && export PYTHONPATH=/tmp/site:$PWD")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default="3.12", help="the GPU machine's Python (default 3.12)")
    p.add_argument("--out", default=".gpu-wheels", help="where the parts go (ignored by git)")
    p.add_argument("--part-mib", type=int, default=60, help="part size; a device call carries at most 64 MiB")
    p.add_argument("--wheels", help="a folder of already downloaded wheels (skips the download)")
    p.add_argument("--tree", help="also keep the unpacked tree here (to test it on this machine)")
    a = p.parse_args(argv)
    abi = a.python.replace(".", "")
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        wheels = sorted(Path(a.wheels).glob("*.whl")) if a.wheels else download(a.python, tmp / "wheels")
        wheels = [w for w in wheels if not any(w.name.startswith(n.replace("-", "_")) for n in LEFT_BEHIND)]
        tree = Path(a.tree) if a.tree else tmp / "tree"
        shutil.rmtree(tree, ignore_errors=True)
        sizes = unpack(wheels, tree, abi)
        pack(tree, tmp / "dali-stage.tar.xz")
        xz_mb = round((tmp / "dali-stage.tar.xz").stat().st_size / 1e6, 1)
        parts = split(tmp / "dali-stage.tar.xz", out, a.part_mib)
        wheel_mb = round(sum(w.stat().st_size for w in wheels) / 1e6, 1)
    print(f"staged for Python {a.python}: {sizes['kept_mb']} MB unpacked ({sizes['dropped_mb']} MB left behind, "
          f"and {', '.join(LEFT_BEHIND)}); {xz_mb} MB as tar.xz (the wheels: {wheel_mb} MB); {len(parts)} part(s)")
    print("\nDevice calls, back to back in one lease (an idle machine is given back after ~30 s); the last")
    print("one unpacks everything and runs the whole check:")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        # the check's --budget leaves the call's timeout two minutes for the unpack and the transfer back
        then = f" && {INSTALL} && python3 -m pipeline bench gpu --budget 420 --out $OUT/gpu.json" if last else ""
        limit = ", timeout_s=540" if last else ""
        print(f'  run(carry=["{out}/part{i}"], command="mkdir -p .gpu-stage && cp {out}/part{i}/* .gpu-stage/{then}"'
              f'{limit})')
    print("\nLater commands of the same lease start with:\n  " + INSTALL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
