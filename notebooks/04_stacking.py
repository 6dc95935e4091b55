# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Stacking
# LightGBM (or, with `stacker`, an SVR / logistic head) on the CNN embeddings, optionally
# PCA-reduced (`stack_pca`), plus the metadata columns (numeric or text, NaN allowed), with the
# same folds as the CNN: the fold-k stacker learns from fold k's CNN embeddings of the other
# folds' rows, early-stops on the competition metric on fold k's rows and predicts them. Its
# OOF and test predictions form a new experiment, `models/<experiment>_<stacker>`, for the
# ensemble.

# %% tags=["parameters"]
config_path = "configs/digits.yaml"  # the YAML with the settings (relative to the repository root)
experiment = ""  # which experiment of the YAML (empty: the first)
overrides = {}  # config keys to override, for example {"epochs": 1, "debug": True}

# %%
import sys
from pathlib import Path

# the repository: this folder or a parent, or a Kaggle dataset that holds it (/kaggle/input/...)
places = [Path.cwd(), *Path.cwd().parents, *sorted(Path("/kaggle/input").glob("*")), *sorted(Path("/kaggle/input").glob("*/*"))]
ROOT = next((p for p in places if (p / "helpers" / "__init__.py").is_file()), None)
if ROOT is None:
    raise FileNotFoundError("helpers/ not found: open this notebook inside the repository, "
                            "or add the repository to the Kaggle kernel as a dataset")
sys.path.insert(0, str(ROOT))

import json

import pandas as pd
from IPython.display import display

from helpers import setup
from helpers import plots
from helpers.data import read_test, read_train
from helpers.folds import get_folds
from helpers.stacking import run_stacking, stack_experiment

cfg, logger = setup(config_path, experiment, overrides)

# %%
folds = get_folds(cfg, read_train(cfg))
test = read_test(cfg)
result = run_stacking(cfg, folds, test, logger)

# %%
if result["importance"] is not None:  # LightGBM: gain per feature, metadata in red
    plots.feature_importance(result["importance"], stack_experiment(cfg).exp_dir / "importance.png");

# %% [markdown]
# ## CNN vs stacker, out of fold

# %%
rows = [{"model": stack_experiment(cfg).experiment, "cv": result["cv"], "cv_mean": result["cv_mean"], "cv_std": result["cv_std"]}]
if (cfg.exp_dir / "score.json").exists():  # absent when the embeddings come from a frozen pretrained backbone
    cnn = json.loads((cfg.exp_dir / "score.json").read_text())
    rows.insert(0, {"model": cfg.experiment, "cv": cnn["cv"], "cv_mean": cnn["cv_mean"], "cv_std": cnn["cv_std"]})
display(pd.DataFrame(rows).set_index("model").round(5))
