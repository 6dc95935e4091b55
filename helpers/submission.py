"""The submission: made in sample_submission's shape (labels, one probability per class, or
the positive class's probability; multi-label: the labels above their thresholds in one
column, or one column per label), checked before it is written, and scored against a
held-back solution file when there is one (the local leaderboard)."""
from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from . import artifacts
from .config import CFG
from .data import get_classes, joined_labels, label_matrix, label_sets, read_csv, read_sample_submission
from .metrics import THRESHOLD_METRICS, get_score, label_weights


def positive_probability(cfg: CFG, sample: pd.DataFrame, classes: list | None) -> bool:
    """A binary task whose submission is one column holding the probability of the second
    (positive) class, not a label: the metric is ROC AUC, or sample_submission's column is
    float (Kaggle's binary competitions, scored on ranking)."""
    value_cols = [c for c in sample.columns if c != cfg.id_col]
    return (cfg.task == "classification" and classes is not None and len(classes) == 2 and len(value_cols) == 1
            and (cfg.metric == "roc_auc" or pd.api.types.is_float_dtype(sample[value_cols[0]])))


def positive_index(cfg: CFG, sample: pd.DataFrame, classes: list) -> int:
    """The class whose probability a one-column binary submission holds: the class its column
    is named after (a 'cat' column holds P(cat)), else the second (positive) class."""
    column = str([c for c in sample.columns if c != cfg.id_col][0])
    names = [str(c) for c in classes]
    return names.index(column) if column in names else 1


def submission_format(cfg: CFG, sample: pd.DataFrame, classes: list | None) -> str:
    """What sample_submission asks for: 'value' (regression), 'positive' (a binary task's
    positive-class probability), 'classes' (one probability column per class: the columns must
    be the training classes, else an error names the classes that differ) or 'label'."""
    where = cfg.path(cfg.sample_submission)
    value_cols = [c for c in sample.columns if c != cfg.id_col]
    if not value_cols:
        raise ValueError(f"{where}: no column besides the id column '{cfg.id_col}'")
    if cfg.task == "regression":
        return "value"
    if positive_probability(cfg, sample, classes):
        return "positive"
    if len(value_cols) == 1:
        return "label"
    names = [str(c) for c in classes]
    extra = [c for c in value_cols if str(c) not in names]
    missing = [c for c in classes if str(c) not in map(str, value_cols)]
    if extra or missing:
        what = ("one column per label, but its columns are not the labels the training data has"
                if cfg.task == "multilabel" else
                f"one probability column per class, but its columns are not the classes of '{cfg.target_col}' in the training data")
        split = [c for c in extra if cfg.task == "multilabel" and not cfg.label_cols and cfg.label_sep in str(c)]
        raise ValueError(f"{where} has {what}: " + "; ".join(filter(None, [
            f"column(s) {extra} name no training {'label' if cfg.task == 'multilabel' else 'class'}" if extra else "",
            f"{'label' if cfg.task == 'multilabel' else 'class'}(es) {missing} have no column" if missing else "",
            f"{split[:3]} hold label_sep {cfg.label_sep!r}, which splits the labels of '{cfg.target_col}'" if split else "",
            "a label no training row has cannot be learned: list it in config key 'labels' only if rows show it"
            if cfg.task == "multilabel" and extra and not split else ""])))
    return "classes"


def multilabel_decisions(cfg: CFG, probs: np.ndarray, thresholds) -> np.ndarray:
    """0/1 per label: each label's probability against its threshold (0.5 without thresholds);
    a row left with no label gets the one nearest its threshold unless cfg.allow_empty."""
    t = np.full(probs.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, dtype=float)
    hit = (probs >= t[None, :]).astype(float)
    if not cfg.allow_empty:
        empty = hit.sum(1) == 0
        hit[empty, (probs[empty] / np.maximum(t[None, :], 1e-6)).argmax(1)] = 1.0
    return hit


def create_submission(cfg: CFG, test_ids: pd.Series, test_pred: np.ndarray, classes: list | None,
                      thresholds=None) -> pd.DataFrame:
    """The submission in sample_submission's shape (submission_format): same ids, order and
    columns; labels decoded, one probability per class, the positive class's probability, or
    the regression value; multi-label: the labels above `thresholds` (one per label), or one
    column per label (probabilities when the metric ranks, else 0/1); no NaN."""
    sample = read_sample_submission(cfg)
    kind = submission_format(cfg, sample, classes)
    pred = pd.DataFrame(test_pred, index=test_ids.astype(str).to_numpy())
    missing = set(sample[cfg.id_col].astype(str)) - set(pred.index)
    if missing:
        raise ValueError(f"{cfg.sample_submission}: {len(missing)} id(s) have no prediction, e.g. {sorted(missing)[:3]}")
    pred = pred.loc[sample[cfg.id_col].astype(str)].to_numpy()
    sub = sample.copy()
    value_cols = [c for c in sample.columns if c != cfg.id_col]
    if kind == "value":
        sub[value_cols[0]] = pred[:, 0]
    elif kind == "positive":
        sub[value_cols[0]] = pred[:, positive_index(cfg, sample, classes)]
    elif kind == "classes":
        if cfg.task == "multilabel" and cfg.metric in THRESHOLD_METRICS:
            pred = multilabel_decisions(cfg, pred, thresholds).astype(int)
        for c in value_cols:
            sub[c] = pred[:, [str(k) for k in classes].index(str(c))]
    elif cfg.task == "multilabel":
        target = cfg.target_col if cfg.target_col in sample.columns else value_cols[0]
        sub[target] = joined_labels(multilabel_decisions(cfg, pred, thresholds), classes, cfg.label_sep)
    else:
        target = cfg.target_col if cfg.target_col in sample.columns else value_cols[0]
        sub[target] = np.asarray(classes, dtype=object)[pred.argmax(1)]
        sub[target] = sub[target].astype(type(classes[0])) if not isinstance(classes[0], str) else sub[target]
    return sub


def local_lb(cfg: CFG, submission: pd.DataFrame, classes: list | None) -> float | None:
    """The score of a submission against the held-back solution file, when there is one."""
    path = cfg.path(cfg.solution_csv)
    if not path.exists():
        return None
    if cfg.task == "multilabel":
        return _multilabel_lb(cfg, path, submission, classes)
    solution = read_csv(path, [cfg.id_col, cfg.target_col], "solution", cfg.id_col, cfg.label_text)
    solution = solution[[cfg.id_col, cfg.target_col]].rename(columns={cfg.target_col: "__true"})
    merged = solution.merge(submission, on=cfg.id_col)
    if cfg.task == "regression":
        return get_score(cfg.metric, merged["__true"], merged[cfg.target_col])
    index = {str(c): i for i, c in enumerate(classes)}
    unknown = sorted(set(merged["__true"].astype(str)) - set(index))
    if unknown:  # the model cannot have predicted them: no honest score
        logging.getLogger("kaggle").warning(f"{path}: no local LB: its labels {unknown[:5]} are not among the training "
                                            f"classes ({len(classes)}: {list(map(str, classes[:5]))} ...)")
        return None
    y_true = merged["__true"].astype(str).map(index).to_numpy()
    value_cols = [c for c in submission.columns if c != cfg.id_col]
    if positive_probability(cfg, submission, classes):
        p = merged[value_cols[0]].to_numpy(float)
        y_pred = np.column_stack([1 - p, p] if positive_index(cfg, submission, classes) == 1 else [p, 1 - p])
    elif cfg.target_col in submission.columns:
        y_pred = np.eye(len(classes))[merged[cfg.target_col].astype(str).map(index).to_numpy()]
    else:
        y_pred = merged[[str(c) for c in classes]].to_numpy(float)
    return get_score(cfg.metric, y_true, y_pred)


def _multilabel_lb(cfg: CFG, path, submission: pd.DataFrame, classes: list) -> float:
    """A multi-label submission (labels in one column, or one column per label) scored against a
    solution in either shape."""
    def matrix(column: pd.Series) -> np.ndarray:
        return label_matrix(column, classes, cfg.label_sep)

    solution = read_csv(path, [cfg.id_col], "solution", cfg.id_col, [cfg.target_col])
    names = [str(c) for c in classes]
    per_label = all(c in solution.columns for c in names)  # the solution's own shape, whatever the training data's
    if not per_label and cfg.target_col not in solution.columns:
        raise KeyError(f"{path}: neither a '{cfg.target_col}' column nor one column per label ({names[:5]} ...)")
    order = submission[[cfg.id_col]].merge(solution[[cfg.id_col]].reset_index(), on=cfg.id_col)
    solution, submission = solution.loc[order["index"]], submission.set_index(cfg.id_col).loc[order[cfg.id_col]]
    y_true = solution[names].to_numpy(float) if per_label else matrix(solution[cfg.target_col])
    value_cols = list(submission.columns)
    y_pred = matrix(submission[value_cols[0]]) if len(value_cols) == 1 else submission[names].to_numpy(float)
    return get_score(cfg.metric, y_true, y_pred, thresholds=np.full(len(classes), 0.5),
                     weights=label_weights(cfg.label_weights, classes))


def check_submission(cfg: CFG, sub: pd.DataFrame, classes: list | None) -> None:
    """Raise, naming the column or ids, unless `sub` has sample_submission's ids (same order),
    columns and dtypes, no NaN, and labels among the training classes."""
    sample = read_sample_submission(cfg)
    where = cfg.path(cfg.sample_submission)
    if list(sub.columns) != list(sample.columns):
        raise ValueError(f"submission columns {list(sub.columns)} differ from {where}: {list(sample.columns)}")
    if len(sub) != len(sample) or (sub[cfg.id_col].astype(str).to_numpy() != sample[cfg.id_col].astype(str).to_numpy()).any():
        raise ValueError(f"submission ids differ from {where} (count or order)")
    if sub[cfg.id_col].dtype != sample[cfg.id_col].dtype:
        raise ValueError(f"submission column '{cfg.id_col}' has dtype {sub[cfg.id_col].dtype}, {where} has {sample[cfg.id_col].dtype}")
    nan = sub.columns[sub.isna().any()].tolist()
    if nan:
        raise ValueError(f"submission has NaN in column(s) {nan}")
    kind = submission_format(cfg, sample, classes)
    probability = kind in ("positive", "classes")
    for col in sub.columns.drop(cfg.id_col):
        values = sub[col]
        if probability and not (pd.api.types.is_numeric_dtype(values) and values.between(0, 1).all()):
            raise ValueError(f"submission column '{col}' must hold probabilities in [0, 1]")
        if cfg.task == "multilabel" and not probability:
            unknown = set().union(*label_sets(values, cfg.label_sep)) - set(map(str, classes))
            if unknown:
                raise ValueError(f"submission column '{col}' has labels not among the training labels: {sorted(unknown)[:5]}")
        elif cfg.task == "classification" and col == cfg.target_col and classes is not None and not probability:
            unknown = set(values.astype(str)) - set(map(str, classes))
            if unknown:
                raise ValueError(f"submission column '{col}' has labels not among the training classes: {sorted(unknown)[:5]}")
        elif not pd.api.types.is_numeric_dtype(values) or not np.isfinite(values.to_numpy(float)).all():
            raise ValueError(f"submission column '{col}' must hold finite numbers")


def write_submission(cfg: CFG, sub: pd.DataFrame, classes: list | None) -> list[Path]:
    """Validate, then write submissions/submission.csv (the name Kaggle expects) and a named
    copy (cfg.submission_name, or ensemble_<method>_<time> so that earlier ones are kept)."""
    check_submission(cfg, sub, classes)
    name = cfg.submission_name or f"ensemble_{cfg.ensemble_method}_{datetime.now():%Y%m%d_%H%M%S}"
    return artifacts.write_submission_files(cfg, sub, name)


def classes_of(cfg: CFG, train: pd.DataFrame) -> list | None:
    return None if cfg.task == "regression" else get_classes(train, cfg)
