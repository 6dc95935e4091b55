# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Stacking
# LightGBM (or, with `stacker`, an SVR / logistic head) on the CNN's out-of-fold predictions
# (`stack_on: oof`, the default), its embeddings (`embeddings`, optionally PCA-reduced with
# `stack_pca`) or both, plus the metadata columns (numeric or text, NaN allowed), with the
# same folds as the CNN: the fold-k stacker learns from the other folds' rows (LightGBM
# early-stops on the competition metric on a held-back 15% of them, then is refitted on all of
# them) and predicts fold k's rows (and the test set, from fold k's predictions or
# embeddings). Its OOF and test predictions form a new experiment,
# `models/<experiment>_<stacker>`, for the ensemble.

# %% tags=["parameters"]
config_path = "configs/digits.yaml"  # the YAML with the settings (relative to the repository root)
experiment = ""  # which experiment of the YAML (empty: the first)
overrides = {}  # config keys to override, for example {"epochs": 1, "debug": True}
helpers_path = ""  # in a Kaggle kernel: the dataset folder that holds helpers/ (e.g. /kaggle/input/my-repo)

# %%
import sys

if helpers_path:  # a copy of the repository added to a Kaggle kernel as a dataset
    sys.path.insert(0, helpers_path)

import pandas as pd
from IPython.display import display

from helpers import artifacts, plots, setup
from helpers.data import read_test, read_train
from helpers.folds import get_folds
from helpers.stacking import run_stacking

cfg, logger = setup(config_path, experiment, overrides)
stacker = artifacts.stack_cfg(cfg)

# %%
folds = get_folds(cfg, read_train(cfg), logger)
test = read_test(cfg)
result = run_stacking(cfg, folds, test, logger)

# %%
if result["importance"] is not None:  # LightGBM: gain per feature, metadata in red
    plots.feature_importance(result["importance"], artifacts.exp_dir(stacker) / "importance.png");

# %% [markdown]
# ## CNN vs stacker, out of fold

# %%
rows = [{"model": stacker.experiment, "cv": result["cv"], "cv_mean": result["cv_mean"], "cv_std": result["cv_std"]}]
cnn = artifacts.read_score(artifacts.exp_dir(cfg), missing_ok=True)  # none with a frozen pretrained backbone
if cnn is not None:
    rows.insert(0, {"model": cfg.experiment, "cv": cnn["cv"], "cv_mean": cnn["cv_mean"], "cv_std": cnn["cv_std"]})
display(pd.DataFrame(rows).set_index("model").round(5))
