"""Regression, the Pawpularity way: one value per image, trained on the target scaled to [0, 1]
with the training range (BCE-with-logits or MSE), predicted back on the original scale (RMSE is
reported there); folds stratified on quantile bins of the target."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..config import CFG
from ..losses import RegressionLoss, TargetScale
from ..metrics import get_score
from .base import Task, rows_of


class Regression(Task):
    name = "regression"
    losses = ("mse", "bce")
    label_word, label_plural = "value", "values"
    named_outputs = False

    def problems(self, cfg: CFG, train: pd.DataFrame, path: Path) -> list[str]:
        target = train[cfg.target_col]
        if not pd.api.types.is_numeric_dtype(target):
            return [f"{path}: regression target '{cfg.target_col}' is not numeric"]
        if target.isna().any():
            return [f"{path}: NaN in target column '{cfg.target_col}' (rows {rows_of(target.isna())})"]
        return []

    def encode(self, cfg: CFG, df: pd.DataFrame) -> pd.DataFrame:
        df["target"] = df[cfg.target_col].astype(float)
        return df

    def stratify_on(self, cfg: CFG, train: pd.DataFrame) -> np.ndarray:
        """The quantile bin of the target (n_bins of them)."""
        bins = pd.qcut(train["target"], q=min(cfg.n_bins, train["target"].nunique()), labels=False, duplicates="drop")
        return np.asarray(bins)

    def n_outputs(self, classes: list | None) -> int:
        return 1

    def criterion(self, cfg: CFG, train_targets: np.ndarray, n_outputs: int, classes: list | None) -> torch.nn.Module:
        kind = self.loss_kind(cfg)
        if kind not in ("bce", "mse"):
            raise ValueError(f"config key 'loss': regression takes 'bce' or 'mse', got {kind!r}")
        return RegressionLoss(kind)

    def target_scale(self, folds: pd.DataFrame) -> TargetScale:
        return TargetScale(folds["target"].min(), folds["target"].max())

    def loss_targets(self, targets: torch.Tensor, scale: TargetScale) -> torch.Tensor:
        return scale.to01(targets.float())

    def predictions(self, outputs: torch.Tensor, scale: TargetScale, loss_kind: str) -> torch.Tensor:
        return scale.from_outputs(outputs, loss_kind)

    def pred_columns(self, classes: list | None) -> list[str]:
        return ["pred"]

    def oof_targets(self, cfg: CFG, oof: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return oof[cfg.target_col].to_numpy(float), oof["pred"].to_numpy(float)

    def fallback(self, cfg: CFG, train: pd.DataFrame | None, classes: list | None) -> list[float]:
        """An unreadable image gets the training target's mean."""
        return [0.0] if train is None else [float(train[cfg.target_col].mean())]

    def rank_rows(self, blended: np.ndarray) -> np.ndarray:
        return blended

    def submission_format(self, cfg: CFG, sample: pd.DataFrame, classes: list | None) -> str:
        return "value"

    def fill(self, cfg: CFG, sub: pd.DataFrame, kind: str, pred: np.ndarray, classes: list | None, thresholds) -> None:
        sub[[c for c in sub.columns if c != cfg.id_col][0]] = pred[:, 0]

    def column_problem(self, cfg: CFG, col: str, values: pd.Series, classes: list | None, kind: str) -> str | None:
        if not pd.api.types.is_numeric_dtype(values) or not np.isfinite(values.to_numpy(float)).all():
            return f"submission column '{col}' must hold finite numbers"
        return None

    def lb_truth(self, cfg: CFG, merged: pd.DataFrame, classes: list | None, path: Path) -> np.ndarray:
        return merged["__true"].to_numpy(float)

    def lb_predictions(self, cfg: CFG, merged: pd.DataFrame, submission: pd.DataFrame, classes: list) -> np.ndarray:
        return merged[[c for c in submission.columns if c != cfg.id_col][0]].to_numpy(float)

    stacker_classifies = False

    def stacker_predict(self, models: list, X: pd.DataFrame, n_outputs: int) -> np.ndarray:
        return np.asarray(models[0].predict(X))

    def stacker_score(self, cfg: CFG, y_true: np.ndarray, y_pred: np.ndarray, present: np.ndarray, n_outputs: int) -> float:
        return get_score(cfg.metric, y_true, y_pred)

    def tally(self, results: list[dict]) -> Counter:
        return Counter()

    def result(self, cfg: CFG, probs: np.ndarray, hit: np.ndarray | None, classes: list) -> dict:
        return {"label": float(probs[0]), "confidence": None, "value": float(probs[0])}
