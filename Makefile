# Two commands on a fresh machine:
#   make demo   -- a virtual environment with the command line, then the main job on the bundled data
#   make test   -- a virtual environment with every extra, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
# torch 2.13.0 is pinned and installed first: on the project's machines a CPU build of it lies on disk,
# and any other version pulls gigabytes of CUDA wheels.
TORCH  ?= torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[cli]'
	touch $@

$(VENV)/.all: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[all]'
	touch $@ $(VENV)/.core

venv: $(VENV)/.all

demo: $(VENV)/.core
	$(VENV)/bin/softxent train

test: $(VENV)/.all
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
