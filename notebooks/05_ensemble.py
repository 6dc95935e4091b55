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
# # 05 · Ensemble and submission
# Every experiment under `models/` for this competition (CNNs and stackers), their scores and
# the correlation of their OOF predictions (diverse models blend best). Weights come from hill
# climbing on OOF (Caruana: forward selection with replacement; `ensemble_method` also offers
# `mean` and `rank`). To judge them honestly they are also fitted on all folds but one and
# scored on the held-out fold; both scores are shown. Writes `submissions/submission.csv`.

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
from helpers.data import read_train
from helpers.ensemble import (classes_of, collect_experiments, correlation, fit_ensemble, local_lb, make_submission,
                              results_table, write_submission)
from helpers.pipeline import ensemble_dir
from helpers.utils import atomic_write_text

cfg, logger = setup(config_path, experiment, overrides)
out = ensemble_dir(cfg)

# %%
collection = collect_experiments(cfg, logger)
experiments = collection.experiments
result = fit_ensemble(experiments, collection.y_true, collection.oof["fold"].to_numpy(), cfg.metric,
                      cfg.ensemble_method, cfg.ensemble_iters)
weights = pd.DataFrame({"experiment": [e.name for e in experiments], "cv": [e.score for e in experiments],
                        "weight": result["weights"]})
display(weights.round(4))

# %% [markdown]
# ## Results across experiments (`models/results.csv`)

# %%
results = results_table(cfg, result)
display(results.round(5))

# %%
plots.score_bars(results, cfg.metric, out / "scores.png");

# %%
corr = correlation(experiments)
plots.correlation_heatmap(corr, out / "correlation.png");

# %% [markdown]
# ## Submission

# %%
classes = classes_of(cfg, read_train(cfg))
submission = make_submission(cfg, collection.test_ids, result["test"], classes)
paths = write_submission(cfg, submission, classes)
lb = local_lb(cfg, submission, classes)
atomic_write_text(out / "score.json", json.dumps({"metric": cfg.metric, "method": result["method"],
                                                  "in_sample": result["in_sample"], "held_out": result["held_out"],
                                                  "local_lb": lb, "weights": dict(zip(weights["experiment"], weights["weight"])),
                                                  "submission": str(paths[0])}, indent=1))
display(submission.head())
print(f"wrote {', '.join(map(str, paths))}" + (f"; local LB {cfg.metric}: {lb:.5f}" if lb is not None else ""))
