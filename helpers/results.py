"""An experiment's results: its folds combined into one OOF file, one test prediction and one
score (score.json: the CV over all OOF rows, mean ± std over folds, what made it), for a CNN
experiment and a stacker alike; its test predictions with its refit's."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from . import artifacts, freshness
from .config import CFG
from .tasks import task_of

REFIT_SHARE = 0.5  # `refit: blend`: the refit's share of its experiment's test predictions


def with_refit(folds_test: np.ndarray, refit_test: np.ndarray, mode: str) -> np.ndarray:
    """An experiment's test predictions with its refit's: `blend` gives the refit (one model on
    all rows) REFIT_SHARE and the folds' mean the rest; `alone` keeps the refit's only."""
    return refit_test if mode == "alone" else (1 - REFIT_SHARE) * folds_test + REFIT_SHARE * refit_test


def finalize_experiment(cfg: CFG, logger: logging.Logger | None = None) -> dict | None:
    """When every fold of cfg.fold_ids is trained and has predicted the test set: the
    experiment's OOF (all folds), test predictions (mean over folds), OOF logits and score.
    None until then; the recorded score when nothing changed since."""
    logger = logger or logging.getLogger("kaggle")
    with freshness.decision():
        waiting = [k for k in cfg.fold_ids if freshness.stale(cfg, "train", k) or freshness.stale(cfg, "test", k)]
        if waiting:
            logger.info(f"{cfg.experiment}: folds {waiting} are not trained (or not up to date) yet")
            return None
        if freshness.stale(cfg, "cv") is None:
            return artifacts.read_score(artifacts.exp_dir(cfg))
    with freshness.build(cfg, "cv"):
        return _combine_folds(cfg, logger)


def _combine_folds(cfg: CFG, logger: logging.Logger) -> dict:
    """The folds' OOF rows together, their test predictions averaged, their logits, the score."""
    oof = pd.concat([artifacts.read_predictions(cfg, "oof", k) for k in cfg.fold_ids], ignore_index=True)
    tests = [artifacts.read_predictions(cfg, "test", k) for k in cfg.fold_ids]
    test = tests[0].copy()
    cols = [c for c in test.columns if c != cfg.id_col]
    test[cols] = np.mean([t[cols].to_numpy() for t in tests], axis=0)
    artifacts.write_predictions(cfg, "test", test)
    artifacts.write_predictions(cfg, "oof", oof)
    logit_paths = [artifacts.logits_path(cfg, k) for k in cfg.fold_ids]
    artifacts.save_logits(cfg, np.concatenate([np.load(p) for p in logit_paths]) if all(p.exists() for p in logit_paths) else None)
    wall = sum(r["time_s"] for k in cfg.fold_ids for r in artifacts.read_metrics(cfg, k))
    return write_score(cfg, oof, logger, wall_s=wall)


def write_score(cfg: CFG, oof: pd.DataFrame, logger: logging.Logger | None = None, wall_s: float | None = None,
                model: str | None = None) -> dict:
    """score.json of an experiment: CV on all OOF rows, mean ± std over folds, wall time, what
    made it (model, image size, epochs) and which data it belongs to."""
    task = task_of(cfg)
    y_true, y_pred = task.oof_targets(cfg, oof)
    labels = [c[len("prob_"):] for c in oof.columns if c.startswith("prob_")]
    cv, per_fold, extra = task.score(cfg, y_true, y_pred, oof["fold"].to_numpy(), labels)
    cnn = model is None
    runs = {k: artifacts.read_metrics(cfg, k) for k in cfg.fold_ids} if cnn else {}
    trained = [len(rows) for rows in runs.values() if rows]  # the epochs each fold really ran (time_limit plans them)
    score = {"experiment": cfg.experiment, "metric": cfg.metric, "cv": cv, **extra,
             "cv_mean": float(np.mean(per_fold)), "cv_std": float(np.std(per_fold)), "folds": per_fold,
             "wall_s": None if wall_s is None else round(wall_s, 1),
             "model": (cfg.model_name if cfg.arch == "timm" else cfg.arch) if cnn else model,
             "img_size": cfg.img_size if cnn else None,
             "epochs": (round(float(np.mean(trained)), 1) if trained else cfg.epochs) if cnn else None,
             "weights": next((r[0]["weights"] for r in runs.values() if r and "weights" in r[0]), None) if cnn else None,
             "data": freshness.competition_digest(cfg)}
    artifacts.write_score(cfg, score)
    if logger:
        logger.info(f"{cfg.experiment}: CV {cfg.metric} {score['cv']:.5f} "
                    f"(folds {score['cv_mean']:.5f} ± {score['cv_std']:.5f})"
                    + (f"; per-label prevalence baseline {score['baseline']:.5f}" if "baseline" in score else ""))
    return score
