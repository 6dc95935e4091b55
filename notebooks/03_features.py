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
# # 03 · Features
# CNN embeddings from each fold's best model, for every train row and the test set.
#
# **Why this is leak-free:** the stacker of fold k (next notebook) is trained only on fold k's
# CNN embeddings of the rows that CNN trained on (LightGBM early-stops on a held-back share of
# them), validated on fold k's rows, which that CNN never saw and the stacker chose nothing on,
# and predicts test from the same CNN. So no row's stacker prediction comes from a model that
# saw the row, and the stacker's OOF score is honest.
#
# With `features_from: pretrained`, a frozen pretrained timm backbone embeds the images instead
# (no fine-tuning, the Pawpularity "embeddings + SVR" recipe): it never saw a label, so one set
# of embeddings serves every fold (`train_all.npy`, `test_all.npy`).

# %% tags=["parameters"]
config_path = "configs/digits.yaml"  # the YAML with the settings (relative to the repository root)
experiment = ""  # which experiment of the YAML (empty: the first)
overrides = {}  # config keys to override, for example {"epochs": 1, "debug": True}
helpers_path = ""  # in a Kaggle kernel: the dataset folder that holds helpers/ (e.g. /kaggle/input/my-repo)

# %%
import sys

if helpers_path:  # a copy of the repository added to a Kaggle kernel as a dataset
    sys.path.insert(0, helpers_path)

from helpers import artifacts, setup
from helpers.data import read_test, read_train
from helpers.folds import get_folds
from helpers.stacking import extract_features
from helpers.results import finalize_experiment

cfg, logger = setup(config_path, experiment, overrides)

# %%
folds = get_folds(cfg, read_train(cfg), logger)
test = read_test(cfg)
finalize_experiment(cfg, logger)
extract_features(cfg, folds, test, logger)

# %%
for k in [k for k in [None, *cfg.fold_ids] if artifacts.feature_path(cfg, "train", k).exists()]:
    emb = artifacts.load_features(cfg, "train", k)
    print(f"{'frozen backbone' if k is None else f'fold {k}'}: train {emb.shape}, "
          f"test {artifacts.load_features(cfg, 'test', k).shape}, dtype {emb.dtype}")
