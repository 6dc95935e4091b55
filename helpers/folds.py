"""Cross-validation folds: StratifiedKFold for classification, stratified on a binned target
for regression, MultilabelStratifiedKFold (iterative-stratification) for multi-label targets,
grouped when `group_col` is set ((Stratified)GroupKFold; multi-label groups stratified on
their labels). Saved as folds.csv, remade
whenever what they were made from (train.csv, n_folds, seed, group_col, n_bins, ...) changed."""
from __future__ import annotations

import inspect
import logging

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold

from . import artifacts
from .config import CFG
from .data import DataError, class_count_problems


def stratify_labels(cfg: CFG, train: pd.DataFrame) -> np.ndarray:
    """What the folds are stratified on: the class, or the quantile bin of a regression target."""
    if cfg.task == "regression":
        bins = pd.qcut(train["target"], q=min(cfg.n_bins, train["target"].nunique()), labels=False, duplicates="drop")
        return np.asarray(bins)
    return train["target"].to_numpy()


def multilabel_folds(cfg: CFG, train: pd.DataFrame) -> np.ndarray:
    """Each row's fold: iterative stratification of the label matrix (every label's positives
    spread over the folds); with group_col, of the groups' label matrices (a group's rows stay
    together)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    matrix = np.stack(train["target"].to_numpy())
    splitter = MultilabelStratifiedKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed)
    if not cfg.group_col:
        fold = np.full(len(train), -1)
        for k, (_, valid_idx) in enumerate(splitter.split(np.zeros(len(train)), matrix)):
            fold[valid_idx] = k
        return fold
    groups = train[cfg.group_col].astype(str).to_numpy()
    names, inverse = np.unique(groups, return_inverse=True)
    per_group = np.zeros((len(names), matrix.shape[1]))
    np.maximum.at(per_group, inverse, matrix)
    group_fold = np.full(len(names), -1)
    for k, (_, valid_idx) in enumerate(splitter.split(np.zeros(len(names)), per_group)):
        group_fold[valid_idx] = k
    return group_fold[inverse]


def create_folds(cfg: CFG, train: pd.DataFrame) -> pd.DataFrame:
    """`train` with a `fold` column (0..n_folds-1)."""
    if cfg.task == "multilabel":
        return train.assign(fold=multilabel_folds(cfg, train))
    if cfg.task == "classification":
        problems = class_count_problems(cfg, train, cfg.path(cfg.train_csv))
        if problems:
            raise DataError("\n".join(problems))
    y = stratify_labels(cfg, train)
    if cfg.group_col:
        groups = train[cfg.group_col].to_numpy()
        if cfg.task == "classification":
            splitter = StratifiedGroupKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed)
        elif "shuffle" in inspect.signature(GroupKFold).parameters:
            splitter = GroupKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed)
        else:  # scikit-learn < 1.6: groups are dealt by size, without a seed
            splitter = GroupKFold(n_splits=cfg.n_folds)
        splits = splitter.split(train, y, groups)
    else:
        splits = StratifiedKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed).split(train, y)
    fold = np.full(len(train), -1)
    for k, (_, valid_idx) in enumerate(splits):
        fold[valid_idx] = k
    return train.assign(fold=fold)


def get_folds(cfg: CFG, train: pd.DataFrame, logger: logging.Logger | None = None) -> pd.DataFrame:
    """The saved folds when they are up to date (helpers.artifacts.stale), else new ones,
    saved, with the reason logged."""
    logger = logger or logging.getLogger("kaggle")
    why = artifacts.stale(cfg, "folds")
    if why is None:
        saved = artifacts.read_folds(cfg)
        if len(saved) == len(train) and (saved[cfg.id_col].astype(str).values == train[cfg.id_col].astype(str).values).all():
            return train.assign(fold=saved["fold"].to_numpy())
        why = "folds.csv does not list train.csv's rows"
    folds = create_folds(cfg, train)
    if artifacts.folds_path(cfg).exists():
        logger.info(f"folds remade: {why}")
    artifacts.write_folds(cfg, folds)
    artifacts.record(cfg, "folds")
    return folds
