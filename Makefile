# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/digits.yaml

OLDEST := .venv-oldest

.PHONY: setup run test test-oldest demo notebooks clean browser

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed  ## create .venv, install the pinned requirements and helpers (editable)

demo: setup  ## build the demo competition inputs/digits/ from scikit-learn's digits
	$(PY) -m helpers.demo

run: demo  ## the main job: every notebook through the runner on the demo, then the scores
	$(PY) -m helpers.pipeline --config $(CONFIG)

browser:  ## Debian's headless Chromium for the report's browser test, where it can be installed (else that check is skipped)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || echo "sudo -n" ); \
	  ( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium ) >/dev/null 2>&1 \
	  || echo "chromium could not be installed: the report's browser check will be skipped"; }

test: setup browser  ## the test suite
	$(PY) -m pytest -q -n 2 --dist loadfile tests  # two workers (the suite fits CI's 10 minutes on 2 cores), each test file in one

$(OLDEST)/.installed: requirements-oldest.txt pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install -q --upgrade pip
	$(OLDEST)/bin/python -m pip install -q -r requirements-oldest.txt
	$(OLDEST)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test-oldest: $(OLDEST)/.installed  ## training, stacking, multi-label and the end-to-end runs (Mixup, EMA, the package) on the oldest library versions helpers declares
	$(OLDEST)/bin/python -m pytest -q tests/test_training.py tests/test_stacking.py tests/test_multilabel.py tests/test_e2e.py

notebooks: setup  ## sync the paired notebooks (NN_name.py <-> NN_name.ipynb) after editing either
	$(VENV)/bin/jupytext --sync notebooks/*.py

clean:  ## remove generated outputs (not the venv)
	rm -rf models submissions inputs/digits
