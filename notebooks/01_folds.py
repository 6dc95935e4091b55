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
# # 01 · Folds
# StratifiedKFold for classification, stratified on a binned target for regression,
# (Stratified)GroupKFold when `group_col` is set. Every later notebook reads `folds.csv`.

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

import pandas as pd
from IPython.display import display

from helpers import setup
from helpers import plots
from helpers.data import read_train
from helpers.folds import get_folds

cfg, logger = setup(config_path, experiment, overrides)

# %%
folds = get_folds(cfg, read_train(cfg))
logger.info(f"{cfg.n_folds} folds saved to {cfg.exp_dir / 'folds.csv'}")
display(pd.crosstab(folds["fold"], folds[cfg.target_col]) if cfg.task == "classification"
        else folds.groupby("fold")[cfg.target_col].describe())

# %%
plots.fold_distribution(folds, cfg.target_col, cfg.task, cfg.exp_dir / "folds.png");
