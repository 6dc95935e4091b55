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
# # 02 · Train
# One CNN per fold: the runner passes `fold` (a list of them when they run one after another
# on one device: one kernel start for all); left at `None`, this notebook trains every fold
# of `cfg.folds` in turn, then, with `refit` set, one more model on all rows (`fold = "refit"`
# trains that one alone, once the folds are done). Each fold writes `best.pt` (the weights and the config they were
# trained with), `last.pt` (a killed run resumes from it), `metrics.jsonl`, its OOF and test
# predictions under `models/<experiment>/`. A fold that is up to date (nothing it is made from
# changed) is not trained again; the log says what changed when one is.

# %% tags=["parameters"]
config_path = "configs/digits.yaml"  # the YAML with the settings (relative to the repository root)
experiment = ""  # which experiment of the YAML (empty: the first)
overrides = {}  # config keys to override, for example {"epochs": 1, "debug": True}
helpers_path = ""  # in a Kaggle kernel: the dataset folder that holds helpers/ (e.g. /kaggle/input/my-repo)
fold = None  # the fold to train, or a list of them (None: every fold in cfg.folds, then the refit; "refit": the refit)

# %%
import sys

if helpers_path:  # a copy of the repository added to a Kaggle kernel as a dataset
    sys.path.insert(0, helpers_path)

import pandas as pd
from IPython.display import display

from helpers import artifacts, plots, setup
from helpers.analysis import error_analysis
from helpers.check import run_check
from helpers.data import read_test, read_train
from helpers.folds import get_folds
from helpers.train import train_fold, train_refit
from helpers.results import finalize_experiment

cfg, logger = setup(config_path, experiment, overrides)

# %% [markdown]
# Pre-flight check: the CSVs and every image header are read before any training, and all
# problems are reported at once (a passing check is remembered until the data change).

# %%
run_check(cfg, logger)
folds = get_folds(cfg, read_train(cfg), logger)
test = read_test(cfg)
parts = (cfg.fold_ids + ([artifacts.REFIT] if cfg.refit else [])) if fold is None else fold if isinstance(fold, list) else [fold]
to_train = [k for k in parts if k != artifacts.REFIT]
logger.info(f"{cfg.experiment}: {cfg.arch} {cfg.model_name if cfg.arch == 'timm' else ''} {cfg.img_size}px, folds {to_train}")

# %%
results = [train_fold(cfg, folds, k, test, logger) for k in to_train]
if results:
    display(pd.DataFrame(results)[["fold", "score", "best_epoch"]])

# %%
for r in results:
    plots.learning_curves({r["fold"]: r["history"]}, cfg.metric, artifacts.fold_dir(cfg, r["fold"]) / "learning_curves.png");

# %% [markdown]
# Once every fold is trained, the folds are combined into `oof.csv`, `test.csv` and the CV score.

# %%
score = finalize_experiment(cfg, logger)
print(score if score else f"waiting for the other folds of {cfg.fold_ids}")

# %% [markdown]
# ## Refit on all rows (`refit: blend | alone`)
# One more model on every training row, for the folds' mean best epoch. It has no held-out
# rows, so no CV score: its test predictions (`test_refit.csv`) are kept apart from the folds'
# and 05_ensemble blends them in (`blend`: half of the experiment's test predictions; `alone`:
# all of them).

# %%
refit = train_refit(cfg, folds, test, logger) if artifacts.REFIT in parts else None
if refit:
    plots.learning_curves({"refit": refit["history"]}, "lr", artifacts.fold_dir(cfg, artifacts.REFIT) / "learning_curves.png");

# %% [markdown]
# ## Error analysis (out of fold, once every fold is trained)
# What the model gets wrong: the confusion matrix and classification report, `wrong_oof.csv`
# (most confident mistakes first) and their images; for multi-label, a per-label
# precision/recall/F1 table at the tuned thresholds, each label's TP/FP/FN/TN, and the most
# confident misses and false alarms; for regression, the residuals and the largest errors.
# Saved under `models/<experiment>/analysis/`.

# %%
analysis = error_analysis(cfg, folds)
if analysis is not None and cfg.task != "regression":  # classification, or multi-label (per label)
    display(analysis["report"])
    display(analysis["wrong"].head(20))
elif analysis is not None:
    display(analysis["largest"].head(20))
