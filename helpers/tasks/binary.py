"""A binary task scored on ranking: two classes whose submission is one column holding the
positive class's probability (the metric is ROC AUC, or sample_submission's column is float),
not a label. Everything else is classification's."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..config import CFG
from .classification import Classification


def positive_probability(cfg: CFG, sample: pd.DataFrame, classes: list | None) -> bool:
    """Whether a classification's submission is one column of the positive class's probability:
    two classes, one value column, and ROC AUC or a float column in sample_submission."""
    value_cols = [c for c in sample.columns if c != cfg.id_col]
    return (classes is not None and len(classes) == 2 and len(value_cols) == 1
            and (cfg.metric == "roc_auc" or pd.api.types.is_float_dtype(sample[value_cols[0]])))


def positive_index(cfg: CFG, sample: pd.DataFrame, classes: list) -> int:
    """The class whose probability a one-column binary submission holds: the class its column
    is named after (a 'cat' column holds P(cat)), else the second (positive) class."""
    column = str([c for c in sample.columns if c != cfg.id_col][0])
    names = [str(c) for c in classes]
    return names.index(column) if column in names else 1


class BinaryProbability(Classification):
    """Classification whose submission is the positive class's probability ('positive')."""

    name = "binary"

    def submission_format(self, cfg: CFG, sample: pd.DataFrame, classes: list | None) -> str:
        return "positive"

    def fill(self, cfg: CFG, sub: pd.DataFrame, kind: str, pred: np.ndarray, classes: list | None, thresholds) -> None:
        column = [c for c in sub.columns if c != cfg.id_col][0]
        sub[column] = pred[:, positive_index(cfg, sub, classes)]

    def lb_predictions(self, cfg: CFG, merged: pd.DataFrame, submission: pd.DataFrame, classes: list) -> np.ndarray:
        p = merged[[c for c in submission.columns if c != cfg.id_col][0]].to_numpy(float)
        return np.column_stack([1 - p, p] if positive_index(cfg, submission, classes) == 1 else [p, 1 - p])
