"""CNN embeddings and the stacker (LightGBM, or an SVR / logistic head from scikit-learn).

Leak-free by construction: fold k's CNN embeds every train row and the test set; the fold-k
stacker is fitted on that CNN's embeddings of the rows it trained on, early-stopped and
validated on fold k's rows (which that CNN never saw), and predicts test from the same CNN.
No row's stacker prediction comes from a model that saw the row. With features_from
'pretrained' the embeddings come from a frozen pretrained backbone that never saw a label
(the Pawpularity "embeddings + SVR" recipe), so one set serves every fold.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import torch
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer, TransformedTargetRegressor
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC, SVR

from .cache import build_cache
from .config import CFG, save_cfg
from .models import TimmModel, create_model
from .train import fold_dir, frame_predictions, make_loader, num_outputs, predict, write_score
from .utils import HIGHER_IS_BETTER, atomic_save_npy, atomic_to_csv, get_device, get_score


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


def _save(array: np.ndarray, path: Path) -> None:
    atomic_save_npy(array.astype(np.float16), path)


def extract_features(cfg: CFG, folds: pd.DataFrame, test: pd.DataFrame, logger: logging.Logger | None = None) -> Path:
    """Embeddings (float16) of every train row (folds.csv order) and the test set, with
    train_ids.csv / test_ids.csv: features/{train,test}_fold{k}.npy from fold k's best model,
    or features/{train,test}_all.npy from a frozen pretrained backbone (features_from
    'pretrained'). Folds already extracted from an unchanged checkpoint are kept."""
    logger = logger or logging.getLogger("kaggle")
    out = feature_dir(cfg)
    device = get_device(cfg.device)
    atomic_to_csv(folds[[cfg.id_col, "fold"]], out / "train_ids.csv")
    atomic_to_csv(test[[cfg.id_col]], out / "test_ids.csv")
    train_loader = make_loader(cfg, folds, train=False, cache=build_cache(cfg, folds["path"].tolist(), logger))
    test_loader = make_loader(cfg, test, train=False, cache=build_cache(cfg, test["path"].tolist(), logger))
    if cfg.features_from == "pretrained":
        if cfg.arch != "timm":
            raise ValueError("config key 'features_from': 'pretrained' needs a timm backbone (arch 'timm')")
        if not cfg.pretrained:
            logger.warning("features_from 'pretrained' with pretrained=False: embeddings of random weights")
        model = TimmModel(cfg, 1).to(device).eval()
        for loader, path in ((train_loader, out / "train_all.npy"), (test_loader, out / "test_all.npy")):
            _save(predict(model, loader, cfg, device, features=True), path)
        logger.info(f"frozen {cfg.model_name}: embeddings {model.num_features} wide for {len(folds)} train and {len(test)} test rows")
        return out
    for k in cfg.fold_ids:
        train_path, test_path = out / f"train_fold{k}.npy", out / f"test_fold{k}.npy"
        ckpt = fold_dir(cfg, k) / "best.pt"
        ckpt_time = ckpt.stat().st_mtime if ckpt.exists() else 0
        if train_path.exists() and test_path.exists() and train_path.stat().st_mtime > ckpt_time and not cfg.retrain:
            logger.info(f"fold {k}: features already extracted")
            continue
        model, _ = load_fold_model(cfg, k, device)
        for loader, path in ((train_loader, train_path), (test_loader, test_path)):
            _save(predict(model, loader, cfg, device, features=True), path)
        logger.info(f"fold {k}: embeddings {model.num_features} wide for {len(folds)} train and {len(test)} test rows")
    return out


def fold_features(src: Path, split: str, fold: int) -> np.ndarray:
    """The embeddings the fold-k stacker uses: fold k's CNN's, or the frozen backbone's."""
    path = src / f"{split}_fold{fold}.npy"
    if not path.exists() and (src / f"{split}_all.npy").exists():
        path = src / f"{split}_all.npy"
    if not path.exists():
        raise FileNotFoundError(f"no embeddings for fold {fold}: {path} (run 03_features first)")
    return np.load(path)


def _check_ids(ids_path: Path, expected: pd.Series, id_col: str) -> None:
    saved = pd.read_csv(ids_path)[id_col].astype(str).to_numpy()
    if len(saved) != len(expected) or (saved != expected.astype(str).to_numpy()).any():
        raise ValueError(f"{ids_path}: ids differ from the current data; extract the features again (retrain=True)")


def feature_frame(cfg: CFG, emb: np.ndarray, rows: pd.DataFrame) -> pd.DataFrame:
    """Embedding columns emb_0.. plus the metadata columns (strings become categories later)."""
    X = pd.DataFrame(emb.astype(np.float32), columns=[f"emb_{i}" for i in range(emb.shape[1])])
    for col in cfg.metadata_cols:
        X[col] = rows[col].to_numpy()
    return X


def _text_columns(X: pd.DataFrame) -> list[str]:
    return [c for c in X.columns if pd.api.types.is_object_dtype(X[c]) or pd.api.types.is_string_dtype(X[c])]


def _categorise(X_train: pd.DataFrame, X_other: list[pd.DataFrame]) -> None:
    """Text metadata columns -> pandas categories with one category set for all frames."""
    for col in _text_columns(X_train):
        cats = pd.Index(sorted(set(X_train[col].dropna()).union(*(set(x[col].dropna()) for x in X_other))))
        for X in (X_train, *X_other):
            X[col] = pd.Categorical(X[col], categories=cats)


def _pca(cfg: CFG, X_trn: pd.DataFrame, others: list[pd.DataFrame]) -> list[pd.DataFrame]:
    """Embeddings reduced to cfg.stack_pca components, fitted on the fold's training rows only."""
    emb = [c for c in X_trn.columns if c.startswith("emb_")]
    n = min(cfg.stack_pca, len(X_trn), len(emb))
    pca = PCA(n_components=n, random_state=cfg.seed).fit(X_trn[emb].to_numpy())
    out = []
    for X in (X_trn, *others):
        reduced = pd.DataFrame(pca.transform(X[emb].to_numpy()), columns=[f"pca_{i}" for i in range(n)], index=X.index)
        out.append(pd.concat([reduced, X.drop(columns=emb)], axis=1))
    return out


def _metric_eval(cfg: CFG, classes_present: np.ndarray, n_classes: int):
    """LightGBM eval on the competition metric, so early stopping follows it."""
    def evaluate(y_true, y_pred):
        if cfg.task == "regression":
            value = get_score(cfg.metric, y_true, y_pred)
        else:
            proba = y_pred if y_pred.ndim == 2 else np.column_stack([1 - y_pred, y_pred])
            full = np.zeros((len(y_true), n_classes))
            full[:, classes_present] = proba
            value = get_score(cfg.metric, y_true.astype(int), full)
        return cfg.metric, value, HIGHER_IS_BETTER[cfg.metric]
    return evaluate


def _fit_lgbm(cfg: CFG, X_trn, y_trn, X_val, y_val, n_classes: int):
    params = dict(n_estimators=cfg.lgbm_n_estimators, learning_rate=cfg.lgbm_learning_rate, num_leaves=cfg.lgbm_num_leaves,
                  colsample_bytree=cfg.lgbm_feature_fraction, subsample=0.8, subsample_freq=1, min_child_samples=10,
                  random_state=cfg.seed, verbose=-1, n_jobs=max(torch.get_num_threads(), 1), metric="None")
    model = lgb.LGBMRegressor(**params) if cfg.task == "regression" else lgb.LGBMClassifier(**params)
    present = np.unique(y_trn).astype(int)
    model.fit(X_trn, y_trn, eval_X=(X_val,), eval_y=(y_val,), eval_metric=_metric_eval(cfg, present, n_classes),
              callbacks=[lgb.early_stopping(cfg.lgbm_early_stopping, verbose=False)])
    importance = pd.Series(model.booster_.feature_importance("gain"), index=X_trn.columns)
    return model, importance, model.best_iteration_ or cfg.lgbm_n_estimators


def _fit_sklearn(cfg: CFG, X_trn, y_trn):
    """SVR/SVC or ridge/logistic regression on scaled numbers and one-hot text columns."""
    text = _text_columns(X_trn)
    numeric = [c for c in X_trn.columns if c not in text]
    prep = ColumnTransformer([("num", make_pipeline(SimpleImputer(), StandardScaler()), numeric),
                              ("cat", OneHotEncoder(handle_unknown="ignore"), text)])
    if cfg.task == "regression":  # the target standardised: C and epsilon mean the same on any scale
        head = TransformedTargetRegressor(SVR(C=cfg.stack_c) if cfg.stacker == "svr" else Ridge(alpha=1.0 / cfg.stack_c),
                                          transformer=StandardScaler())
    elif cfg.stacker == "svr":
        head = CalibratedClassifierCV(SVC(C=cfg.stack_c, random_state=cfg.seed), ensemble=False)  # probabilities
    else:
        head = LogisticRegression(C=cfg.stack_c, max_iter=2000)
    model = make_pipeline(prep, head).fit(X_trn, y_trn)
    return model, None, 0


def _predict(model, X: pd.DataFrame, cfg: CFG, n_classes: int) -> np.ndarray:
    """Regression values, or probabilities with a column for every class (also those absent
    from a fold's training rows)."""
    if cfg.task == "regression":
        return model.predict(X)
    proba = model.predict_proba(X)
    full = np.zeros((len(X), n_classes))
    full[:, np.asarray(model.classes_).astype(int)] = proba
    return full


def stack_experiment(cfg: CFG) -> CFG:
    """The stacker's own experiment: models/<experiment>_<stacker> (e.g. digits_resnet18_lgbm)."""
    return replace(cfg, experiment=f"{cfg.experiment}_{cfg.stacker}", arch=cfg.stacker)


def run_stacking(cfg: CFG, folds: pd.DataFrame, test: pd.DataFrame, logger: logging.Logger | None = None) -> dict:
    """The stacker per fold on fold k's embeddings (optionally PCA-reduced) + metadata; writes
    models/<exp>_<stacker>/{oof.csv, test.csv, score.json, config.yaml} (+ importance.csv for
    LightGBM). Returns the score dict, with the fold-averaged importance under 'importance'
    (None for the scikit-learn heads)."""
    logger = logger or logging.getLogger("kaggle")
    start = time.perf_counter()
    src, stack_cfg = feature_dir(cfg), stack_experiment(cfg)
    _check_ids(src / "train_ids.csv", folds[cfg.id_col], cfg.id_col)
    _check_ids(src / "test_ids.csv", test[cfg.id_col], cfg.id_col)
    classes = sorted(folds[cfg.target_col].unique().tolist()) if cfg.task == "classification" else None
    n_classes = len(classes) if classes else 1
    y = folds["target"].to_numpy()
    oof_parts, test_preds, importances = [], [], []
    for k in cfg.fold_ids:
        X = feature_frame(cfg, fold_features(src, "train", k), folds)
        X_test = feature_frame(cfg, fold_features(src, "test", k), test)
        trn, val = (folds["fold"] != k).to_numpy(), (folds["fold"] == k).to_numpy()
        X_trn, X_val = X[trn].reset_index(drop=True), X[val].reset_index(drop=True)
        if cfg.stack_pca:
            X_trn, X_val, X_test = _pca(cfg, X_trn, [X_val, X_test])
        if cfg.stacker == "lgbm":
            _categorise(X_trn, [X_val, X_test])
            model, importance, trees = _fit_lgbm(cfg, X_trn, y[trn], X_val, y[val], n_classes)
            importances.append(importance)
        else:
            model, _, trees = _fit_sklearn(cfg, X_trn, y[trn])
        part = frame_predictions(folds.loc[val, cfg.id_col], _predict(model, X_val, cfg, n_classes), cfg, classes)
        part.insert(1, cfg.target_col, folds.loc[val, cfg.target_col].to_numpy())
        part.insert(2, "fold", k)
        oof_parts.append(part)
        test_preds.append(_predict(model, X_test, cfg, n_classes))
        logger.info(f"{cfg.stacker} stacker fold {k}: {X_trn.shape[1]} features" + (f", {trees} trees" if trees else ""))
    oof = pd.concat(oof_parts, ignore_index=True)
    stack_cfg.exp_dir.mkdir(parents=True, exist_ok=True)
    save_cfg(stack_cfg)
    atomic_to_csv(frame_predictions(test[cfg.id_col], np.mean(test_preds, axis=0), cfg, classes), stack_cfg.exp_dir / "test.csv")
    atomic_to_csv(oof, stack_cfg.exp_dir / "oof.csv")
    importance = None
    if importances:
        importance = pd.concat(importances, axis=1).mean(axis=1).sort_values(ascending=False)
        importance = importance.rename("gain").rename_axis("feature").reset_index()
        importance["kind"] = np.where(importance["feature"].isin(cfg.metadata_cols), "metadata", "image")
        atomic_to_csv(importance, stack_cfg.exp_dir / "importance.csv")
    score = write_score(stack_cfg, oof, logger, wall_s=time.perf_counter() - start)
    return {**score, "importance": importance}
