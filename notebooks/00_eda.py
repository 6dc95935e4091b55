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
# # 00 · Exploratory data analysis
# What the competition looks like before any model: class (or target) balance, image sizes
# and modes, a grid of samples, and how the metadata columns relate to the target.

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

from helpers import artifacts, freshness, plots, setup
from helpers.data import read_test, read_train
from helpers.images import image_header

cfg, logger = setup(config_path, experiment, overrides, log_name="eda.log")
made_from = freshness.fingerprint(cfg, "eda")
out = artifacts.eda_dir(cfg)

# %% [markdown]
# ## Data

# %%
train, test = read_train(cfg), read_test(cfg)
logger.info(f"{len(train)} train rows, {len(test)} test rows, images in {cfg.path(cfg.image_dir_train)}")
display(train.head())

# %% [markdown]
# ## Target

# %%
if cfg.task == "multilabel":
    display(plots.label_counts(train[cfg.target_col], cfg.label_sep).to_frame("rows").T)
else:
    display(train[cfg.target_col].describe() if cfg.task == "regression" else train[cfg.target_col].value_counts().to_frame().T)
plots.target_balance(train, cfg.target_col, cfg.task, out / "target_balance.png", cfg.label_sep);

# %% [markdown]
# ## Image sizes and modes (headers of up to 2000 images)
# Every image is read as RGB (or gray with `in_chans: 1`) and resized to `img_size`, whatever its
# mode (L, RGB, RGBA, P, I;16, CMYK). Unreadable files are listed here; `python -m helpers.check`
# reads every header.

# %%
sample = train.sample(n=min(2000, len(train)), random_state=cfg.seed)
headers = pd.DataFrame([image_header(p) for p in sample["path"]])
readable = headers[headers["error"].isna()]
display(readable.value_counts(["height", "width", "mode", "format"]).head(10).to_frame("images"))
if len(readable) < len(headers):
    display(headers[headers["error"].notna()][["path", "error"]])
plots.image_sizes(readable, out / "image_sizes.png");

# %% [markdown]
# ## Samples

# %%
plots.sample_grid(train, cfg.target_col, out / "sample_grid.png", seed=cfg.seed);

# %% [markdown]
# ## Metadata

# %%
if cfg.metadata_cols:
    meta = train[cfg.metadata_cols]
    display(meta.describe(include="all"))
    numeric = meta.select_dtypes("number").columns.tolist()
    if numeric and cfg.task == "regression":
        display(train[numeric + ["target"]].corr()["target"].to_frame("correlation with target"))
    elif numeric and cfg.task == "classification":
        display(train.groupby(cfg.target_col)[numeric].mean())
else:
    print("no metadata columns (config key metadata_cols)")
freshness.record(cfg, "eda", made_from=made_from)
