"""Multi-label: several labels per image, from one column of labels (label_sep apart: 'cloudy
primary water', a blank row has none) or one 0/1 column per label (label_cols). A sigmoid per
label, BCE / focal / ASL; per-label decision thresholds tuned on out-of-fold predictions; folds
by iterative stratification of the label matrix (groups kept together)."""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

from ..config import CFG
from ..losses import MultiLabelLoss
from ..metrics import THRESHOLD_METRICS, cross_fitted, get_score
from ..metrics import label_weights as weights_of
from ..utils import read_csv
from .base import Task, rows_of
from .classification import sort_labels


def label_sets(column: pd.Series, sep: str) -> list[set[str]]:
    """The labels of each row of a multi-label column ('cloudy primary water'; blank: none)."""
    return [set(t for t in str(v).split(sep) if t) if isinstance(v, str) or not pd.isna(v) else set() for v in column]


def label_matrix(column: pd.Series, labels: list, sep: str) -> np.ndarray:
    """Rows x labels, 1.0 where a row of `column` ('cloudy primary') names the label; labels
    that are not in `labels` are left out."""
    index = {str(label): j for j, label in enumerate(labels)}
    out = np.zeros((len(column), len(labels)))
    for i, row in enumerate(label_sets(column, sep)):
        out[i, [index[label] for label in row if label in index]] = 1.0
    return out


def joined_labels(matrix: np.ndarray, labels: list, sep: str) -> list[str]:
    """Each row's labels written back as one string."""
    return [sep.join(str(labels[j]) for j in np.flatnonzero(row > 0.5)) for row in np.asarray(matrix)]


def decisions(cfg: CFG, probs: np.ndarray, thresholds) -> np.ndarray:
    """0/1 per label: each label's probability against its threshold (0.5 without thresholds);
    a row left with no label gets the one nearest its threshold unless cfg.allow_empty."""
    t = np.full(probs.shape[1], 0.5) if thresholds is None else np.asarray(thresholds, dtype=float)
    hit = (probs >= t[None, :]).astype(float)
    if not cfg.allow_empty:
        empty = hit.sum(1) == 0
        hit[empty, (probs[empty] / np.maximum(t[None, :], 1e-6)).argmax(1)] = 1.0
    return hit


class MultiLabel(Task):
    name = "multilabel"
    losses = ("bce", "focal", "asl")
    label_word, label_plural = "label", "labels"
    mixup_multi_label = True
    uses_thresholds = True

    # --- the target -------------------------------------------------------------------------
    def target_columns(self, cfg: CFG) -> list[str]:
        return list(cfg.label_cols) or [cfg.target_col]

    def classes(self, train: pd.DataFrame, cfg: CFG) -> list[str]:
        """The labels: cfg.label_cols, cfg.labels, or every label train names, in their natural
        order (by value when all are numbers: '2' before '10')."""
        if cfg.label_cols:
            return [str(c) for c in cfg.label_cols]
        return [str(c) for c in cfg.labels] or sort_labels(set().union(*label_sets(train[cfg.target_col], cfg.label_sep)))

    def matrix(self, cfg: CFG, df: pd.DataFrame, labels: list) -> np.ndarray:
        """Rows x labels, 1.0 where a row has the label: from the 0/1 label_cols, or from target_col."""
        if cfg.label_cols:
            return df[list(cfg.label_cols)].to_numpy(dtype=float)
        return label_matrix(df[cfg.target_col], labels, cfg.label_sep)

    def problems(self, cfg: CFG, train: pd.DataFrame, path: Path) -> list[str]:
        """Label columns that are not 0/1, labels outside cfg.labels or holding label_sep, rows
        without a label (unless allow_empty), labels with fewer positive rows than folds."""
        problems = self._column_problems(cfg, train, path) if cfg.label_cols else self._text_problems(cfg, train, path)
        if problems and problems[-1].startswith("stop:"):
            return problems[:-1]
        labels = self.classes(train, cfg)
        for key in ("label_weights", "label_pos_weight"):
            unknown = sorted(set(map(str, getattr(cfg, key))) - set(labels))
            if unknown:
                problems.append(f"config key '{key}' names label(s) {unknown[:5]} that {path.name} does not have "
                                f"(its labels: {labels[:8]}{' ...' if len(labels) > 8 else ''})")
        matrix = self.matrix(cfg, train, labels)
        empty = pd.Series(matrix.sum(1) == 0)
        if empty.any() and not cfg.allow_empty:
            problems.append(f"{path}: {int(empty.sum())} row(s) have no label (rows {rows_of(empty)}); "
                            f"set allow_empty: true if that is a valid answer")
        return problems + [f"{path}: label {label!r} has {int(n)} positive row(s), fewer than n_folds={cfg.n_folds}"
                           for label, n in zip(labels, matrix.sum(0)) if n < cfg.n_folds]

    def _column_problems(self, cfg: CFG, train: pd.DataFrame, path: Path) -> list[str]:
        bad = ~train[list(cfg.label_cols)].isin([0, 1]).all(axis=1)
        if bad.any():
            return [f"{path}: label columns {list(cfg.label_cols)} must hold 0 or 1 (rows {rows_of(bad)})", "stop:"]
        clash = [c for c in cfg.label_cols if cfg.label_sep in str(c)]
        if clash:  # the labels of a row are also kept as one string, label_sep apart
            return [f"{path}: label column(s) {clash[:5]} hold label_sep {cfg.label_sep!r}; set config key "
                    f"'label_sep' to a character no label name has (e.g. '|')"]
        return []

    def _text_problems(self, cfg: CFG, train: pd.DataFrame, path: Path) -> list[str]:
        clash = [str(label) for label in cfg.labels if cfg.label_sep in str(label)]
        if clash:  # such a label can never be read from target_col: it would be split in two
            return [f"config key 'labels' has label(s) {clash[:5]} that hold label_sep {cfg.label_sep!r}, which "
                    f"separates the labels in '{cfg.target_col}': they would be read as "
                    f"{[label.split(cfg.label_sep) for label in clash[:2]]}; set 'label_sep' to what separates "
                    f"the labels in {path.name} (e.g. '|' or ',')", "stop:"]
        if not cfg.labels:
            return []
        sets, known = label_sets(train[cfg.target_col], cfg.label_sep), set(map(str, cfg.labels))
        unknown = pd.Series([bool(s - known) for s in sets])
        if not unknown.any():
            return []
        names = sorted(set().union(*(s - known for s in sets)))
        return [f"{path}: labels {names[:8]} in '{cfg.target_col}' are not in config key 'labels' (rows {rows_of(unknown)})"]

    def encode(self, cfg: CFG, df: pd.DataFrame) -> pd.DataFrame:
        """A 0/1 vector per row; target_col the labels as one string (a blank row is '', not NaN)."""
        labels = self.classes(df, cfg)
        matrix = self.matrix(cfg, df, labels)
        df["target"] = list(matrix)
        df[cfg.target_col] = joined_labels(matrix, labels, cfg.label_sep)
        return df

    def targets(self, df: pd.DataFrame) -> np.ndarray:
        return np.stack(df["target"].to_numpy())

    def assign_folds(self, cfg: CFG, train: pd.DataFrame) -> np.ndarray:
        """Iterative stratification of the label matrix (every label's positives spread over the
        folds); with group_col, of the groups' label matrices (a group's rows stay together)."""
        matrix = self.targets(train)
        splitter = MultilabelStratifiedKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed)
        if cfg.group_col:
            names, inverse = np.unique(train[cfg.group_col].astype(str).to_numpy(), return_inverse=True)
            per_group = np.zeros((len(names), matrix.shape[1]))
            np.maximum.at(per_group, inverse, matrix)
        else:
            per_group, inverse = matrix, np.arange(len(train))
        fold = np.full(len(per_group), -1)
        for k, (_, valid_idx) in enumerate(splitter.split(np.zeros(len(per_group)), per_group)):
            fold[valid_idx] = k
        return fold[inverse]

    # --- the model ----------------------------------------------------------------------------
    def criterion(self, cfg: CFG, train_targets: np.ndarray, n_outputs: int, classes: list | None) -> torch.nn.Module:
        """BCE (a positive's weight 'balanced': each label's negatives per positive, at most 100;
        or per label from label_pos_weight), sigmoid focal loss, or timm's ASL."""
        kind = self.loss_kind(cfg)
        if kind not in self.losses:
            raise ValueError(f"config key 'loss': multilabel takes 'bce', 'focal' or 'asl', got {kind!r}")
        weights = np.ones(n_outputs)
        if cfg.pos_weight == "balanced":  # each label's negatives per positive, so rare labels count
            matrix = np.stack(train_targets)
            pos = matrix.sum(0)
            weights = np.clip((len(matrix) - pos) / np.maximum(pos, 1), 1.0, 100.0)
        if cfg.label_pos_weight:
            names = [str(label) for label in (classes or [])]
            unknown = sorted(set(map(str, cfg.label_pos_weight)) - set(names))
            if unknown:
                raise ValueError(f"config key 'label_pos_weight' names labels the training data does not have: {unknown}")
            for label, w in cfg.label_pos_weight.items():
                weights[names.index(str(label))] = float(w)
        pos_weight = torch.tensor(weights, dtype=torch.float32) if (weights != 1).any() else None
        alpha = cfg.focal_alpha if 0 < cfg.focal_alpha < 1 else -1.0  # torchvision: -1 weighs positives as negatives
        return MultiLabelLoss(kind, pos_weight, alpha, cfg.focal_gamma)

    def loss_targets(self, targets: torch.Tensor, scale) -> torch.Tensor:
        return targets.float()

    def mixup_targets(self, targets: torch.Tensor) -> torch.Tensor:
        return targets  # multi-hot rows are mixed as they are

    def predictions(self, outputs: torch.Tensor, scale, loss_kind: str) -> torch.Tensor:
        return outputs.float().sigmoid()

    # --- files and scores ---------------------------------------------------------------------
    def oof_targets(self, cfg: CFG, oof: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        cols = [c for c in oof.columns if c.startswith("prob_")]
        return label_matrix(oof[cfg.target_col], [c[len("prob_"):] for c in cols], cfg.label_sep), oof[cols].to_numpy(float)

    def label_weights(self, cfg: CFG, labels: list) -> np.ndarray | None:
        return weights_of(cfg.label_weights, labels)

    def score(self, cfg: CFG, y_true: np.ndarray, y_pred: np.ndarray, folds: np.ndarray,
              labels: list) -> tuple[float, list[float], dict]:
        """Each fold judged with thresholds tuned on the other folds; the thresholds tuned on
        every OOF row (for the test set) and what a model that saw no image could say."""
        weights = self.label_weights(cfg, labels)
        cv, per_fold, thresholds = cross_fitted(cfg.metric, y_true, y_pred, folds, weights)
        prevalence = np.broadcast_to(y_true.mean(0), y_true.shape)
        baseline = cross_fitted(cfg.metric, y_true, prevalence, folds, weights)[0]
        return cv, per_fold, {"thresholds": dict(zip(labels, map(float, thresholds))), "baseline": baseline}

    def fallback(self, cfg: CFG, train: pd.DataFrame | None, classes: list | None) -> list[float]:
        """An unreadable image gets each label's share of the training rows."""
        if train is None:
            return super().fallback(cfg, train, classes)
        sets = label_sets(train[cfg.target_col], cfg.label_sep)
        return [float(np.mean([str(c) in s for s in sets])) for c in classes]

    def rank_rows(self, blended: np.ndarray) -> np.ndarray:
        return blended  # each label's own probability: no distribution to restore

    # --- the submission -----------------------------------------------------------------------
    def columns_are(self, cfg: CFG) -> str:
        return "one column per label, but its columns are not the labels the training data has"

    def column_hints(self, cfg: CFG, extra: list, missing: list) -> list[str]:
        split = [c for c in extra if not cfg.label_cols and cfg.label_sep in str(c)]
        return super().column_hints(cfg, extra, missing) + [
            f"{split[:3]} hold label_sep {cfg.label_sep!r}, which splits the labels of '{cfg.target_col}'" if split else "",
            "a label no training row has cannot be learned: list it in config key 'labels' only if rows show it"
            if extra and not split else ""]

    def fill(self, cfg: CFG, sub: pd.DataFrame, kind: str, pred: np.ndarray, classes: list | None, thresholds) -> None:
        """The labels above their thresholds in one column, or one column per label (0/1 when the
        metric thresholds, else probabilities)."""
        if kind == "classes":
            super().fill(cfg, sub, kind, decisions(cfg, pred, thresholds).astype(int) if cfg.metric in THRESHOLD_METRICS
                         else pred, classes, thresholds)
            return
        value_cols = [c for c in sub.columns if c != cfg.id_col]
        target = cfg.target_col if cfg.target_col in sub.columns else value_cols[0]
        sub[target] = joined_labels(decisions(cfg, pred, thresholds), classes, cfg.label_sep)

    def column_problem(self, cfg: CFG, col: str, values: pd.Series, classes: list | None, kind: str) -> str | None:
        if kind != "label":
            return super().column_problem(cfg, col, values, classes, kind)
        unknown = set().union(*label_sets(values, cfg.label_sep)) - set(map(str, classes))
        if unknown:
            return f"submission column '{col}' has labels not among the training labels: {sorted(unknown)[:5]}"
        return None

    def local_lb(self, cfg: CFG, path: Path, submission: pd.DataFrame, classes: list) -> float:
        """A submission (labels in one column, or one column per label) scored against a solution
        in either shape."""
        solution = read_csv(path, [cfg.id_col], "solution", cfg.id_col, [cfg.target_col])
        names = [str(c) for c in classes]
        per_label = all(c in solution.columns for c in names)  # the solution's own shape, whatever the training data's
        if not per_label and cfg.target_col not in solution.columns:
            raise KeyError(f"{path}: neither a '{cfg.target_col}' column nor one column per label ({names[:5]} ...)")
        order = submission[[cfg.id_col]].merge(solution[[cfg.id_col]].reset_index(), on=cfg.id_col)
        solution, submission = solution.loc[order["index"]], submission.set_index(cfg.id_col).loc[order[cfg.id_col]]
        y_true = solution[names].to_numpy(float) if per_label else label_matrix(solution[cfg.target_col], classes, cfg.label_sep)
        value_cols = list(submission.columns)
        y_pred = (label_matrix(submission[value_cols[0]], classes, cfg.label_sep) if len(value_cols) == 1
                  else submission[names].to_numpy(float))
        return get_score(cfg.metric, y_true, y_pred, thresholds=np.full(len(classes), 0.5),
                         weights=self.label_weights(cfg, classes))

    # --- the stacker and the Predictor --------------------------------------------------------
    stacker_per_output = True

    def stacker_heads(self, cfg: CFG, y: np.ndarray) -> list[tuple[CFG, np.ndarray]]:
        """One binary head per label, early-stopped on its own ROC AUC."""
        binary = dataclasses.replace(cfg, task="classification", metric="roc_auc")
        return [(binary, np.asarray(y, dtype=float)[:, j].astype(int)) for j in range(np.asarray(y).shape[1])]

    def stacker_predict(self, models: list, X: pd.DataFrame, n_outputs: int) -> np.ndarray:
        """Each label's probability from its binary head (a label the fold's rows never showed: its share)."""
        return np.column_stack([np.full(len(X), m) if isinstance(m, float)
                                else m.predict_proba(X)[:, list(m.classes_).index(1)] for m in models])

    def stacker_classes(self, n_outputs: int) -> int:
        return 2

    def stacker_fits(self, n_outputs: int) -> int:
        return n_outputs

    def decisions(self, cfg: CFG, probs: np.ndarray, thresholds) -> np.ndarray:
        return decisions(cfg, np.nan_to_num(probs), thresholds).astype(bool)

    def tally(self, results: list[dict]) -> Counter:
        """Items per label, and '(none)' for those with no label."""
        dist = Counter(str(label) for r in results for label in r.get("labels", []))
        empty = sum(1 for r in results if r["label"] == "")
        return dist + Counter({"(none)": empty}) if empty else dist

    def result(self, cfg: CFG, probs: np.ndarray, hit: np.ndarray | None, classes: list) -> dict:
        labels = [classes[k] for k in np.flatnonzero(hit)]
        return {"label": cfg.label_sep.join(map(str, labels)), "labels": labels,
                "confidence": float(probs[hit].min()) if labels else None,
                "probs": {str(c): float(p) for c, p in zip(classes, probs)}}
