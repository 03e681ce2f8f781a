# The two commands: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines: the CPU build of torch (on local disk here). For a GPU node, see README.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test test-fast clean models

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pipeline demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

models: $(STAMP)
	$(PY) -m pipeline models

clean:
	rm -rf data/demo runs mlflow.db
