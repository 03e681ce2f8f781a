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

install: $(STAMP)

# Everything but torch at the versions every cluster node and the image install
# (cluster/constraints.txt), so the suite tests what the nodes run; torch is the CPU build above.
$(STAMP): pyproject.toml cluster/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	grep -v '^torch==' cluster/constraints.txt > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet --no-compile -c $(VENV)/constraints.txt -e ".[test]"
	# pip compiles the bytecode one file at a time (100 of the install's 160 s on 2 cores);
	# compileall does it on every core. Files that are not Python 3 (templates some packages
	# ship) fail to compile here as they do under pip, so its status is not checked: a file
	# left without bytecode is compiled when imported.
	$(PY) -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1 || true
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline demo

# Two pytest-xdist workers (the machine's two cores: much of a Ray test's wall time is
# process start-up and waiting); files stay whole on one worker, longest first, and the files
# that share the test process's Ray run together on one (tests/conftest.py).
TEST_WORKERS ?= 2
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
