"""The submission: made in sample_submission's shape (labels, one probability per class, the
positive class's probability, values; multi-label: the labels above their thresholds in one
column, or one column per label: the task decides), checked before it is written, and scored
against a held-back solution file when there is one (the local leaderboard)."""
from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from . import artifacts
from .config import CFG
from .data import read_sample_submission
from .tasks import task_of


def submission_format(cfg: CFG, sample: pd.DataFrame, classes: list | None) -> str:
    """What sample_submission asks for: 'value' (regression), 'positive' (a binary task's
    positive-class probability), 'classes' (one column per class or label: its columns must be
    the training classes, else an error names those that differ) or 'label'."""
    if not [c for c in sample.columns if c != cfg.id_col]:
        raise ValueError(f"{cfg.path(cfg.sample_submission)}: no column besides the id column '{cfg.id_col}'")
    return task_of(cfg, sample, classes).submission_format(cfg, sample, classes)


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
    sub = sample.copy()
    task_of(cfg, sample, classes).fill(cfg, sub, kind, pred.loc[sample[cfg.id_col].astype(str)].to_numpy(), classes, thresholds)
    return sub


def local_lb(cfg: CFG, submission: pd.DataFrame, classes: list | None) -> float | None:
    """The score of a submission against the held-back solution file, when there is one."""
    path = cfg.path(cfg.solution_csv)
    if not path.exists():
        return None
    return task_of(cfg, submission, classes).local_lb(cfg, path, submission, classes)


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
    task = task_of(cfg, sample, classes)
    kind = task.submission_format(cfg, sample, classes)
    for col in sub.columns.drop(cfg.id_col):
        problem = task.column_problem(cfg, col, sub[col], classes, kind)
        if problem:
            raise ValueError(problem)


def write_submission(cfg: CFG, sub: pd.DataFrame, classes: list | None) -> list[Path]:
    """Validate, then write submissions/submission.csv (the name Kaggle expects) and a named
    copy (cfg.submission_name, or ensemble_<method>_<time> so that earlier ones are kept)."""
    check_submission(cfg, sub, classes)
    name = cfg.submission_name or f"ensemble_{cfg.ensemble_method}_{datetime.now():%Y%m%d_%H%M%S}"
    return artifacts.write_submission_files(cfg, sub, name)


def classes_of(cfg: CFG, train: pd.DataFrame) -> list | None:
    """The training classes (or labels) of cfg's task; None for one value per image."""
    return task_of(cfg).classes(train, cfg)
