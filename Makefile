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

# what `make demo` alone installs (the cli extra), kept apart: `make test` runs a smoke suite against it
DEMO_VENV ?= .venv-demo

.PHONY: demo test venv clean

# $(1): the folder of a virtual environment with only the command line (`make demo`'s install)
define cli_only_venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip -q --disable-pip-version-check install --upgrade pip
	$(1)/bin/python -m pip -q --disable-pip-version-check install -e '.[cli]'
	touch $(1)/.core
endef

$(VENV)/.core: pyproject.toml
	$(call cli_only_venv,$(VENV))

$(DEMO_VENV)/.core: pyproject.toml
	$(call cli_only_venv,$(DEMO_VENV))

$(VENV)/.all: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[all]'
	touch $@ $(VENV)/.core

venv: $(VENV)/.all

demo: $(VENV)/.core
	$(VENV)/bin/softxent train

test: $(VENV)/.all $(DEMO_VENV)/.core
	SOFTXENT_DEMO_VENV=$(DEMO_VENV) $(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_VENV) .pytest_cache .hypothesis
