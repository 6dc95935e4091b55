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
# LightGBM on the CNN embeddings (plus the metadata columns, when there are any), with the
# same folds as the CNN: the fold-k stacker learns from fold k's CNN embeddings of the other
# folds' rows and predicts fold k's rows. Its OOF and test predictions form a new experiment,
# `models/<experiment>_lgbm`, that the ensemble can use.

# %% tags=["parameters"]
config_path = "configs/digits.yaml"  # the YAML with the settings (relative to the repository root)
experiment = ""  # which experiment of the YAML (empty: the first)
overrides = {}  # config keys to override, for example {"epochs": 1, "debug": True}

# %%
import sys
from pathlib import Path

ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "helpers").is_dir())
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
plots.feature_importance(result["importance"], stack_experiment(cfg).exp_dir / "importance.png");

# %% [markdown]
# ## CNN vs stacker, out of fold

# %%
cnn = json.loads((cfg.exp_dir / "score.json").read_text())
table = pd.DataFrame([{"model": cfg.experiment, "cv": cnn["cv"], "cv_mean": cnn["cv_mean"], "cv_std": cnn["cv_std"]},
                      {"model": stack_experiment(cfg).experiment, "cv": result["cv"], "cv_mean": result["cv_mean"], "cv_std": result["cv_std"]}])
display(table.set_index("model").round(5))
