# The two set-up commands of the README live here, so CI and people run the very same steps.
#   make demo   create/reuse .venv, install the backend + training, run the main job on a synthetic CT
#   make test   create/reuse .venv, install everything incl. the test extra, run the whole test suite
# Both are idempotent: the install runs again only when pyproject.toml changes.

VENV ?= .venv
PYTHON ?= python3
PIP := $(VENV)/bin/python -m pip
# torch first and pinned: a later unpinned `torch` requirement is then already satisfied by the CPU build,
# instead of pulling several GB of CUDA packages.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test venv

demo: $(VENV)/.installed-demo
	$(VENV)/bin/minigpt-pancreas demo --out demo-output

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest Testing

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -e '.[backend,training]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet $(TORCH_PIN)
	$(PIP) install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-demo
