"""The competition metrics: `get_score`, which direction is better, and comparisons."""
from __future__ import annotations

import numpy as np

HIGHER_IS_BETTER = {"accuracy": True, "f1_macro": True, "roc_auc": True, "rmse": False}


def get_score(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The competition metric. Classification: `y_true` class indices, `y_pred` probabilities
    [n, n_classes]. Regression: both 1-d values on the original scale."""
    from sklearn import metrics

    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if metric == "rmse":
        return float(np.sqrt(metrics.mean_squared_error(y_true, y_pred.reshape(len(y_true)))))
    if metric == "accuracy":
        return float(metrics.accuracy_score(y_true, y_pred.argmax(1)))
    if metric == "f1_macro":
        return float(metrics.f1_score(y_true, y_pred.argmax(1), average="macro"))
    if metric == "roc_auc":
        if y_pred.shape[1] == 2:
            return float(metrics.roc_auc_score(y_true, y_pred[:, 1]))
        return float(metrics.roc_auc_score(y_true, y_pred, multi_class="ovr", labels=np.arange(y_pred.shape[1])))
    raise ValueError(f"unknown metric '{metric}'")


def is_better(metric: str, new: float, best: float | None) -> bool:
    if best is None:
        return True
    return new > best if HIGHER_IS_BETTER[metric] else new < best
