"""Error analysis of out-of-fold predictions: what the model gets wrong.

Classification: the confusion matrix, the classification report, wrong_oof.csv (id, path, true
class, predicted class, confidence; most confident first) and a grid of the most confident
wrong images. Regression: residual plots, largest_errors.csv and a grid of the worst images.
Multi-label: a per-label precision/recall/F1 table (cross-fitted, as the CV), each label's
TP/FP/FN/TN, wrong_oof.csv (the most confident misses and false alarms) and their images.
Tables go to the experiment's analysis folder (helpers.artifacts); figures are helpers.plots'.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

from . import artifacts, plots
from .config import CFG
from .metrics import cross_fitted_hits, fit_thresholds
from .tasks import task_of
from .utils import atomic_to_csv


def classification_errors(cfg: CFG, oof: pd.DataFrame, folds: pd.DataFrame, out_dir: Path) -> dict:
    """Confusion matrix, report, wrong_oof.csv and the most confident wrong images."""
    cols = [c for c in oof.columns if c.startswith("prob_")]
    classes = [c[len("prob_"):] for c in cols]
    probs = oof[cols].to_numpy(float)
    merged = oof[[cfg.id_col, cfg.target_col]].merge(folds[[cfg.id_col, "path"]], on=cfg.id_col, how="left")
    true = merged[cfg.target_col].astype(str).to_numpy()
    pred = np.asarray(classes, dtype=object)[probs.argmax(1)]
    confidence = probs.max(1)
    wrong = pd.DataFrame({"id": merged[cfg.id_col], "path": merged["path"], "true": true, "pred": pred,
                          "confidence": confidence.round(5)})[true != pred].sort_values("confidence", ascending=False)
    atomic_to_csv(wrong, out_dir / "wrong_oof.csv")
    report = classification_report(true, pred, labels=classes, zero_division=0, output_dict=True)
    report = pd.DataFrame(report).T.round(4)
    atomic_to_csv(report.reset_index(names="class"), out_dir / "classification_report.csv")
    cm = confusion_matrix(true, pred, labels=classes)
    fig = plots.confusion_heatmap(cm, classes, f"confusion matrix (OOF, {len(wrong)} wrong of {len(true)})",
                                  out_dir / "confusion_matrix.png")
    grid = None
    if len(wrong):
        top = wrong.head(16)
        grid = plots.image_grid(top["path"].tolist(), [f"{t} -> {p} ({c:.2f})" for t, p, c in zip(top["true"], top["pred"], top["confidence"])],
                                out_dir / "wrong_confident.png")
    return {"wrong": wrong, "report": report, "confusion": fig, "grid": grid}


def regression_errors(cfg: CFG, oof: pd.DataFrame, folds: pd.DataFrame, out_dir: Path) -> dict:
    """Residual plots, largest_errors.csv and the images with the largest errors."""
    merged = oof[[cfg.id_col, cfg.target_col, "pred"]].merge(folds[[cfg.id_col, "path"]], on=cfg.id_col, how="left")
    merged["residual"] = merged["pred"] - merged[cfg.target_col]
    merged["abs_error"] = merged["residual"].abs()
    largest = merged.sort_values("abs_error", ascending=False)
    atomic_to_csv(largest, out_dir / "largest_errors.csv")
    fig = plots.residuals(merged, cfg.target_col, out_dir / "residuals.png")
    top = largest.head(16)
    grid = plots.image_grid(top["path"].tolist(), [f"{t:.1f} -> {p:.1f}" for t, p in zip(top[cfg.target_col], top["pred"])],
                            out_dir / "largest_errors.png")
    return {"largest": largest, "residuals": fig, "grid": grid}


def multilabel_errors(cfg: CFG, oof: pd.DataFrame, folds: pd.DataFrame, out_dir: Path) -> dict:
    """Per-label report and confusion counts, and the most confident misses (a label the image
    has, predicted least likely) and false alarms. Each row's labels are decided as the CV
    decides them, at thresholds tuned on the other folds (cross_fitted_hits), so the report's
    precision, recall and F1 are not tuned on the rows they count; its `threshold` column is
    the one the test set gets (tuned on every OOF row, score.json's)."""
    cols = [c for c in oof.columns if c.startswith("prob_")]
    labels = [c[len("prob_"):] for c in cols]
    y_true, probs = task_of(cfg).oof_targets(cfg, oof)
    score = artifacts.read_score(artifacts.exp_dir(cfg), missing_ok=True) or {}
    saved = score.get("thresholds") or {}
    thresholds = np.asarray([saved.get(label, 0.5) for label in labels]) if saved else fit_thresholds(cfg.metric, y_true, probs)
    hit, truth = cross_fitted_hits(cfg.metric, y_true, probs, oof["fold"].to_numpy()) > 0.5, y_true > 0.5
    tp, fp = (hit & truth).sum(0), (hit & ~truth).sum(0)
    fn, tn = (~hit & truth).sum(0), (~hit & ~truth).sum(0)
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    report = pd.DataFrame({"support": truth.sum(0), "precision": precision, "recall": recall, "f1": f1,
                           "threshold": thresholds, "tp": tp, "fp": fp, "fn": fn, "tn": tn}, index=labels).round(4)
    atomic_to_csv(report.reset_index(names="label"), out_dir / "label_report.csv")
    fig = plots.label_confusion(report, out_dir / "label_confusion.png")
    paths = oof[[cfg.id_col]].merge(folds[[cfg.id_col, "path"]], on=cfg.id_col, how="left")["path"].to_numpy()
    rows, cols_ = np.nonzero(truth & ~hit)
    misses = pd.DataFrame({"id": oof[cfg.id_col].to_numpy()[rows], "path": paths[rows], "label": np.asarray(labels)[cols_],
                           "kind": "miss", "prob": probs[rows, cols_]}).sort_values("prob")
    rows, cols_ = np.nonzero(~truth & hit)
    alarms = pd.DataFrame({"id": oof[cfg.id_col].to_numpy()[rows], "path": paths[rows], "label": np.asarray(labels)[cols_],
                           "kind": "false alarm", "prob": probs[rows, cols_]}).sort_values("prob", ascending=False)
    wrong = pd.concat([misses, alarms], ignore_index=True).round({"prob": 5})
    atomic_to_csv(wrong, out_dir / "wrong_oof.csv")
    top = pd.concat([misses.head(8), alarms.head(8)])
    grid = None
    if len(top):
        grid = plots.image_grid(top["path"].tolist(), [f"{k}: {label} ({p:.2f})" for k, label, p in zip(top["kind"], top["label"], top["prob"])],
                                out_dir / "wrong_confident.png")
    return {"report": report, "confusion": fig, "wrong": wrong, "grid": grid}


def error_analysis(cfg: CFG, folds: pd.DataFrame) -> dict | None:
    """Analyse the experiment's OOF predictions (None until every fold is trained)."""
    if not artifacts.predictions_path(cfg, "oof").exists():
        return None
    oof = artifacts.read_predictions(cfg, "oof")
    out_dir = artifacts.analysis_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    analyse = {"regression": regression_errors, "multilabel": multilabel_errors}.get(cfg.task, classification_errors)
    return analyse(cfg, oof, folds, out_dir)
