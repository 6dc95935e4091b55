"""Cross-validation folds: StratifiedKFold for classification, stratified on a binned target
for regression, MultilabelStratifiedKFold (iterative-stratification) for multi-label targets,
grouped when `group_col` is set ((Stratified)GroupKFold; multi-label groups stratified on
their labels). Saved as folds.csv, remade
whenever what they were made from (train.csv, n_folds, seed, group_col, n_bins, ...) changed."""
from __future__ import annotations

import logging

import pandas as pd

from . import artifacts, freshness
from .config import CFG
from .tasks import task_of


def create_folds(cfg: CFG, train: pd.DataFrame) -> pd.DataFrame:
    """`train` with a `fold` column (0..n_folds-1), as the task splits (helpers.tasks)."""
    return train.assign(fold=task_of(cfg).assign_folds(cfg, train))


def get_folds(cfg: CFG, train: pd.DataFrame, logger: logging.Logger | None = None) -> pd.DataFrame:
    """The saved folds when they are up to date (helpers.freshness.stale), else new ones,
    saved, with the reason logged."""
    logger = logger or logging.getLogger("kaggle")
    why = freshness.stale(cfg, "folds")
    if why is None:
        saved = artifacts.read_folds(cfg)
        if len(saved) == len(train) and (saved[cfg.id_col].astype(str).values == train[cfg.id_col].astype(str).values).all():
            return train.assign(fold=saved["fold"].to_numpy())
        why = "folds.csv does not list train.csv's rows"
    with freshness.build(cfg, "folds"):
        folds = create_folds(cfg, train)
        if artifacts.folds_path(cfg).exists():
            logger.info(f"folds remade: {why}")
        artifacts.write_folds(cfg, folds)
    return folds
