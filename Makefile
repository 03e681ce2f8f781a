# The two commands: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines: the CPU build of torch (on local disk here). For a GPU node, see docs/gpu.md.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast clean models mlflow-server image
# The image cluster/k8s/*.yaml name (see Dockerfile); CONTAINER=podman works the same.
CONTAINER ?= docker
IMAGE ?= ghcr.io/your-org/vgg-pipeline:0.1.0

# Bytecode: the install does not compile (uv's default), and a module is compiled the
# first time a process imports it, its .pyc written beside it for every later process. A
# shell that sets PYTHONDONTWRITEBYTECODE (this project's CI machines do) would make
# every process compile all it imports again (torch, Ray Train, MLflow and DALI: about
# 4,700 modules, 28 CPU-s compiled against a few s loaded), so the commands make runs
# write it; the .pyc files go into .venv and __pycache__ folders, both ignored by git.
# The whole suite imports a third of what is installed (7,000 of the venv's 21,000
# modules), so it compiles as it goes; `make install` compiles the whole venv at once,
# for commands run outside make.
export PYTHONDONTWRITEBYTECODE :=

install: $(STAMP) $(VENV)/.compiled

# Everything but torch at the versions every cluster node and the image install
# (cluster/constraints.txt), so the suite tests what the nodes run; torch is the CPU build
# above, or from TORCH_INDEX (a GPU machine: see docs/gpu.md). uv installs them: the same
# versions pip resolves (their `pip freeze` lists match here), in 14-24 s where pip took
# about 70 (it unpacks one wheel at a time: 2.5 GB installed). uv reads no pip.conf, so
# pip's find-links (where this machine kind keeps its CPU torch wheel) are passed on from
# PIP_FIND_LINKS or pip's config, as uv's comma-separated list; pip's extra index URLs are
# not (PyPI gives every package here). pip itself stays, at its pin, for the tests that
# run ray_cluster.yaml's own `pip install` setup commands.
UV_VERSION := 0.13.9
TORCH_INDEX ?=
comma := ,
space := $(subst ,, )
ifndef UV_FIND_LINKS  # expanded once here: an exported recursive variable with $(shell) runs it for every recipe line
UV_FIND_LINKS := $(subst $(space),$(comma),$(strip $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/^global.find-links='\(.*\)'$$/\1/p"))))
endif
export UV_FIND_LINKS
UV := $(VENV)/bin/uv pip install --quiet --python $(PY)
$(STAMP): pyproject.toml cluster/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)")
	grep -v '^torch==' cluster/constraints.txt > $(VENV)/constraints.txt
	$(UV) -c $(VENV)/constraints.txt pip -e ".[test]"
	touch $(STAMP)

# Every module at once, on every core (pip, which compiled as it installed, took 100 of a
# 160 s install on 2 cores doing it one file at a time). Files that are not Python 3
# (templates some packages ship) fail to compile here as they do under pip, so its status
# is not checked: a file left without bytecode is compiled when imported.
$(VENV)/.compiled: $(STAMP)
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	touch $@

demo: $(STAMP)
	$(PY) -m pipeline demo

# Three pytest-xdist workers on this project's 2-core machines: the suite is CPU-bound,
# but each test is a chain of process starts and waits that keeps less than a core busy,
# and a third worker fills some of those gaps (at 4ef6bc2, on one installed venv, one run
# after the other: 278 passed in 16 min 44 s on three, 18 min 52 s on two; an hour later,
# when the VM was slower, 21:04 on three and 21:10 on two; test-fast 115 s and 129 s).
# Files stay whole on one worker, and the files that share their test process's Ray run
# together (tests/conftest.py).
TEST_WORKERS ?= 3
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

models: $(STAMP)
	$(PY) -m pipeline models

# A local MLflow tracking server on 127.0.0.1:5000 serving the store every command uses by
# default (~/.vgg/mlflow.db, artifacts ~/.vgg/mlartifacts; VGG_HOME moves them); then
# `export MLFLOW_TRACKING_URI=http://127.0.0.1:5000`.
mlflow-server: $(STAMP)
	$(PY) -m cluster.tracking_server

image:
	$(CONTAINER) build -t $(IMAGE) .

clean:
	rm -rf data/demo runs  # the MLflow store (~/.vgg) holds experiment history: not removed here
