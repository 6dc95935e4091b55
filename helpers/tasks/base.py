"""What every task has in common, and the contract each task fulfils. A task owns its target
(the classes or labels it reads from train.csv, their encoding, the checks of the column), its
model's output width, loss and predictions, the columns of its OOF and test files, its score,
its submission's shapes, its stacker head and its thresholds. The rest of the code asks the
task (helpers.tasks.task_of) instead of testing cfg.task."""
from __future__ import annotations

import inspect
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import GroupKFold, StratifiedKFold

from ..config import CFG
from ..metrics import get_score
from ..utils import read_csv


def rows_of(mask, limit: int = 8) -> str:
    """Rows of a CSV as its editor shows them: the header is line 1, so row i is line i + 2."""
    rows = (np.flatnonzero(np.asarray(mask)) + 2).tolist()
    return ", ".join(map(str, rows[:limit])) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


class Task:
    """The defaults: one target column, per-class probabilities, hard-label submissions."""

    name = ""
    losses: tuple[str, ...] = ()  # the `loss` values it takes; the first is 'auto''s
    label_word, label_plural = "class", "classes"  # what its outputs are called in messages
    mixup_multi_label = False  # timm's Mixup mixes multi-hot rows (not class indices)
    uses_thresholds = False  # its decisions come from thresholds tuned on OOF predictions (score.json's)
    named_outputs = True  # its outputs are named (classes, labels), not one value

    # --- the target -------------------------------------------------------------------------
    def target_columns(self, cfg: CFG) -> list[str]:
        """The train.csv columns the target is read from."""
        return [cfg.target_col]

    def classes(self, train: pd.DataFrame, cfg: CFG) -> list | None:
        """Its outputs' names: the class labels, the labels, or None (one value)."""
        return None

    def problems(self, cfg: CFG, train: pd.DataFrame, path: Path) -> list[str]:
        """What is wrong with the target column(s) of train.csv, each naming file, rows and column."""
        return []

    def encode(self, cfg: CFG, df: pd.DataFrame) -> pd.DataFrame:
        """df with `target`: what the loss and the folds work with."""
        raise NotImplementedError

    def targets(self, df: pd.DataFrame) -> np.ndarray:
        """The rows' targets as one array (a matrix for several labels per row)."""
        return df["target"].to_numpy()

    def subsample(self, cfg: CFG, df: pd.DataFrame) -> pd.DataFrame:
        """debug: cfg.debug_rows rows drawn with cfg.seed."""
        return df.sample(n=min(cfg.debug_rows, len(df)), random_state=cfg.seed).sort_index()

    # --- folds --------------------------------------------------------------------------------
    def stratify_on(self, cfg: CFG, train: pd.DataFrame) -> np.ndarray:
        """What stratified folds keep the same in every fold."""
        return train["target"].to_numpy()

    def group_splitter(self, cfg: CFG):
        """The splitter of grouped folds (rows of a group stay in one fold)."""
        if "shuffle" in inspect.signature(GroupKFold).parameters:
            return GroupKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed)
        return GroupKFold(n_splits=cfg.n_folds)  # scikit-learn < 1.6: groups are dealt by size, without a seed

    def assign_folds(self, cfg: CFG, train: pd.DataFrame) -> np.ndarray:
        """Each row's fold (0..n_folds-1)."""
        y = self.stratify_on(cfg, train)
        if cfg.group_col:
            splits = self.group_splitter(cfg).split(train, y, train[cfg.group_col].to_numpy())
        else:
            splits = StratifiedKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed).split(train, y)
        fold = np.full(len(train), -1)
        for k, (_, valid_idx) in enumerate(splits):
            fold[valid_idx] = k
        return fold

    # --- the model ----------------------------------------------------------------------------
    def n_outputs(self, classes: list | None) -> int:
        return len(classes)

    def loss_kind(self, cfg: CFG) -> str:
        return self.losses[0] if cfg.loss == "auto" else cfg.loss

    def criterion(self, cfg: CFG, train_targets: np.ndarray, n_outputs: int, classes: list | None) -> torch.nn.Module:
        raise NotImplementedError

    def target_scale(self, folds: pd.DataFrame):
        """The scale targets are trained on (regression), or None."""
        return None

    def loss_targets(self, targets: torch.Tensor, scale) -> torch.Tensor:
        """What the loss compares with."""
        return targets

    def mixup_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """What timm's Mixup mixes: class indices."""
        return targets.long()

    def predictions(self, outputs: torch.Tensor, scale, loss_kind: str) -> torch.Tensor:
        """Raw outputs -> what is written and scored."""
        return outputs.float().softmax(1)

    # --- files and scores ---------------------------------------------------------------------
    def pred_columns(self, classes: list | None) -> list[str]:
        """Prediction columns of OOF/test files."""
        return [f"prob_{c}" for c in classes]

    def oof_targets(self, cfg: CFG, oof: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(y_true, y_pred) of an OOF frame."""
        raise NotImplementedError

    def label_weights(self, cfg: CFG, labels: list) -> np.ndarray | None:
        """Each output's weight in the score (f2_ciw's), or None."""
        return None

    def score(self, cfg: CFG, y_true: np.ndarray, y_pred: np.ndarray, folds: np.ndarray,
              labels: list) -> tuple[float, list[float], dict]:
        """(CV over all rows, each fold's score, what else score.json holds); `labels` name the
        prediction columns."""
        per_fold = [get_score(cfg.metric, y_true[folds == k], y_pred[folds == k]) for k in sorted(np.unique(folds))]
        return get_score(cfg.metric, y_true, y_pred), per_fold, {}

    def fallback(self, cfg: CFG, train: pd.DataFrame | None, classes: list | None) -> list[float]:
        """The prediction for an image that cannot be read: the training classes' shares."""
        if train is None:
            return [1.0 / len(classes)] * len(classes) if classes else [0.0]
        counts = train[cfg.target_col].astype(str).value_counts()
        return [float(counts.get(str(c), 0) / counts.sum()) for c in classes]

    def rank_rows(self, blended: np.ndarray) -> np.ndarray:
        """A rank-averaged blend back to one distribution per row."""
        return blended / np.clip(blended.sum(1, keepdims=True), 1e-12, None) if blended.shape[1] > 1 else blended

    # --- the submission -----------------------------------------------------------------------
    def submission_format(self, cfg: CFG, sample: pd.DataFrame, classes: list | None) -> str:
        """What sample_submission asks for: 'label' (one column), 'classes' (one column per
        class; its columns must be the classes), or the task's own shapes."""
        value_cols = [c for c in sample.columns if c != cfg.id_col]
        if len(value_cols) == 1:
            return "label"
        self.check_columns(cfg, value_cols, classes)
        return "classes"

    def check_columns(self, cfg: CFG, value_cols: list, classes: list) -> None:
        """Raise, naming them, unless sample_submission's columns are the classes."""
        names = [str(c) for c in classes]
        extra = [c for c in value_cols if str(c) not in names]
        missing = [c for c in classes if str(c) not in map(str, value_cols)]
        if extra or missing:
            raise ValueError(f"{cfg.path(cfg.sample_submission)} has {self.columns_are(cfg)}: " + "; ".join(
                filter(None, self.column_hints(cfg, extra, missing))))

    def columns_are(self, cfg: CFG) -> str:
        return (f"one probability column per class, but its columns are not the classes of '{cfg.target_col}' in the "
                f"training data")

    def column_hints(self, cfg: CFG, extra: list, missing: list) -> list[str]:
        word = self.label_word
        return [f"column(s) {extra} name no training {word}" if extra else "", f"{word}(es) {missing} have no column" if missing else ""]

    def fill(self, cfg: CFG, sub: pd.DataFrame, kind: str, pred: np.ndarray, classes: list | None, thresholds) -> None:
        """Write the predictions into the submission frame, in its shape."""
        value_cols = [c for c in sub.columns if c != cfg.id_col]
        if kind == "classes":
            for c in value_cols:
                sub[c] = pred[:, [str(k) for k in classes].index(str(c))]
            return
        target = cfg.target_col if cfg.target_col in sub.columns else value_cols[0]
        sub[target] = np.asarray(classes, dtype=object)[pred.argmax(1)]
        if not isinstance(classes[0], str):  # classes given as numbers stay numbers
            sub[target] = sub[target].astype(type(classes[0]))

    def column_problem(self, cfg: CFG, col: str, values: pd.Series, classes: list | None, kind: str) -> str | None:
        """What is wrong with one column of a submission about to be written, or None: a
        probability outside [0, 1] (or not a number), a label the training data does not have."""
        if kind != "label":
            if not (pd.api.types.is_numeric_dtype(values) and values.between(0, 1).all()):
                return f"submission column '{col}' must hold probabilities in [0, 1]"
            return None
        unknown = set(values.astype(str)) - set(map(str, classes))
        if unknown:
            return f"submission column '{col}' has labels not among the training classes: {sorted(unknown)[:5]}"
        return None

    def local_lb(self, cfg: CFG, path: Path, submission: pd.DataFrame, classes: list | None) -> float | None:
        """The submission's score against the held-back solution file (None when it cannot be
        honest: a solution label the training data never had)."""
        solution = read_csv(path, [cfg.id_col, cfg.target_col], "solution", cfg.id_col, cfg.label_text)
        solution = solution[[cfg.id_col, cfg.target_col]].rename(columns={cfg.target_col: "__true"})
        merged = solution.merge(submission, on=cfg.id_col)
        y_true = self.lb_truth(cfg, merged, classes, path)
        return None if y_true is None else get_score(cfg.metric, y_true, self.lb_predictions(cfg, merged, submission, classes))

    def lb_truth(self, cfg: CFG, merged: pd.DataFrame, classes: list | None, path: Path) -> np.ndarray | None:
        """The solution's classes as indices; None (with a warning) for a class training never had."""
        index = {str(c): i for i, c in enumerate(classes)}
        unknown = sorted(set(merged["__true"].astype(str)) - set(index))
        if unknown:  # the model cannot have predicted them: no honest score
            logging.getLogger("kaggle").warning(f"{path}: no local LB: its labels {unknown[:5]} are not among the training "
                                                f"classes ({len(classes)}: {list(map(str, classes[:5]))} ...)")
            return None
        return merged["__true"].astype(str).map(index).to_numpy()

    def lb_predictions(self, cfg: CFG, merged: pd.DataFrame, submission: pd.DataFrame, classes: list) -> np.ndarray:
        """The submission's predictions as probabilities, rows as `merged`'s (local LB)."""
        index = {str(c): i for i, c in enumerate(classes)}
        value_cols = [c for c in submission.columns if c != cfg.id_col]
        if len(value_cols) == 1:  # labels, one-hot
            return np.eye(len(classes))[merged[value_cols[0]].astype(str).map(index).to_numpy()]
        return merged[[str(c) for c in classes]].to_numpy(float)

    # --- the stacker ----------------------------------------------------------------------------
    stacker_classifies = True  # its heads are classifiers (probabilities), not regressors
    stacker_per_output = False  # one head per output (each label's), not one for all

    def stacker_heads(self, cfg: CFG, y: np.ndarray) -> list[tuple[CFG, np.ndarray]]:
        """(the head's settings, its targets) for each model the stacker fits: one here."""
        return [(cfg, y)]

    def stacker_predict(self, models: list, X: pd.DataFrame, n_outputs: int) -> np.ndarray:
        """Probabilities with a column for every class (also those absent from the fold's rows)."""
        model = models[0]
        proba = model.predict_proba(X)
        full = np.zeros((len(X), n_outputs))
        full[:, np.asarray(model.classes_).astype(int)] = proba
        return full

    def stacker_score(self, cfg: CFG, y_true: np.ndarray, y_pred: np.ndarray, present: np.ndarray, n_outputs: int) -> float:
        """The metric of a stacker head's predictions (LightGBM's early stopping follows it)."""
        proba = y_pred if y_pred.ndim == 2 else np.column_stack([1 - y_pred, y_pred])
        full = np.zeros((len(y_true), n_outputs))
        full[:, present] = proba
        return get_score(cfg.metric, y_true.astype(int), full)

    def stacker_classes(self, n_outputs: int) -> int:
        """Classes of one head (the time budget's probe of LightGBM)."""
        return max(2, n_outputs)

    def stacker_fits(self, n_outputs: int) -> int:
        """Heads fitted per fold."""
        return 1

    # --- the Predictor ----------------------------------------------------------------------------
    def result(self, cfg: CFG, probs: np.ndarray, hit: np.ndarray | None, classes: list) -> dict:
        """One item's result: its label, confidence and probabilities."""
        k = int(np.argmax(probs))
        return {"label": classes[k], "confidence": float(probs[k]), "probs": {str(c): float(p) for c, p in zip(classes, probs)}}

    def decisions(self, cfg: CFG, probs: np.ndarray, thresholds) -> np.ndarray | None:
        """0/1 per output where thresholds decide (multi-label), else None."""
        return None

    def tally(self, results: list[dict]) -> Counter:
        """How many items got each label (the Predictor's log)."""
        return Counter(str(r["label"]) for r in results)
