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
# Made by `python -m helpers.package models/<exp> OUT`: upload OUT as a Kaggle dataset, add it
# and the competition to a notebook, and run this. The weights come from the dataset's
# `model/` folder; nothing is downloaded. Writes `/kaggle/working/submission.csv`.

# %% tags=["parameters"]
competition_dir = "/kaggle/input/digits"  # the competition's data (train.csv, test.csv or sample_submission.csv, images)
package_dir = "/kaggle/input/my-model"  # this dataset: helpers/ and model/
output_csv = "/kaggle/working/submission.csv"  # where Kaggle picks the submission up

# %%
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub
sys.path.insert(0, package_dir)

from helpers.data import read_test
from helpers.predict import Predictor
from helpers.submission import check_submission, create_submission
from helpers.utils import atomic_to_csv

predictor = Predictor.from_experiment(f"{package_dir}/model")
cfg = predictor.cfg
cfg.competition_dir = competition_dir

# %%
test = read_test(cfg)
preds, errors = predictor.predict_array(test["path"].tolist(), progress=True)
if errors:
    raise ValueError(f"{len(errors)} test image(s) could not be read: " + "; ".join(list(errors.values())[:5]))
submission = create_submission(cfg, test[cfg.id_col], preds, predictor.classes)
check_submission(cfg, submission, predictor.classes)
atomic_to_csv(submission, output_csv)
print(f"wrote {output_csv}: {len(submission)} rows")
submission.head()
