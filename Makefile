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

# Upstream's own library stack (transformers 4.30 / peft 0.2.0), in a second environment, computes reference outputs
# of a tiny MiniGPT-v2 in the original file formats; Testing/test_upstream_parity.py checks our model against them.
UPSTREAM_VENV ?= .venv-upstream
PARITY_DIR ?= .cache/upstream-parity
UPSTREAM_PINS := transformers==4.30.0 tokenizers==0.13.3 peft==0.2.0 accelerate==0.20.3 'setuptools<70' 'numpy<2' sentencepiece

.PHONY: demo test

demo: $(VENV)/.installed-demo
	$(VENV)/bin/minigpt-pancreas demo --out demo-output

test: $(VENV)/.installed-test $(PARITY_DIR)/reference.pt
	MINIGPT_PARITY_DIR=$(PARITY_DIR) $(VENV)/bin/python -m pytest Testing

$(PARITY_DIR)/reference.pt: Testing/upstream_parity/reference_430.py backend/tiny.py | $(UPSTREAM_VENV)/.installed
	rm -rf $(PARITY_DIR)
	$(UPSTREAM_VENV)/bin/python Testing/upstream_parity/reference_430.py $(PARITY_DIR)

$(UPSTREAM_VENV)/.installed:
	$(PYTHON) -m venv $(UPSTREAM_VENV)
	$(UPSTREAM_VENV)/bin/python -m pip install --quiet $(TORCH_PIN)
	$(UPSTREAM_VENV)/bin/python -m pip install --quiet $(UPSTREAM_PINS)
	touch $@

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
