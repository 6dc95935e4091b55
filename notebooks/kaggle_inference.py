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
# # Kaggle inference (internet off)
# Made by `python -m helpers.package --config configs/<comp>.yaml OUT` (the whole blended
# ensemble: CNN folds with TTA, their embeddings into the stackers, the blend) or
# `python -m helpers.package models/<exp> OUT` (one CNN experiment). Upload OUT as a Kaggle
# dataset, add it and the competition to a notebook, and run this: it reads the competition's
# current test set (Kaggle swaps in the private one at re-run), downloads nothing, uses the GPU
# when there is one, gives an unreadable image the fallback prediction (its id is named) instead
# of crashing, checks the submission against sample_submission and writes
# `/kaggle/working/submission.csv`.

# %% tags=["parameters"]
competition_dir = "/kaggle/input/digits"  # the competition's data (test.csv or sample_submission.csv, test images)
package_dir = "/kaggle/input/my-model"  # this dataset: package.json, helpers/, the weights
output_csv = "/kaggle/working/submission.csv"  # where Kaggle picks the submission up

# %%
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub
sys.path.insert(0, package_dir)
sys.path.append(os.path.join(package_dir, "vendor"))  # skops, for scikit-learn stackers (the kernel's own copy wins)

from helpers.package import run_package

submission = run_package(package_dir, competition_dir, output_csv)
submission.head()
