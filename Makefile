# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/digits.yaml

.PHONY: setup run test demo notebooks clean

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

test: setup  ## the test suite
	$(PY) -m pytest -q tests

notebooks: setup  ## sync the paired notebooks (NN_name.py <-> NN_name.ipynb) after editing either
	$(VENV)/bin/jupytext --sync notebooks/*.py

clean:  ## remove generated outputs (not the venv)
	rm -rf models submissions inputs/digits
