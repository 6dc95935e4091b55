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
# # 01 · Folds
# StratifiedKFold for classification, stratified on a binned target for regression,
# (Stratified)GroupKFold when `group_col` is set. Every later notebook reads `folds.csv`.

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
from helpers.data import read_train
from helpers.folds import get_folds

cfg, logger = setup(config_path, experiment, overrides)

# %% [markdown]
# The folds are remade (and every fold retrained after them) only when what they are made from
# changed: train.csv, or one of n_folds, seed, group_col, n_bins (regression), debug.

# %%
folds = get_folds(cfg, read_train(cfg), logger)
logger.info(f"{cfg.n_folds} folds in {artifacts.folds_path(cfg)}")
if cfg.task == "multilabel":
    display(plots.fold_shares(folds, cfg.target_col, cfg.label_sep).round(3))
else:
    display(pd.crosstab(folds["fold"], folds[cfg.target_col]) if cfg.task == "classification"
            else folds.groupby("fold")[cfg.target_col].describe())

# %%
plots.fold_distribution(folds, cfg.target_col, cfg.task, artifacts.exp_dir(cfg) / "folds.png", cfg.label_sep);
