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
# # 05 · Ensemble and submission
# Every experiment under `models/` for this competition (CNNs and stackers), their scores and
# the correlation of their OOF predictions (diverse models blend best). Weights come from hill
# climbing on OOF (Caruana: forward selection with replacement; `ensemble_method` also offers
# `mean` and `rank`). To judge them honestly they are also fitted on all folds but one and
# scored on the held-out fold (with one fold, as in time_limit's holdout plan, on parts of it);
# both scores are shown. Writes `submissions/submission.csv`.

# %% tags=["parameters"]
config_path = "configs/digits.yaml"  # the YAML with the settings (relative to the repository root)
experiment = ""  # which experiment of the YAML (empty: the first)
overrides = {}  # config keys to override, for example {"epochs": 1, "debug": True}
helpers_path = ""  # in a Kaggle kernel: the dataset folder that holds helpers/ (e.g. /kaggle/input/my-repo)
experiments = []  # the YAML's experiments that must be finished before blending ([]: every one)

# %%
import sys

if helpers_path:  # a copy of the repository added to a Kaggle kernel as a dataset
    sys.path.insert(0, helpers_path)

from IPython.display import display

from helpers import artifacts, plots, setup
from helpers.budget import apply_plan
from helpers.config import experiment_names, load_cfg
from helpers.ensemble import run_ensemble
from helpers.report import write_report

cfg, logger = setup(config_path, experiment, overrides)
out = artifacts.ensemble_dir(cfg)
members = [apply_plan(load_cfg(config_path, name, overrides)) for name in experiments or experiment_names(config_path)]

# %%
ensemble = run_ensemble(cfg, logger, members)
display(ensemble["weights"].round(4))

# %% [markdown]
# ## Results across experiments (`models/results.csv`)

# %%
display(ensemble["results"].round(5))
plots.score_bars(ensemble["results"], cfg.metric, out / "scores.png");

# %%
plots.correlation_heatmap(ensemble["correlation"], out / "correlation.png");

# %% [markdown]
# ## Submission
# Checked against sample_submission (ids, order, columns, dtypes, NaN, known labels) before it
# is written; scored against `solution.csv` when the competition folder has one.

# %%
display(ensemble["submission"].head())
lb = ensemble["local_lb"]
print(f"wrote {', '.join(map(str, ensemble['paths']))}" + (f"; local LB {cfg.metric}: {lb:.5f}" if lb is not None else ""))

# %% [markdown]
# ## The run's report
# One HTML file beside the submission, images inline: the results, the blend, the time each
# stage took, and per experiment its weights, its settings that differ from the defaults, its
# learning curves and its error analysis.

# %%
try:  # the submission is written: a report that fails is said, and the run goes on
    print(f"the run's report: {write_report(cfg, members, ensemble)}")
except Exception as e:  # noqa: BLE001
    logger.warning(f"the run's report was not written: {type(e).__name__}: {e}")
