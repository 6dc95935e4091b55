"""CNN embeddings and the LightGBM stacker.

Leak-free by construction: fold k's CNN embeds every train row and the test set; the fold-k
stacker is fitted on that CNN's embeddings of the rows it trained on, early-stopped and
validated on fold k's rows (which that CNN never saw), and predicts test from the same CNN.
No row's stacker prediction comes from a model that saw the row.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import torch

from .config import CFG, save_cfg
from .models import create_model
from .train import fold_dir, frame_predictions, make_loader, num_outputs, predict, write_score
from .utils import atomic_save, atomic_to_csv, get_device


def feature_dir(cfg: CFG) -> Path:
    return cfg.exp_dir / "features"


def load_fold_model(cfg: CFG, fold: int, device) -> tuple[torch.nn.Module, list | None]:
    """Fold k's best checkpoint, ready for inference; (model, classes)."""
    path = fold_dir(cfg, fold) / "best.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint for fold {fold}: {path} (train the fold with 02_train first)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = create_model(cfg, num_outputs(cfg, ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["classes"]


def extract_features(cfg: CFG, folds: pd.DataFrame, test: pd.DataFrame, logger: logging.Logger | None = None) -> Path:
    """features/train_fold{k}.npy (every train row, folds.csv order) and test_fold{k}.npy from
    fold k's best model, float16, plus train_ids.csv / test_ids.csv. Folds already extracted
    are kept."""
    logger = logger or logging.getLogger("kaggle")
    out = feature_dir(cfg)
    device = get_device(cfg.device)
    atomic_to_csv(folds[[cfg.id_col, "fold"]], out / "train_ids.csv")
    atomic_to_csv(test[[cfg.id_col]], out / "test_ids.csv")
    for k in cfg.fold_ids:
        train_path, test_path = out / f"train_fold{k}.npy", out / f"test_fold{k}.npy"
        ckpt_time = (fold_dir(cfg, k) / "best.pt").stat().st_mtime if (fold_dir(cfg, k) / "best.pt").exists() else 0
        if train_path.exists() and test_path.exists() and train_path.stat().st_mtime > ckpt_time and not cfg.retrain:
            logger.info(f"fold {k}: features already extracted")
            continue
        model, _ = load_fold_model(cfg, k, device)
        for df, path in ((folds, train_path), (test, test_path)):
            emb = predict(model, make_loader(cfg, df, train=False), cfg, device, features=True).astype(np.float16)
            atomic_save(emb, path, saver=lambda a, p: np.save(p, a))
        logger.info(f"fold {k}: embeddings {emb.shape[1]} wide for {len(folds)} train and {len(test)} test rows")
    return out


def _check_ids(ids_path: Path, expected: pd.Series, id_col: str) -> None:
    saved = pd.read_csv(ids_path)[id_col].astype(str).to_numpy()
    if len(saved) != len(expected) or (saved != expected.astype(str).to_numpy()).any():
        raise ValueError(f"{ids_path}: ids differ from the current data; extract the features again (retrain=True)")


def feature_frame(cfg: CFG, emb: np.ndarray, rows: pd.DataFrame) -> pd.DataFrame:
    """Embedding columns emb_0.. plus the metadata columns (strings become categories)."""
    X = pd.DataFrame(emb.astype(np.float32), columns=[f"emb_{i}" for i in range(emb.shape[1])])
    for col in cfg.metadata_cols:
        X[col] = rows[col].to_numpy()
    return X


def _categorise(X_train: pd.DataFrame, X_other: list[pd.DataFrame]) -> None:
    """Object metadata columns -> pandas categories with one category set for all frames."""
    text = [c for c in X_train.columns if pd.api.types.is_object_dtype(X_train[c]) or pd.api.types.is_string_dtype(X_train[c])]
    for col in text:
        cats = pd.Index(sorted(set(X_train[col].dropna()).union(*(set(x[col].dropna()) for x in X_other))))
        for X in (X_train, *X_other):
            X[col] = pd.Categorical(X[col], categories=cats)


def stack_experiment(cfg: CFG) -> CFG:
    """The stacker's own experiment: models/<experiment>_lgbm."""
    from dataclasses import replace

    return replace(cfg, experiment=f"{cfg.experiment}_lgbm", arch="lgbm")


def run_stacking(cfg: CFG, folds: pd.DataFrame, test: pd.DataFrame, logger: logging.Logger | None = None) -> dict:
    """LightGBM per fold on fold k's embeddings (+ metadata); writes models/<exp>_lgbm/
    {oof.csv, test.csv, score.json, importance.csv, config.yaml}. Returns the score dict and
    the feature importance (averaged over folds) under 'importance'."""
    logger = logger or logging.getLogger("kaggle")
    src, stack_cfg = feature_dir(cfg), stack_experiment(cfg)
    _check_ids(src / "train_ids.csv", folds[cfg.id_col], cfg.id_col)
    _check_ids(src / "test_ids.csv", test[cfg.id_col], cfg.id_col)
    classes = sorted(folds[cfg.target_col].unique().tolist()) if cfg.task == "classification" else None
    y = folds["target"].to_numpy()
    params = dict(n_estimators=cfg.lgbm_n_estimators, learning_rate=cfg.lgbm_learning_rate, num_leaves=cfg.lgbm_num_leaves,
                  colsample_bytree=cfg.lgbm_feature_fraction, subsample=0.8, subsample_freq=1, min_child_samples=10,
                  random_state=cfg.seed, verbose=-1, n_jobs=max(torch.get_num_threads(), 1))
    oof_parts, test_preds, importances = [], [], []
    for k in cfg.fold_ids:
        X = feature_frame(cfg, np.load(src / f"train_fold{k}.npy"), folds)
        X_test = feature_frame(cfg, np.load(src / f"test_fold{k}.npy"), test)
        trn, val = (folds["fold"] != k).to_numpy(), (folds["fold"] == k).to_numpy()
        X_trn, X_val = X[trn].reset_index(drop=True), X[val].reset_index(drop=True)
        _categorise(X_trn, [X_val, X_test])
        if cfg.task == "regression":
            model = lgb.LGBMRegressor(**params)
        else:
            model = lgb.LGBMClassifier(**params)
        model.fit(X_trn, y[trn], eval_X=(X_val,), eval_y=(y[val],),
                  callbacks=[lgb.early_stopping(cfg.lgbm_early_stopping, verbose=False)])
        if cfg.task == "regression":
            val_pred, test_pred = model.predict(X_val), model.predict(X_test)
        else:
            val_pred, test_pred = _full_proba(model, X_val, len(classes)), _full_proba(model, X_test, len(classes))
        part = frame_predictions(folds.loc[val, cfg.id_col], val_pred, cfg, classes)
        part.insert(1, cfg.target_col, folds.loc[val, cfg.target_col].to_numpy())
        part.insert(2, "fold", k)
        oof_parts.append(part)
        test_preds.append(test_pred)
        importances.append(pd.Series(model.booster_.feature_importance("gain"), index=X.columns))
        logger.info(f"stacker fold {k}: {model.best_iteration_ or cfg.lgbm_n_estimators} trees")
    oof = pd.concat(oof_parts, ignore_index=True)
    stack_cfg.exp_dir.mkdir(parents=True, exist_ok=True)
    save_cfg(stack_cfg)
    atomic_to_csv(frame_predictions(test[cfg.id_col], np.mean(test_preds, axis=0), cfg, classes), stack_cfg.exp_dir / "test.csv")
    atomic_to_csv(oof, stack_cfg.exp_dir / "oof.csv")
    importance = pd.concat(importances, axis=1).mean(axis=1).sort_values(ascending=False)
    importance = importance.rename("gain").rename_axis("feature").reset_index()
    importance["kind"] = np.where(importance["feature"].isin(cfg.metadata_cols), "metadata", "image")
    atomic_to_csv(importance, stack_cfg.exp_dir / "importance.csv")
    score = write_score(stack_cfg, oof, logger)
    return {**score, "importance": importance}


def _full_proba(model: lgb.LGBMClassifier, X: pd.DataFrame, n_classes: int) -> np.ndarray:
    """predict_proba with a column for every class, also those absent from a fold's training rows."""
    proba = model.predict_proba(X)
    full = np.zeros((len(X), n_classes))
    full[:, model.classes_.astype(int)] = proba
    return full
