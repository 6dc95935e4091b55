"""Ensembling: collect the experiments under models/, weight them on OOF by hill climbing
(Caruana forward selection with replacement), judge the weights on held-out folds, the OOF
correlation matrix, and the submission in sample_submission's shape."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from .config import CFG, load_saved_cfg, under_root
from .data import get_classes, read_csv, read_sample_submission
from .train import oof_targets
from .utils import HIGHER_IS_BETTER, atomic_to_csv, get_score


@dataclass
class Experiment:
    name: str
    cfg: CFG
    oof: np.ndarray  # [n_train, n_cols] in the reference id order
    test: np.ndarray  # [n_test, n_cols] in the reference id order
    score: float


@dataclass
class Collection:
    experiments: list[Experiment]
    oof: pd.DataFrame  # id, target, fold of the OOF rows, in the order of every experiment's arrays
    y_true: np.ndarray  # class indices or values of those rows
    test_ids: pd.Series  # test ids, in the order of every experiment's test arrays


def collect_experiments(cfg: CFG, logger: logging.Logger | None = None) -> Collection:
    """Every experiment under models/ of this competition (same data, target and task) that has
    oof.csv and test.csv. Ids are aligned to the first experiment; a mismatch is an error
    naming the experiment."""
    logger = logger or logging.getLogger("kaggle")
    root = cfg.exp_dir.parent
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if not all((d / f).exists() for f in ("oof.csv", "test.csv", "config.yaml")):
            continue
        exp_cfg = load_saved_cfg(d)
        same = (exp_cfg.competition_dir, exp_cfg.train_csv, exp_cfg.target_col, exp_cfg.task) == \
               (cfg.competition_dir, cfg.train_csv, cfg.target_col, cfg.task)
        if same:
            found.append((d.name, exp_cfg))
    if not found:
        raise FileNotFoundError(f"no experiment with oof.csv and test.csv for {cfg.competition_dir} under {root}")
    experiments, ref_oof, ref_test, ref_y = [], None, None, None
    for name, exp_cfg in found:
        oof = pd.read_csv(root / name / "oof.csv")
        test = pd.read_csv(root / name / "test.csv")
        cols = [c for c in oof.columns if c.startswith("prob_")] or ["pred"]
        if ref_oof is None:
            ref_oof, ref_test, ref_cols = oof[[cfg.id_col, cfg.target_col, "fold"]].copy(), test[[cfg.id_col]].copy(), cols
        if cols != ref_cols:
            raise ValueError(f"experiment '{name}': prediction columns {cols} differ from {ref_cols}")
        oof, test = _align(oof, ref_oof[cfg.id_col], cfg.id_col, name, "oof.csv"), _align(test, ref_test[cfg.id_col], cfg.id_col, name, "test.csv")
        if (oof["fold"].to_numpy() != ref_oof["fold"].to_numpy()).any():
            logger.warning(f"experiment '{name}' used other folds than '{found[0][0]}': its held-out scores are optimistic")
        y_true, y_pred = oof_targets(cfg, oof)
        experiments.append(Experiment(name, exp_cfg, y_pred.reshape(len(oof), -1), test[cols].to_numpy(float),
                                      get_score(cfg.metric, y_true, y_pred)))
        ref_y = y_true if ref_y is None else ref_y  # rows are aligned: every experiment's y_true is the same
    return Collection(experiments, ref_oof, ref_y, ref_test[cfg.id_col])


def _align(df: pd.DataFrame, ids: pd.Series, id_col: str, name: str, what: str) -> pd.DataFrame:
    """df reordered to `ids`; an error naming the experiment when the id sets differ."""
    if df[id_col].duplicated().any():
        raise ValueError(f"experiment '{name}': {what} has duplicate ids")
    have, want = set(df[id_col].astype(str)), set(ids.astype(str))
    if have != want:
        raise ValueError(f"experiment '{name}': {what} ids differ from the other experiments "
                         f"({len(want - have)} missing, {len(have - want)} extra, e.g. {sorted(want ^ have)[:3]})")
    return df.set_index(df[id_col].astype(str)).loc[ids.astype(str)].reset_index(drop=True)


def blend(preds: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    return sum(w * p for w, p in zip(weights, preds)) / weights.sum()


def hill_climb(preds: list[np.ndarray], y_true: np.ndarray, metric: str, iters: int = 50) -> np.ndarray:
    """Caruana's ensemble selection: start from the best model, then repeatedly add (with
    replacement) the model that most improves the blend; weights are the selection counts.
    Never worse in sample than the best single model."""
    sign = 1 if HIGHER_IS_BETTER[metric] else -1
    singles = [sign * get_score(metric, y_true, p) for p in preds]
    counts = np.zeros(len(preds))
    counts[int(np.argmax(singles))] = 1
    best = max(singles)
    for _ in range(iters):
        trials = [sign * get_score(metric, y_true, blend(preds, counts + np.eye(len(preds))[i])) for i in range(len(preds))]
        i = int(np.argmax(trials))
        if trials[i] <= best:
            break
        counts[i] += 1
        best = trials[i]
    return counts / counts.sum()


def rank_transform(pred: np.ndarray) -> np.ndarray:
    """Each column's values as ranks scaled to [0, 1] (ties share their mean rank)."""
    ranks = pd.DataFrame(pred).rank(method="average").to_numpy()
    return (ranks - 1) / max(len(pred) - 1, 1)


def _normalise_rows(pred: np.ndarray) -> np.ndarray:
    return pred / np.clip(pred.sum(1, keepdims=True), 1e-12, None) if pred.shape[1] > 1 else pred


def fit_ensemble(experiments: list[Experiment], y_true: np.ndarray, folds: np.ndarray, metric: str,
                 method: str = "hill", iters: int = 50) -> dict:
    """Blend the experiments' OOF and test predictions.

    'hill': weights by hill climbing on all OOF rows (the in-sample score), and judged honestly:
    for each fold, weights fitted on the other folds score that fold (the held-out score).
    'mean': equal weights. 'rank': equal-weight average of per-column ranks (classification).
    Returns weights, in_sample, held_out, oof and test (the blended predictions)."""
    oofs, tests = [e.oof for e in experiments], [e.test for e in experiments]
    if method == "rank":
        oofs = [rank_transform(p) for p in oofs]
        tests = [rank_transform(p) for p in tests]
    if method == "hill":
        weights = hill_climb(oofs, y_true, metric, iters)
        held_out = np.zeros_like(oofs[0])
        for k in np.unique(folds):
            trn, val = folds != k, folds == k
            w = hill_climb([p[trn] for p in oofs], y_true[trn], metric, iters)
            held_out[val] = blend([p[val] for p in oofs], w)
    else:
        weights = np.full(len(oofs), 1.0 / len(oofs))
        held_out = blend(oofs, weights)  # nothing is fitted: in-sample is held-out
    oof, test = blend(oofs, weights), blend(tests, weights)
    if method == "rank":
        oof, test, held_out = _normalise_rows(oof), _normalise_rows(test), _normalise_rows(held_out)
    return {"method": method, "weights": weights, "in_sample": get_score(metric, y_true, oof),
            "held_out": get_score(metric, y_true, held_out), "oof": oof, "test": test}


def results_table(cfg: CFG, ensemble: dict | None = None) -> pd.DataFrame:
    """Every experiment of this competition under models/ (experiment, model, img_size,
    epochs, CV, CV mean ± std over folds, wall time), plus the ensemble's in-sample and
    held-out CV; written to models/results.csv."""
    root = cfg.exp_dir.parent
    rows = []
    for d in sorted(p for p in root.iterdir() if (p / "score.json").exists() and (p / "config.yaml").exists()):
        exp_cfg = load_saved_cfg(d)
        if (exp_cfg.competition_dir, exp_cfg.target_col, exp_cfg.task) != (cfg.competition_dir, cfg.target_col, cfg.task):
            continue
        score = json.loads((d / "score.json").read_text())
        cnn = exp_cfg.arch in ("timm", "hybrid")
        rows.append({"experiment": d.name, "model": exp_cfg.model_name if exp_cfg.arch == "timm" else exp_cfg.arch,
                     "img_size": exp_cfg.img_size if cnn else None, "epochs": exp_cfg.epochs if cnn else None,
                     "metric": score["metric"], "cv": score["cv"], "cv_mean": score["cv_mean"], "cv_std": score["cv_std"],
                     "wall_s": score.get("wall_s")})
    if ensemble is not None:
        for kind in ("in_sample", "held_out"):
            rows.append({"experiment": f"ensemble ({ensemble['method']}, {kind.replace('_', '-')})", "model": "ensemble",
                         "metric": cfg.metric, "cv": ensemble[kind]})
    table = pd.DataFrame(rows)
    atomic_to_csv(table, root / "results.csv")
    return table


def correlation(experiments: list[Experiment]) -> pd.DataFrame:
    """Pearson correlation of the experiments' OOF predictions (all classes flattened)."""
    return pd.DataFrame({e.name: e.oof.ravel() for e in experiments}).corr()


def positive_probability(cfg: CFG, sample: pd.DataFrame, classes: list | None) -> bool:
    """A binary task whose submission is one column holding the probability of the second
    (positive) class, not a label: the metric is ROC AUC, or sample_submission's column is
    float (Kaggle's binary competitions, scored on ranking)."""
    value_cols = [c for c in sample.columns if c != cfg.id_col]
    return (cfg.task == "classification" and classes is not None and len(classes) == 2 and len(value_cols) == 1
            and (cfg.metric == "roc_auc" or pd.api.types.is_float_dtype(sample[value_cols[0]])))


def make_submission(cfg: CFG, test_ids: pd.Series, test_pred: np.ndarray, classes: list | None) -> pd.DataFrame:
    """The submission in sample_submission's shape: same ids, order and columns, labels decoded
    (or one probability column per class when sample_submission has them, or the positive
    class's probability for a binary ROC AUC competition), no NaN."""
    sample = read_sample_submission(cfg)
    pred = pd.DataFrame(test_pred, index=test_ids.astype(str).to_numpy())
    missing = set(sample[cfg.id_col].astype(str)) - set(pred.index)
    if missing:
        raise ValueError(f"{cfg.sample_submission}: {len(missing)} id(s) have no prediction, e.g. {sorted(missing)[:3]}")
    pred = pred.loc[sample[cfg.id_col].astype(str)].to_numpy()
    sub = sample.copy()
    value_cols = [c for c in sample.columns if c != cfg.id_col]
    if cfg.task == "regression":
        sub[value_cols[0]] = pred[:, 0]
    elif positive_probability(cfg, sample, classes):
        sub[value_cols[0]] = pred[:, 1]
    elif classes is not None and len(value_cols) == len(classes) and set(map(str, value_cols)) == set(map(str, classes)):
        for c in value_cols:  # one probability column per class
            sub[c] = pred[:, [str(k) for k in classes].index(str(c))]
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
    solution = read_csv(path, [cfg.id_col, cfg.target_col], "solution")
    solution = solution[[cfg.id_col, cfg.target_col]].rename(columns={cfg.target_col: "__true"})
    merged = solution.merge(submission, on=cfg.id_col)
    if cfg.task == "regression":
        return get_score(cfg.metric, merged["__true"], merged[cfg.target_col])
    index = {str(c): i for i, c in enumerate(classes)}
    y_true = merged["__true"].astype(str).map(index).to_numpy()
    value_cols = [c for c in submission.columns if c != cfg.id_col]
    if positive_probability(cfg, submission, classes):
        p = merged[value_cols[0]].to_numpy(float)
        y_pred = np.column_stack([1 - p, p])
    elif cfg.target_col in submission.columns:
        y_pred = np.eye(len(classes))[merged[cfg.target_col].astype(str).map(index).to_numpy()]
    else:
        y_pred = merged[[str(c) for c in classes]].to_numpy(float)
    return get_score(cfg.metric, y_true, y_pred)


def validate_submission(cfg: CFG, sub: pd.DataFrame, classes: list | None) -> None:
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
    probability = positive_probability(cfg, sample, classes)
    for col in sub.columns.drop(cfg.id_col):
        values = sub[col]
        if probability and not (pd.api.types.is_numeric_dtype(values) and values.between(0, 1).all()):
            raise ValueError(f"submission column '{col}' must hold probabilities in [0, 1]")
        if cfg.task == "classification" and col == cfg.target_col and classes is not None and not probability:
            unknown = set(values.astype(str)) - set(map(str, classes))
            if unknown:
                raise ValueError(f"submission column '{col}' has labels not among the training classes: {sorted(unknown)[:5]}")
        elif not pd.api.types.is_numeric_dtype(values) or not np.isfinite(values.to_numpy(float)).all():
            raise ValueError(f"submission column '{col}' must hold finite numbers")


def write_submission(cfg: CFG, sub: pd.DataFrame, classes: list | None) -> list[Path]:
    """Validate, then write submissions/submission.csv (the name Kaggle expects) and a named
    copy (cfg.submission_name, or ensemble_<method>_<time> so that earlier ones are kept)."""
    validate_submission(cfg, sub, classes)
    out = under_root(cfg.submissions_dir)
    name = cfg.submission_name or f"ensemble_{cfg.ensemble_method}_{datetime.now():%Y%m%d_%H%M%S}"
    paths = [out / "submission.csv", out / f"{name}.csv"]
    for p in paths:
        atomic_to_csv(sub, p)
    return paths


def classes_of(cfg: CFG, train: pd.DataFrame) -> list | None:
    return get_classes(train, cfg) if cfg.task == "classification" else None
