"""Classification: one class per image, read as text from target_col ('NA' and '0007' are
classes; only an empty cell is missing), softmax probabilities, cross-entropy or focal loss."""
from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold

from ..config import CFG
from ..losses import FocalLoss, SoftCrossEntropy, class_weights
from ..utils import DataError
from .base import Task, rows_of


def sort_labels(labels) -> list[str]:
    """Labels in their natural order: by value when every one is a number ('2' before '10'),
    else as text."""
    labels = sorted(set(labels))
    try:
        values = [float(label) for label in labels]
    except ValueError:
        return labels
    if not np.isfinite(values).all():
        return labels
    return [label for _, label in sorted(zip(values, labels))]


def blank_label(value) -> bool:
    """An empty cell of a text target (the only missing value a label column has)."""
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def look_alike_problems(values: pd.Series, path: Path, column: str) -> list[str]:
    """Labels that differ only in surrounding spaces or Unicode form ('a' and 'a ', 'é' composed
    or not): they would silently be two classes."""
    text = values.astype(str).reset_index(drop=True)  # rows by position, as rows_of counts them
    key = text.map(lambda v: unicodedata.normalize("NFKC", v).strip())
    problems = []
    for _, spellings in text[key != ""].groupby(key[key != ""]):
        distinct = list(dict.fromkeys(spellings))
        if len(distinct) > 1:
            rows = {repr(v): rows_of(text == v, 3) for v in distinct[:4]}
            problems.append(f"{path}: labels {', '.join(rows)} of '{column}' differ only in spaces or Unicode form "
                            f"({'; '.join(f'{v} on rows {r}' for v, r in rows.items())}): they would be separate classes; "
                            f"write each label one way")
    return problems


def class_count_problems(cfg: CFG, train: pd.DataFrame, path: Path) -> list[str]:
    """Classes with fewer rows than folds: stratified folds cannot put one in every fold."""
    counts = train[cfg.target_col].astype(str).value_counts()
    return [f"{path}: class {label!r} of '{cfg.target_col}' has {n} row(s), fewer than n_folds={cfg.n_folds}; "
            f"lower n_folds or merge rare classes" for label, n in counts[counts < cfg.n_folds].items()]


class Classification(Task):
    name = "classification"
    losses = ("ce", "focal")

    def classes(self, train: pd.DataFrame, cfg: CFG) -> list[str]:
        """The class labels, as text, in sort_labels' order."""
        return sort_labels(str(c) for c in train[cfg.target_col].unique() if not blank_label(c))

    def problems(self, cfg: CFG, train: pd.DataFrame, path: Path) -> list[str]:
        target = train[cfg.target_col]
        problems = []
        blank = target.map(blank_label)
        if blank.any():
            problems.append(f"{path}: empty cell(s) in target column '{cfg.target_col}' (rows {rows_of(blank)}); every "
                            f"training row needs its label ('NA', 'None' and 'null' are read as labels)")
        classes = self.classes(train, cfg)
        if len(classes) == 1:
            problems.append(f"{path}: target column '{cfg.target_col}' holds one class only ({classes[0]!r}): "
                            f"there is nothing to classify (is target_col the right column?)")
        return problems + look_alike_problems(target, path, cfg.target_col) + class_count_problems(cfg, train[~blank], path)

    def encode(self, cfg: CFG, df: pd.DataFrame) -> pd.DataFrame:
        classes = self.classes(df, cfg)
        df[cfg.target_col] = df[cfg.target_col].astype(str)
        df["target"] = df[cfg.target_col].map({c: i for i, c in enumerate(classes)}).astype(int)
        return df

    def subsample(self, cfg: CFG, df: pd.DataFrame) -> pd.DataFrame:
        """debug: every class kept, with enough rows for the folds."""
        per_class = max(cfg.n_folds, -(-cfg.debug_rows // df["target"].nunique()))
        rng = np.random.default_rng(cfg.seed)
        keep = [rng.choice(g.index, min(per_class, len(g)), replace=False) for _, g in df.groupby("target")]
        return df.loc[np.sort(np.concatenate(keep))]

    def assign_folds(self, cfg: CFG, train: pd.DataFrame) -> np.ndarray:
        problems = class_count_problems(cfg, train, cfg.path(cfg.train_csv))
        if problems:
            raise DataError("\n".join(problems))
        return super().assign_folds(cfg, train)

    def group_splitter(self, cfg: CFG):
        return StratifiedGroupKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed)

    def criterion(self, cfg: CFG, train_targets: np.ndarray, n_outputs: int, classes: list | None) -> torch.nn.Module:
        kind = self.loss_kind(cfg)
        weight = class_weights(cfg, train_targets, n_outputs)
        if kind == "ce":
            return SoftCrossEntropy(weight, cfg.label_smoothing)
        if kind == "focal":
            return FocalLoss(cfg.focal_alpha, cfg.focal_gamma, weight, cfg.label_smoothing)
        raise ValueError(f"config key 'loss': classification takes 'ce' or 'focal', got {kind!r}")

    def oof_targets(self, cfg: CFG, oof: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        cols = [c for c in oof.columns if c.startswith("prob_")]
        index = {c[len("prob_"):]: i for i, c in enumerate(cols)}
        return oof[cfg.target_col].astype(str).map(index).to_numpy(), oof[cols].to_numpy(float)
