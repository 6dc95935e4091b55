"""The notebooks are paired (NN_name.py <-> NN_name.ipynb), in sync, committed without outputs,
and each has a cell tagged `parameters` that papermill can parse."""
from __future__ import annotations

import ast

import jupytext
import nbformat
import pytest
from papermill.inspection import inspect_notebook

from helpers.config import ROOT
from helpers.pipeline import STAGES

NOTEBOOKS = ROOT / "notebooks"


@pytest.mark.parametrize("stage", [*STAGES, "kaggle_inference"])
def test_notebook_is_paired_in_sync_and_clean(stage):
    py, ipynb = NOTEBOOKS / f"{stage}.py", NOTEBOOKS / f"{stage}.ipynb"
    assert py.exists() and ipynb.exists()
    nb = nbformat.read(ipynb, as_version=4)
    from_py = jupytext.read(py)
    assert [c.source for c in nb.cells] == [c.source for c in from_py.cells], f"run `make notebooks` to sync {stage}"
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    params = inspect_notebook(str(ipynb))
    if stage in STAGES:
        assert {"config_path", "experiment", "overrides"} <= set(params)
    for p in params.values():  # plain literals, so papermill can override them
        ast.literal_eval(p["default"])
