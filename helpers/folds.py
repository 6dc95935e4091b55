"""Cross-validation folds: StratifiedKFold for classification, stratified on a binned target
for regression, (Stratified)GroupKFold when `group_col` is set. Saved as folds.csv."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold

from .config import CFG
from .utils import atomic_to_csv


def stratify_labels(cfg: CFG, train: pd.DataFrame) -> np.ndarray:
    """What the folds are stratified on: the class, or the quantile bin of a regression target."""
    if cfg.task == "regression":
        bins = pd.qcut(train["target"], q=min(cfg.n_bins, train["target"].nunique()), labels=False, duplicates="drop")
        return np.asarray(bins)
    return train["target"].to_numpy()


def make_folds(cfg: CFG, train: pd.DataFrame) -> pd.DataFrame:
    """`train` with a `fold` column (0..n_folds-1)."""
    y = stratify_labels(cfg, train)
    counts = pd.Series(y).value_counts()
    if cfg.task == "classification" and counts.min() < cfg.n_folds:
        small = counts[counts < cfg.n_folds]
        labels = [train.loc[train["target"] == i, cfg.target_col].iloc[0] for i in small.index]
        raise ValueError(
            f"{cfg.path(cfg.train_csv)}: class(es) {labels} of '{cfg.target_col}' have fewer rows "
            f"({small.tolist()}) than n_folds={cfg.n_folds}; lower n_folds or merge rare classes"
        )
    if cfg.group_col:
        groups = train[cfg.group_col].to_numpy()
        if cfg.task == "classification":
            splitter = StratifiedGroupKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed)
        else:
            splitter = GroupKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed)
        splits = splitter.split(train, y, groups)
    else:
        splits = StratifiedKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed).split(train, y)
    fold = np.full(len(train), -1)
    for k, (_, valid_idx) in enumerate(splits):
        fold[valid_idx] = k
    return train.assign(fold=fold)


def get_folds(cfg: CFG, train: pd.DataFrame) -> pd.DataFrame:
    """models/<exp>/folds.csv if it exists and matches `train`, else made and saved."""
    path = cfg.exp_dir / "folds.csv"
    if path.exists():
        saved = pd.read_csv(path, usecols=[cfg.id_col, "fold"])
        if len(saved) == len(train) and (saved[cfg.id_col].astype(str).values == train[cfg.id_col].astype(str).values).all():
            return train.assign(fold=saved["fold"].to_numpy())
    folds = make_folds(cfg, train)
    atomic_to_csv(folds, path)
    return folds
