"""The competition metrics: `get_score`, which direction is better, and, for multi-label tasks,
per-label decision thresholds tuned on out-of-fold predictions.

Multi-label metrics take `y_true` as a 0/1 matrix [n, labels] and `y_pred` as probabilities of
the same shape: 'f1_micro', 'f1_macro', 'f2_ciw' (Sewer-ML's class-importance-weighted F2)
need thresholds (one per label; tuned on the rows themselves when none are given: the score a
model can reach, used to compare epochs and blends), 'map' (mean average precision) and
'roc_auc' (macro) do not. The CV an experiment reports uses `cross_fitted`: each fold scored
with the thresholds tuned on the other folds.
"""
from __future__ import annotations

import numpy as np
from sklearn import metrics
from sklearn.model_selection import KFold, StratifiedKFold

HIGHER_IS_BETTER = {"accuracy": True, "f1_macro": True, "roc_auc": True, "rmse": False, "f1_micro": True, "map": True,
                    "f2_ciw": True}
THRESHOLD_METRICS = ("f1_micro", "f1_macro", "f2_ciw")
GRID = np.round(np.arange(0.02, 0.99, 0.02), 2)  # the thresholds tried for each label


def get_score(metric: str, y_true: np.ndarray, y_pred: np.ndarray, thresholds: np.ndarray | None = None,
              weights: np.ndarray | None = None) -> float:
    """The competition metric. Classification: `y_true` class indices, `y_pred` probabilities
    [n, n_classes]. Regression: both 1-d values on the original scale. Multi-label: see the
    module docstring (`weights`: f2_ciw's per-label importance)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if not np.isfinite(y_pred.astype(float)).all():
        raise ValueError(f"{metric}: {int((~np.isfinite(y_pred.astype(float))).reshape(len(y_pred), -1).any(1).sum())} "
                         f"row(s) of predictions are NaN or inf: they are never scored")
    if y_true.dtype.kind in "fc" and not np.isfinite(y_true).all():
        raise ValueError(f"{metric}: {int((~np.isfinite(y_true)).reshape(len(y_true), -1).any(1).sum())} row(s) have no "
                         f"true value (NaN): a label the predictions do not know?")
    if y_true.ndim == 2:
        return multilabel_score(metric, y_true, y_pred, thresholds, weights)
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


# --- multi-label ---------------------------------------------------------------------------------
def _counts(y_true: np.ndarray, y_pred: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """(tp, fp, fn) per label at one threshold per label."""
    hit = y_pred >= thresholds[None, :]
    truth = y_true > 0.5
    return (hit & truth).sum(0), (hit & ~truth).sum(0), (~hit & truth).sum(0)


def _f_beta(tp, fp, fn, beta: float = 1.0) -> np.ndarray:
    b2 = beta * beta
    denominator = (1 + b2) * tp + b2 * fn + fp
    return np.where(denominator > 0, (1 + b2) * tp / np.maximum(denominator, 1e-12), 0.0)


def multilabel_score(metric: str, y_true: np.ndarray, y_pred: np.ndarray, thresholds: np.ndarray | None = None,
                     weights: np.ndarray | None = None) -> float:
    y_true, y_pred = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float)
    present = (y_true > 0.5).any(0) & (y_true < 0.5).any(0)  # labels with both kinds of row here
    if metric == "map":
        return float(np.mean([metrics.average_precision_score(y_true[:, j], y_pred[:, j]) for j in np.flatnonzero(present)]))
    if metric == "roc_auc":
        return float(np.mean([metrics.roc_auc_score(y_true[:, j], y_pred[:, j]) for j in np.flatnonzero(present)]))
    if metric not in THRESHOLD_METRICS:
        raise ValueError(f"unknown multi-label metric '{metric}'")
    thresholds = fit_thresholds(metric, y_true, y_pred) if thresholds is None else np.asarray(thresholds, dtype=float)
    tp, fp, fn = _counts(y_true, y_pred, thresholds)
    if metric == "f1_micro":
        return float(_f_beta(tp.sum(), fp.sum(), fn.sum()))
    if metric == "f1_macro":
        return float(_f_beta(tp, fp, fn).mean())
    w = np.ones(y_true.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    return float((w * _f_beta(tp, fp, fn, beta=2.0)).sum() / w.sum())


def fit_thresholds(metric: str, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """One threshold per label, from GRID, tuned for the metric being scored: each label's own
    F1 (F2 for f2_ciw; the middle of the best stretch when several tie; 0.5 for a label with no
    positive row; 1.0, never predicted, when no threshold catches one of its positives); for
    f1_micro, which pools the labels' counts, those thresholds are then moved label by label
    while the pooled F1 rises (_pool_micro)."""
    y_true, y_pred = np.asarray(y_true) > 0.5, np.asarray(y_pred, dtype=float)
    beta = 2.0 if metric == "f2_ciw" else 1.0
    grid = np.append(GRID, 1.0)  # 1.0: never predicted
    counts = np.stack([_grid_counts(y_true[:, j], y_pred[:, j], grid) for j in range(y_true.shape[1])])  # [labels, 3, grid]
    idx = np.full(y_true.shape[1], int(np.flatnonzero(grid == 0.5)[0]))
    for j in np.flatnonzero(y_true.any(0)):
        scores = _f_beta(*counts[j, :, :-1], beta)
        idx[j] = _middle_of_best(scores) if scores.max() > 0 else len(GRID)  # no threshold finds a positive: never
    if metric == "f1_micro":
        idx = _pool_micro(counts, idx)
    return grid[idx]


def _grid_counts(truth: np.ndarray, pred: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """[tp, fp, fn] of one label at each threshold of `grid`."""
    hit = pred[:, None] >= grid[None, :]  # [n, grid]
    tp = (hit & truth[:, None]).sum(0)
    return np.stack([tp, (hit & ~truth[:, None]).sum(0), truth.sum() - tp])


def _middle_of_best(scores: np.ndarray) -> int:
    """The middle of the first stretch of the best score, not its lowest end."""
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    run = best[: 1 + int(np.argmax(np.diff(best) > 1)) if (np.diff(best) > 1).any() else len(best)]
    return int(run[len(run) // 2])


def _pool_micro(counts: np.ndarray, idx: np.ndarray, passes: int = 10) -> np.ndarray:
    """Micro-F1's thresholds (indices into the grid of `counts`, [labels, 3, grid]): coordinate
    ascent from `idx` on the pooled TP/FP/FN (a label's best threshold for its own F1 is not the
    one that best serves the pool: a rare label may pay the pool more by predicting less), each
    label moved only where the pooled F1 rises."""
    idx = idx.copy()
    for _ in range(passes):
        moved = False
        for j in range(len(idx)):
            others = counts[np.arange(len(idx)), :, idx].sum(0) - counts[j, :, idx[j]]  # the other labels' tp, fp, fn
            scores = _f_beta(*(others[:, None] + counts[j]))
            if scores.max() > scores[idx[j]] + 1e-12:
                idx[j], moved = _middle_of_best(scores), True
        if not moved:
            break
    return idx


def label_weights(weights: dict, labels: list) -> np.ndarray | None:
    """f2_ciw's importance weight of each label, in the labels' order (1 where none is given)."""
    if not weights:
        return None
    by_name = {str(k): float(v) for k, v in weights.items()}  # YAML reads {0: 5} with an int key
    return np.asarray([by_name.get(str(label), 1.0) for label in labels])


HOLDOUT_PARTS = 5


def holdout_parts(y_true: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Where the OOF rows come from one fold (a holdout: `folds: [0]`, or time_limit's holdout
    plan), what is fitted on OOF rows (hill climbing's weights, multi-label thresholds) is judged
    on HOLDOUT_PARTS parts of its rows instead, each scored by what was fitted on the others:
    stratified by class where the targets are class indices with that many rows each, else plain
    (regression values, multi-label rows)."""
    y = np.asarray(y_true)
    k = max(2, min(HOLDOUT_PARTS, n))
    stratify = y.ndim == 1 and np.issubdtype(y.dtype, np.integer) and np.unique(y, return_counts=True)[1].min() >= k
    splitter = (StratifiedKFold if stratify else KFold)(k, shuffle=True, random_state=seed)
    parts = np.zeros(n, dtype=int)
    for i, (_, val) in enumerate(splitter.split(np.zeros((n, 1)), y if stratify else None)):
        parts[val] = i
    return parts


def cross_fitted_hits(metric: str, y_true: np.ndarray, y_pred: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each row's labels (0/1) at thresholds tuned on the other folds' rows; with one fold, on
    the other parts of it (holdout_parts): no decision is tuned on the row it decides."""
    y_true, y_pred, folds = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float), np.asarray(folds)
    if len(np.unique(folds)) < 2:
        folds = holdout_parts(y_true, len(folds))
    hits = np.zeros_like(y_pred)
    for k in np.unique(folds):
        rows = folds == k
        hits[rows] = (y_pred[rows] >= fit_thresholds(metric, y_true[~rows], y_pred[~rows])[None, :]).astype(float)
    return hits


def cross_fitted(metric: str, y_true: np.ndarray, y_pred: np.ndarray, folds: np.ndarray,
                 weights: np.ndarray | None = None) -> tuple[float, list[float], np.ndarray]:
    """(score over all rows, score of each fold, thresholds tuned on all rows): every fold's
    rows judged with thresholds tuned on the other folds (one fold: on the other parts of it),
    so no score is tuned on the rows it scores. Metrics without thresholds are scored as they are."""
    y_true, y_pred, folds = np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float), np.asarray(folds)
    ks = sorted(np.unique(folds))
    if metric not in THRESHOLD_METRICS:
        per_fold = [get_score(metric, y_true[folds == k], y_pred[folds == k], weights=weights) for k in ks]
        return get_score(metric, y_true, y_pred, weights=weights), per_fold, fit_thresholds(metric, y_true, y_pred)
    # the thresholded predictions: thresholds of 0.5 on 0/1 keep them
    hits, half = cross_fitted_hits(metric, y_true, y_pred, folds), np.full(y_true.shape[1], 0.5)
    per_fold = [get_score(metric, y_true[folds == k], hits[folds == k], half, weights) for k in ks]
    return get_score(metric, y_true, hits, half, weights), per_fold, fit_thresholds(metric, y_true, y_pred)
