"""The image the Kubernetes manifests run, checked without building it (no image
registry is reachable here): hadolint finds nothing, its base image carries this
project's Ray and Python, every path it copies exists, its import check names real
modules, the build steps run on exactly what it copies, and the manifests and
`make image` name the same image."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import ray
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"


def test_hadolint_finds_nothing():
    out = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "--no-color", str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_base_image_matches_our_ray_and_python_and_the_build_steps_are_real():
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-gpu$", text, re.M)
    assert base, "the base image must be a Ray GPU image"
    assert base.group(1) == ray.__version__
    assert (base.group(2), base.group(3)) == tuple(platform.python_version_tuple()[:2])
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), path
    check = re.findall(r'python -c "import ([^";]+)"', text)[-1]
    for module in [m.strip() for m in check.split(",")]:
        assert importlib.util.find_spec(module) is not None, module
    assert "cu130" in text  # DALI's nvidia-dali-cuda130 needs torch built for CUDA 13


def test_manifests_and_make_image_name_the_same_image():
    make = (REPO / "Makefile").read_text()
    image = re.search(r"^IMAGE \?= (\S+)$", make, re.M).group(1)
    named = {}
    for path in (REPO / "cluster" / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            named[path.name] = set(re.findall(r"'image': '([^']+)'", str(doc)))
    assert named["raycluster.yaml"] == named["retrain-cronjob.yaml"] == {image}
    assert all(found <= {image} for found in named.values()), named  # rayjob.yaml runs on the RayCluster


def test_the_build_steps_run_on_what_the_image_copies(tmp_path):
    """The Dockerfile's steps, run here on exactly the files it COPYs (no image: no
    registry): the project builds from them (`pip install -e .`'s build, without
    installing), and its import check passes with the modules taken from that copy.
    The torch install step is left out: here torch is the CPU build."""
    import shutil
    import zipfile

    text = DOCKERFILE.read_text()
    image = tmp_path / "vgg-pipeline"
    image.mkdir()
    for src, dest in re.findall(r"^COPY (?:--\S+ )*(.+) (\S+)$", text, re.M):
        for path in src.split():
            target = image / (path if dest == "./" else dest)
            if dest.endswith("/") and dest != "./":  # into a folder
                target = target / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if (REPO / path).is_dir():
                shutil.copytree(REPO / path, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            else:
                shutil.copy(REPO / path, target)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(image)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    [wheel] = (tmp_path / "wheel").glob("vgg_pipeline-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"pipeline/cli.py", "cluster/submit.py", "data_prep/shard.py"} <= set(names)
    check = re.findall(r'python -c "import ([^";]+)"', text)[-1]
    where = ("import importlib, sys; mods = [m.strip() for m in sys.argv[1].split(',')]; "
             "[importlib.import_module(m) for m in mods]; "
             "print(*(sys.modules[m].__file__ for m in mods if m.split('.')[0] in ('pipeline', 'cluster', 'data_prep')), "
             "sep='\\n')")
    out = subprocess.run([sys.executable, "-c", where, check], cwd=image, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr[-3000:]
    files = out.stdout.split()
    assert files and all(Path(f).is_relative_to(image) for f in files), files


def test_dependency_layers_come_before_the_code():
    """Every layer that installs dependencies is built from files that are not the code
    (pyproject.toml, cluster/constraints.txt): a code change rebuilds none of them. The
    code is copied after them, and the project is then installed without dependencies."""
    steps = re.findall(r"^(COPY|RUN) (.+?)(?<!\\)$", DOCKERFILE.read_text(), re.M | re.S)
    code = ("pipeline", "data_prep", "cluster", "tools")
    first_code = min(i for i, (op, arg) in enumerate(steps) if op == "COPY" and arg.split()[-2] in code)
    installs = [i for i, (op, arg) in enumerate(steps) if op == "RUN" and "pip install" in arg]
    dependency_installs = [i for i in installs if "--no-deps" not in steps[i][1]]
    assert len(dependency_installs) >= 2 and max(dependency_installs) < first_code, steps
    assert all(i > first_code for i in installs if i not in dependency_installs)
    copied_before = " ".join(steps[i][1] for i in range(first_code) if steps[i][0] == "COPY")
    assert "pyproject.toml" in copied_before and "cluster/constraints.txt" in copied_before
    assert not any(f" {c} " in f" {copied_before} " for c in code)
