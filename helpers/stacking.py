"""The stacker (LightGBM, or an SVR / logistic head from scikit-learn) and the CNN embeddings
it may read.

What a stacker of fold CNNs learns from (`stack_on`), with the metadata columns:
- 'oof' (the default): the CNN's out-of-fold predictions. Every row's came from the fold model
  that did not train on it, so the fold-k stacker learns from the other folds' OOF rows as
  honestly as it is scored on fold k's; for the test set it reads fold k's test predictions
  (one model's, as each OOF row is). On the demo (2026-12-05) its stackers scored 0.9812 and
  0.9610 against 0.9798 and 0.9596 on embeddings, and the blend used one (docs/stacking.md).
- 'embeddings': fold k's CNN embeds every train row and the test set; the fold-k stacker is
  fitted on that CNN's embeddings of the rows it trained on, scored on fold k's rows (which
  neither saw). No score is flattered, but the embeddings it learns from are of rows the CNN
  fitted, cleaner than those it is applied to: on the demo the stacker scores below its CNN.
- 'both': the two side by side.
LightGBM early-stops on a held-back share of the stacker's training rows, then is refitted on
all of them. With features_from 'pretrained' the embeddings come from a frozen pretrained
backbone that never saw a label (the Pawpularity "embeddings + SVR" recipe), so one set serves
every fold, honest for every row.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import skops.io as sio
import torch
from sklearn.calibration import CalibratedClassifierCV
from sklearn.compose import ColumnTransformer, TransformedTargetRegressor
from sklearn.decomposition import PCA
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.svm import SVC, SVR

from . import artifacts, freshness, stages
from .cache import create_cache
from .config import CFG
from .data import create_loader
from .engine import load_model, predict, rules_of
from .metrics import HIGHER_IS_BETTER
from .models import TimmModel
from .results import write_score
from .runtime import channels_last, get_device
from .tasks import TASKS, task_of
from .transforms import InputNorm, input_stats
from .utils import atomic_write_text

# LightGBM's settings unless cfg.lgbm_params says otherwise (early_stopping_round: rounds without
# improvement of the competition metric on the fold's held-out rows)
LGBM_DEFAULTS = {"n_estimators": 2000, "learning_rate": 0.05, "num_leaves": 15, "colsample_bytree": 0.5,
                 "subsample": 0.8, "subsample_freq": 1, "min_child_samples": 10, "early_stopping_round": 50}


def extract_features(cfg: CFG, folds: pd.DataFrame, test: pd.DataFrame, logger: logging.Logger | None = None) -> None:
    """Embeddings (float16) of every train row (folds.csv order) and the test set: from fold
    k's best model (its own config from its checkpoint), or from a frozen pretrained backbone
    (features_from 'pretrained'). Embeddings that are up to date are kept. Where training runs
    in bf16 they are computed in fp32 (engine.Rules.embed_amp)."""
    logger = logger or logging.getLogger("kaggle")
    parts = [None] if cfg.features_from == "pretrained" else [] if stages.stack_inputs(cfg) == "oof" else cfg.fold_ids
    if not parts:
        logger.info(f"{cfg.experiment}: no embeddings: its stacker learns from its out-of-fold predictions (stack_on: oof)")
        return
    device = get_device(cfg.device)
    todo = freshness.todo(cfg, "features", parts, cfg.retrain)  # never embed with a model that is itself out of date
    for k in parts:
        logger.info(f"{stages.output_name('features', k)}: {todo.get(k, 'up to date')}")
    if not todo:
        return
    train_loader = create_loader(cfg, folds, train=False, cache=create_cache(cfg, folds["path"].tolist(), logger))
    test_loader = create_loader(cfg, test, train=False, cache=create_cache(cfg, test["path"].tolist(), logger))
    rules, norm = rules_of(cfg, device), InputNorm(input_stats(cfg), device, channels_last(cfg, device))
    for k in todo:
        with freshness.build(cfg, "features", k):
            model, what = _embedder(cfg, k, device, logger)
            for split, loader in (("train", train_loader), ("test", test_loader)):
                artifacts.save_features(cfg, split, k, predict(model, loader, device, rules, norm, features=True))
        logger.info(f"{what}: embeddings {model.num_features} wide for {len(folds)} train and {len(test)} test rows")


def _embedder(cfg: CFG, k: int | None, device, logger: logging.Logger) -> tuple[torch.nn.Module, str]:
    """The model that embeds for the fold-k stacker: fold k's best (its own config from its
    checkpoint), or a frozen pretrained backbone (k None)."""
    if k is None:
        if cfg.arch != "timm":
            raise ValueError("config key 'features_from': 'pretrained' needs a timm backbone (arch 'timm')")
        if not cfg.pretrained:
            logger.warning("features_from 'pretrained' with pretrained=False: embeddings of random weights")
        model, what = TimmModel(cfg, 1).to(device).eval(), f"frozen {cfg.model_name}"
    else:
        ckpt = artifacts.load_checkpoint(artifacts.checkpoint_path(cfg, k))
        trained = artifacts.checkpoint_config(ckpt)
        if (trained.img_size, trained.in_chans) != (cfg.img_size, cfg.in_chans):
            raise ValueError(f"fold {k} was trained at img_size {trained.img_size}, in_chans {trained.in_chans}; "
                             f"the config now says {cfg.img_size}, {cfg.in_chans}: train the folds again (02_train)")
        model, what = load_model(ckpt, device, cfg), f"fold {k}"
    return model, what


def _text_columns(X: pd.DataFrame) -> list[str]:
    return [c for c in X.columns if pd.api.types.is_object_dtype(X[c]) or pd.api.types.is_string_dtype(X[c])]


class LgbmHead:
    """A fitted LightGBM model as its Booster and classes: what the stacker predicts with, in the
    project and in the offline package alike. Saved as LightGBM's own text model (no pickle:
    loading it runs no code)."""

    def __init__(self, booster: lgb.Booster, classes: list | None):
        self.booster, self.classes_ = booster, None if classes is None else np.asarray(classes)

    @classmethod
    def of(cls, model) -> "LgbmHead":
        return cls(model.booster_, getattr(model, "classes_", None) if isinstance(model, lgb.LGBMClassifier) else None)

    def predict(self, X) -> np.ndarray:
        return self.booster.predict(X)

    def predict_proba(self, X) -> np.ndarray:
        p = np.asarray(self.booster.predict(X))
        return np.column_stack([1 - p, p]) if p.ndim == 1 else p

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.booster.model_to_string())

    @classmethod
    def load(cls, path: Path, classes: list | None) -> "LgbmHead":
        return cls(lgb.Booster(model_str=Path(path).read_text()), classes)


# the types a scikit-learn head's skops file may hold beyond what skops trusts by default:
# exactly what the svr / logistic heads are made of, nothing that could run code
SKOPS_TRUSTED = ["numpy.dtype", "sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration"]


def _skops_load(path: Path):
    """A scikit-learn object from a skops file (scikit-learn's secure format: a zip of JSON and
    arrays, no pickle), refused when it holds a type outside skops' own list and SKOPS_TRUSTED."""
    untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in SKOPS_TRUSTED]
    if untrusted:
        raise ValueError(f"{path}: not loaded: it holds types {untrusted[:5]} that a stacker of helpers never has")
    return sio.load(path, trusted=SKOPS_TRUSTED)


class FoldStacker:
    """One fold's fitted stacker with all it needs to predict new rows, as saved beside the
    stacker's predictions and packed for an internet-off kernel: the PCA of the embeddings
    (fitted on the fold's training rows), the text metadata's categories (from those rows only:
    a category unseen in training is unknown, whatever the test set), the fitted model.

    `save` writes a folder that loads without running code: meta.json (settings, categories,
    classes), LightGBM's text models, and skops files (scikit-learn's secure format) for the
    PCA and the scikit-learn heads."""

    def __init__(self, cfg: CFG, n_classes: int, oof_columns: list[str] | None = None):
        self.task, self.stacker, self.metadata_cols, self.n_classes = cfg.task, cfg.stacker, list(cfg.metadata_cols), n_classes
        self.oof_columns = list(oof_columns or [])  # the CNN's prediction columns its input starts with (stack_on oof, both)
        self.pca, self.categories, self.model, self.trees, self.importance = None, {}, None, 0, None

    def frame(self, inputs: np.ndarray, rows: pd.DataFrame) -> pd.DataFrame:
        """The model's input: the CNN's out-of-fold (for the test set: fold k's) predictions, then
        embeddings (PCA-reduced when fitted so), then the metadata columns."""
        inputs = np.asarray(inputs, dtype=np.float32).reshape(len(rows), -1)
        n = len(self.oof_columns)
        emb = inputs[:, n:]
        X = pd.DataFrame(emb, columns=[f"emb_{i}" for i in range(emb.shape[1])])
        if self.pca is not None:
            X = pd.DataFrame(self.pca.transform(emb), columns=[f"pca_{i}" for i in range(self.pca.n_components_)])
        X = pd.concat([pd.DataFrame(inputs[:, :n], columns=[f"oof_{c}" for c in self.oof_columns]), X], axis=1)
        for col in self.metadata_cols:
            X[col] = rows[col].to_numpy()
        for col, cats in self.categories.items():  # LightGBM: text as categories fixed in training
            X[col] = pd.Categorical(X[col], categories=cats)
        return X

    def fit(self, cfg: CFG, inputs: np.ndarray, rows: pd.DataFrame, y: np.ndarray, seed: int) -> "FoldStacker":
        emb = np.asarray(inputs, dtype=np.float32)[:, len(self.oof_columns):]
        if cfg.stack_pca and emb.shape[1]:
            n = min(cfg.stack_pca, len(emb), emb.shape[1])
            self.pca = PCA(n_components=n, random_state=cfg.seed).fit(emb)
        X = self.frame(inputs, rows)
        if cfg.stacker == "lgbm":
            self.categories = {c: sorted(X[c].dropna().unique().tolist()) for c in _text_columns(X)}
            X = self.frame(inputs, rows)
        fit = (lambda c, X_, y_, n: _fit_lgbm(c, X_, y_, n, seed)) if cfg.stacker == "lgbm" else (lambda c, X_, y_, n: _fit_sklearn(c, X_, y_))
        task = task_of(cfg)
        models, importances = [], []
        for head_cfg, head_y in task.stacker_heads(cfg, y):  # multi-label: one binary head per label
            if task.stacker_per_output and head_y.min() == head_y.max():  # a label these rows never (or always) show: its share
                models.append(float(head_y[0]))
                continue
            model, importance, trees = fit(head_cfg, X, head_y, 2 if task.stacker_per_output else self.n_classes)
            models.append(model)
            importances += [] if importance is None else [importance]
            self.trees = max(self.trees, trees)
        if task.stacker_per_output:
            self.model, self.importance = models, pd.concat(importances, axis=1).mean(axis=1) if importances else None
        else:
            self.model, self.importance = models[0], importances[0] if importances else None
        return self

    def predict(self, inputs: np.ndarray, rows: pd.DataFrame) -> np.ndarray:
        """Regression values, or probabilities with a column for every class (also those absent
        from the fold's training rows), or for every label."""
        models = self.model if isinstance(self.model, list) else [self.model]
        return TASKS[self.task].stacker_predict(models, self.frame(inputs, rows), self.n_classes)

    # --- a folder that loads without running code ---------------------------------------------
    def save(self, folder: Path) -> None:
        """meta.json, model*.txt (LightGBM) or model*.skops (scikit-learn), pca.skops; written
        beside, then moved in, so a killed save leaves the last complete one."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        models = self.model if isinstance(self.model, list) else [self.model]
        heads = []
        for j, m in enumerate(models):
            if isinstance(m, float):
                heads.append({"constant": m})
            elif isinstance(m, LgbmHead):
                m.save(tmp / f"model{j}.txt")
                heads.append({"lgbm": f"model{j}.txt", "classes": None if m.classes_ is None else m.classes_.tolist()})
            else:
                sio.dump(m, tmp / f"model{j}.skops")
                heads.append({"skops": f"model{j}.skops"})
        if self.pca is not None:
            sio.dump(self.pca, tmp / "pca.skops")
        meta = {"task": self.task, "stacker": self.stacker, "metadata_cols": self.metadata_cols, "n_classes": self.n_classes,
                "oof_columns": self.oof_columns,
                "categories": self.categories, "trees": self.trees, "pca": self.pca is not None,
                "list": isinstance(self.model, list), "heads": heads}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)

    @classmethod
    def load(cls, folder: Path) -> "FoldStacker":
        """A stacker `save` wrote (a missing or unreadable file is an error naming it)."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder / 'meta.json'}: not a saved stacker ({type(e).__name__}: {e})") from None
        self = cls.__new__(cls)
        self.task, self.stacker, self.metadata_cols = meta["task"], meta["stacker"], meta["metadata_cols"]
        self.oof_columns = meta.get("oof_columns", [])
        self.n_classes, self.categories, self.trees, self.importance = meta["n_classes"], meta["categories"], meta["trees"], None
        self.pca = _skops_load(folder / "pca.skops") if meta["pca"] else None
        heads = []
        for head in meta["heads"]:
            try:
                heads.append(head["constant"] if "constant" in head else
                             LgbmHead.load(folder / head["lgbm"], head["classes"]) if "lgbm" in head else
                             _skops_load(folder / head["skops"]))
            except (OSError, lgb.basic.LightGBMError) as e:
                raise ValueError(f"{folder}: a model file cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
        self.model = heads if meta["list"] else heads[0]
        return self


def _metric_eval(cfg: CFG, classes_present: np.ndarray, n_classes: int):
    """LightGBM eval on the competition metric, so early stopping follows it."""
    task = task_of(cfg)

    def evaluate(y_true, y_pred):
        return cfg.metric, task.stacker_score(cfg, y_true, y_pred, classes_present, n_classes), HIGHER_IS_BETTER[cfg.metric]
    return evaluate


EARLY_STOPPING_SHARE = 0.15  # of a fold's training rows, held back to choose LightGBM's number of trees


def _fit_lgbm(cfg: CFG, X_trn, y_trn, n_classes: int, seed: int):
    """LightGBM early-stopped on the competition metric on a held-back share of the training
    rows (never on the fold it is scored on: that would flatter its OOF score and so its
    weight in the blend), then refitted on all of them with the number of trees found."""
    params = {**LGBM_DEFAULTS, "random_state": cfg.seed, "verbose": -1, "n_jobs": max(torch.get_num_threads(), 1),
              **cfg.lgbm_params, "metric": "None"}
    rounds = params.pop("early_stopping_round")
    classifies = task_of(cfg).stacker_classifies
    create = lgb.LGBMClassifier if classifies else lgb.LGBMRegressor
    trees = params["n_estimators"]
    if rounds:
        y_trn = np.asarray(y_trn)
        stratify = y_trn if classifies and np.bincount(y_trn.astype(int)).min(initial=2) >= 2 else None
        try:
            fit, stop = train_test_split(np.arange(len(X_trn)), test_size=EARLY_STOPPING_SHARE, random_state=seed,
                                         stratify=stratify)
        except ValueError:  # a class too rare to split by: an unstratified split
            fit, stop = train_test_split(np.arange(len(X_trn)), test_size=EARLY_STOPPING_SHARE, random_state=seed)
        probe = create(**params)
        X_stop, y_stop = X_trn.iloc[stop], y_trn[stop]
        # LightGBM 4.6 names the validation data eval_X/eval_y; older 4.x (Kaggle's image lags) eval_set
        evals = ({"eval_X": (X_stop,), "eval_y": (y_stop,)} if "eval_X" in inspect.signature(probe.fit).parameters
                 else {"eval_set": [(X_stop, y_stop)]})
        probe.fit(X_trn.iloc[fit], y_trn[fit], **evals,
                  eval_metric=_metric_eval(cfg, np.unique(y_trn[fit]).astype(int), n_classes),
                  callbacks=[lgb.early_stopping(rounds, verbose=False)])
        trees = probe.best_iteration_ or trees
    model = create(**{**params, "n_estimators": trees}).fit(X_trn, y_trn)
    importance = pd.Series(model.booster_.feature_importance("gain"), index=X_trn.columns)
    return LgbmHead.of(model), importance, trees


def _fit_sklearn(cfg: CFG, X_trn, y_trn):
    """SVR/SVC or ridge/logistic regression on scaled numbers and one-hot text columns."""
    text = _text_columns(X_trn)
    numeric = [c for c in X_trn.columns if c not in text]
    prep = ColumnTransformer([("num", make_pipeline(SimpleImputer(), StandardScaler()), numeric),
                              ("cat", OneHotEncoder(handle_unknown="ignore"), text)])
    if not task_of(cfg).stacker_classifies:  # the target standardised: C and epsilon mean the same on any scale
        head = TransformedTargetRegressor(SVR(C=cfg.stack_c) if cfg.stacker == "svr" else Ridge(alpha=1.0 / cfg.stack_c),
                                          transformer=StandardScaler())
    elif cfg.stacker == "svr":
        head = CalibratedClassifierCV(SVC(C=cfg.stack_c, random_state=cfg.seed), ensemble=False)  # probabilities
    else:
        head = LogisticRegression(C=cfg.stack_c, max_iter=2000)
    model = make_pipeline(prep, head).fit(X_trn, y_trn)
    return model, None, 0


def _embeddings(cfg: CFG, split: str, fold: int, rows: int) -> np.ndarray:
    emb = artifacts.load_features(cfg, split, fold)
    if len(emb) != rows:
        raise ValueError(f"{artifacts.feature_path(cfg, split, fold)}: {len(emb)} rows of embeddings for {rows} {split} "
                         f"rows: run 03_features again")
    return emb


def _oof_inputs(cfg: CFG, folds: pd.DataFrame, oof_columns: list[str]) -> np.ndarray | None:
    """The CNN's out-of-fold predictions of every train row, in folds.csv order (rows of folds not
    trained: NaN, never learnt from); None when the stacker reads embeddings alone."""
    if not oof_columns:
        return None
    oof = artifacts.read_predictions(cfg, "oof").set_index(cfg.id_col)
    return oof.reindex(folds[cfg.id_col])[oof_columns].to_numpy(np.float32)


def _inputs(cfg: CFG, folds: pd.DataFrame, test: pd.DataFrame, k: int, oof_columns: list[str],
            oof: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Fold k's stacker's inputs for every train row (folds.csv order) and the test set: the
    CNN's out-of-fold predictions (`oof`) and fold k's test predictions, then (stack_on
    embeddings, both) fold k's CNN's embeddings."""
    train_parts, test_parts = [], []
    if oof is not None:
        test_k = artifacts.read_predictions(cfg, "test", k).set_index(cfg.id_col)
        train_parts.append(oof)
        test_parts.append(test_k.reindex(test[cfg.id_col])[oof_columns].to_numpy(np.float32))
        if np.isnan(test_parts[-1]).any():
            raise ValueError(f"{artifacts.predictions_path(cfg, 'test', k)}: test ids missing: run 02_train's fold {k} again")
    if stages.stack_inputs(cfg) != "oof":
        train_parts.append(_embeddings(cfg, "train", k, len(folds)))
        test_parts.append(_embeddings(cfg, "test", k, len(test)))
    return np.hstack(train_parts), np.hstack(test_parts)


def run_stacking(cfg: CFG, folds: pd.DataFrame, test: pd.DataFrame, logger: logging.Logger | None = None) -> dict:
    """The stacker per fold on what stack_on says (optionally PCA-reduced embeddings) + metadata; its OOF,
    test predictions, score (and LightGBM's importance) form the experiment <exp>_<stacker>.
    Returns the score dict, with the fold-averaged importance under 'importance' (None for the
    scikit-learn heads). Kept as it is while up to date."""
    logger = logger or logging.getLogger("kaggle")
    out_cfg = artifacts.stack_cfg(cfg)
    why = freshness.todo(cfg, "stacking", [None], cfg.retrain).get(None)
    if why is None:
        logger.info(f"{out_cfg.experiment}: up to date")
        return {**artifacts.read_score(artifacts.exp_dir(out_cfg)), "importance": artifacts.read_importance(out_cfg)}
    logger.info(f"{out_cfg.experiment}: stacking: {why}")
    with freshness.build(cfg, "stacking"):
        return _stack(cfg, folds, test, logger)


def _stack(cfg: CFG, folds: pd.DataFrame, test: pd.DataFrame, logger: logging.Logger) -> dict:
    """run_stacking's work: every fold's stacker, the stacker experiment's files and score."""
    out_cfg = artifacts.stack_cfg(cfg)
    start = time.perf_counter()
    task = task_of(cfg)
    classes = task.classes(folds, cfg)
    n_classes = len(classes) if classes else 1
    y = task.targets(folds)
    inputs = stages.stack_inputs(cfg)
    oof_columns = task.pred_columns(classes) if inputs != "embeddings" else []
    oof_inputs = _oof_inputs(cfg, folds, oof_columns)
    oof_parts, test_preds, importances = [], [], []
    for k in cfg.fold_ids:
        x, x_test = _inputs(cfg, folds, test, k, oof_columns, oof_inputs)
        # the rows the stacker learns from: the other trained folds' (their OOF rows, or fold k's
        # CNN's embeddings of the rows it trained on)
        trn = (folds["fold"] != k).to_numpy() & (folds["fold"].isin(cfg.fold_ids).to_numpy() if oof_columns else True)
        val = (folds["fold"] == k).to_numpy()
        rows_trn, rows_val = folds[trn].reset_index(drop=True), folds[val].reset_index(drop=True)
        stacker = FoldStacker(cfg, n_classes, oof_columns).fit(cfg, x[trn], rows_trn, y[trn], seed=cfg.seed + k)
        stacker.save(artifacts.stacker_path(out_cfg, k))
        if stacker.importance is not None:
            importances.append(stacker.importance)
        part = artifacts.frame_predictions(rows_val[cfg.id_col], stacker.predict(x[val], rows_val), cfg, task.pred_columns(classes))
        part.insert(1, cfg.target_col, rows_val[cfg.target_col].to_numpy())
        part.insert(2, "fold", k)
        oof_parts.append(part)
        test_preds.append(stacker.predict(x_test, test))
        n_features = len(stacker.frame(x[:1], rows_trn.head(1)).columns)
        logger.info(f"{cfg.stacker} stacker fold {k}: {n_features} features" + (f", {stacker.trees} trees" if stacker.trees else ""))
    oof = pd.concat(oof_parts, ignore_index=True)
    artifacts.save_config(out_cfg)
    artifacts.write_predictions(out_cfg, "test", artifacts.frame_predictions(test[cfg.id_col], np.mean(test_preds, axis=0), cfg,
                                                                             task.pred_columns(classes)))
    artifacts.write_predictions(out_cfg, "oof", oof)
    importance = None
    if importances:
        importance = pd.concat(importances, axis=1).mean(axis=1).sort_values(ascending=False)
        importance = importance.rename("gain").rename_axis("feature").reset_index()
        importance["kind"] = np.where(importance["feature"].isin(cfg.metadata_cols), "metadata",
                                      np.where(importance["feature"].str.startswith("oof_"), "cnn prediction", "image"))
        artifacts.write_importance(out_cfg, importance)
    artifacts.write_stacker_manifest(out_cfg, {"source": cfg.experiment, "features_from": cfg.features_from, "stack_on": inputs,
                                               "folds": cfg.fold_ids, "metadata_cols": cfg.metadata_cols})
    score = write_score(out_cfg, oof, logger, wall_s=time.perf_counter() - start, model=cfg.stacker)
    return {**score, "importance": importance}
