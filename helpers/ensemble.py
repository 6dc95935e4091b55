"""Ensembling: collect the experiments under models/, weight them on OOF by hill climbing
(Caruana forward selection with replacement), judge the weights on held-out folds, the
results table and the OOF correlation matrix. The submission itself is helpers.submission's."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import artifacts, freshness
from .config import CFG
from .data import read_train
from .metrics import HIGHER_IS_BETTER, THRESHOLD_METRICS, cross_fitted, fit_thresholds, get_score, holdout_parts
from .results import finalize_experiment, with_refit
from .submission import classes_of, create_submission, local_lb, write_submission
from .tasks import task_of
from .utils import read_table


@dataclass
class Experiment:
    name: str
    oof: np.ndarray  # [n_train, n_cols] in the reference id order
    test: np.ndarray  # [n_test, n_cols] in the reference id order
    score: float


@dataclass
class Collection:
    experiments: list[Experiment]
    oof: pd.DataFrame  # id, target, fold of the OOF rows, in the order of every experiment's arrays
    y_true: np.ndarray  # class indices or values of those rows
    test_ids: pd.Series  # test ids, in the order of every experiment's test arrays


def collect_experiments(cfg: CFG, logger: logging.Logger | None = None, refits: set[str] | None = None) -> Collection:
    """The experiments the ensemble blends (helpers.freshness.blend_dirs: the config's CNNs and
    stackers, and the others asked for, made from the same data) with OOF and test predictions.
    Ids are aligned to the first experiment; a mismatch is an error naming the experiment, or,
    for one not of the config, a warning that leaves it out. The experiments named in `refits`
    have their refit's test predictions in theirs (`cfg.refit`, with_refit); their OOF rows,
    and so every score, are the folds' alone."""
    logger = logger or logging.getLogger("kaggle")
    skipped: dict = {}
    found = freshness.blend_dirs(cfg, skipped)
    if not any(freshness.is_member(cfg, d) for d in found):
        raise FileNotFoundError(f"no experiment {'of ' + ', '.join(cfg.members) + ' ' if cfg.members else ''}with oof.csv "
                                f"and test.csv for {cfg.competition_dir} under {artifacts.models_root(cfg)}")
    read = _readable(cfg, found, skipped, refits or set(), logger)
    found = list(read)
    shared = _shared_folds(cfg, {d.name: oof for d, (oof, _) in read.items()}, logger)
    experiments, ref_oof, ref_test, ref_y = [], None, None, None
    for d, (oof, test) in read.items():
        name = d.name
        if shared is not None:
            oof = oof[oof["fold"].isin(shared)].reset_index(drop=True)
        cols = [c for c in oof.columns if c.startswith("prob_")] or ["pred"]
        if ref_oof is None:
            ref_oof, ref_test, ref_cols = oof[[cfg.id_col, cfg.target_col, "fold"]].copy(), test[[cfg.id_col]].copy(), cols
        if cols != ref_cols:
            raise ValueError(f"experiment '{name}': prediction columns {cols} differ from {ref_cols}")
        try:
            oof = _align(oof, ref_oof[cfg.id_col], cfg.id_col, name, "oof.csv")
        except ValueError as e:
            if shared is None:
                raise
            raise ValueError(f"{e}: its folds {shared} hold other rows than '{found[0].name}''s (the folds were matched by "
                             f"number: made with another n_folds, seed or group column?)") from None
        test = _align(test, ref_test[cfg.id_col], cfg.id_col, name, "test.csv")
        test_pred = test[cols].to_numpy(float)
        artifacts.finite_or_raise(oof[cols], f"experiment '{name}': {d / 'oof.csv'}")
        artifacts.finite_or_raise(test_pred, f"experiment '{name}': {d / 'test.csv'}")
        if name in (refits or set()):
            refit = _align(read_table(d / "test_refit.csv", cfg.id_col), ref_test[cfg.id_col], cfg.id_col, name, "test_refit.csv")
            artifacts.finite_or_raise(refit[cols], f"experiment '{name}': {d / 'test_refit.csv'}")
            test_pred = with_refit(test_pred, refit[cols].to_numpy(float), cfg.refit)
            logger.info(f"experiment '{name}': test predictions {'from its refit alone' if cfg.refit == 'alone' else 'blended with its refit'}")
        if (oof["fold"].to_numpy() != ref_oof["fold"].to_numpy()).any():
            logger.warning(f"experiment '{name}' used other folds than '{found[0].name}': its held-out scores are optimistic")
        task = task_of(cfg)
        y_true, y_pred = task.oof_targets(cfg, oof)
        weights = task.label_weights(cfg, [c[len("prob_"):] for c in cols])
        experiments.append(Experiment(name, y_pred.reshape(len(oof), -1), test_pred,
                                      get_score(cfg.metric, y_true, y_pred, weights=weights)))
        ref_y = y_true if ref_y is None else ref_y  # rows are aligned: every experiment's y_true is the same
    return Collection(experiments, ref_oof, ref_y, ref_test[cfg.id_col])


def _readable(cfg: CFG, found: list[Path], skipped: dict, refits: set[str], logger: logging.Logger) -> dict:
    """{folder: (oof, test)} of the experiments blended; those left out are said, with why."""
    read = {d: artifacts.read_experiment(d, cfg) for d in found}
    skipped.update(_rows_that_do_not_fit(cfg, read))
    for name, why in skipped.items():
        logger.warning(f"experiment '{name}' (blend_others) is not blended: {why}")
    for d, why in _judged_on_other_models(cfg, found, refits).items():
        logger.warning(f"experiment '{d.name}' is not blended: {why}")
        read.pop(d)
    return {d: r for d, r in read.items() if d.name not in skipped}


def _judged_on_other_models(cfg: CFG, found: list[Path], refits: set[str]) -> dict[Path, str]:
    """{folder: why} of the stackers of a CNN whose test predictions are its refit's alone: the
    OOF rows that would weigh the two are the fold models', the stacker's test predictions too,
    the CNN's are a stronger model's. On the fine-tuning benchmark (300 s, one holdout fold of 3
    epochs, a refit of 6) the refit alone scored 0.969 on the test set, the blend that gave the
    stacker half the weight on fold 0's rows 0.922."""
    if cfg.refit != "alone":
        return {}
    out = {}
    for d in found:
        manifest = artifacts.read_stacker_manifest(d)
        if manifest and manifest["source"] in refits:
            out[d] = (f"the test predictions of its CNN '{manifest['source']}' are its refit's alone (refit: alone), its own "
                      f"come from the fold models: the OOF rows would weigh the refit as a fold model")
    return out


def _rows_that_do_not_fit(cfg: CFG, read: dict) -> dict:
    """{name: why} of the experiments not of the config whose OOF rows (ids and folds) or test
    ids are not those of the config's first experiment."""
    def rows(oof: pd.DataFrame, test: pd.DataFrame) -> tuple[set, set]:
        return set(zip(oof[cfg.id_col].astype(str), oof["fold"])), set(test[cfg.id_col].astype(str))

    members = [d for d in read if freshness.is_member(cfg, d)]
    ref_oof, ref_test = rows(*read[members[0]])
    out = {}
    for d, (oof, test) in read.items():
        if d not in members:
            have_oof, have_test = rows(oof, test)
            if have_oof != ref_oof or have_test != ref_test:
                out[d.name] = (f"its {'OOF rows (ids and folds)' if have_oof != ref_oof else 'test ids'} are not those of "
                               f"'{members[0].name}' ({len(have_oof ^ ref_oof) or len(have_test ^ ref_test)} differ)")
    return out


def _shared_folds(cfg: CFG, oofs: dict[str, pd.DataFrame], logger: logging.Logger) -> list | None:
    """The folds every experiment has OOF rows of, when their folds differ (an earlier run's 5
    folds beside a time_limit run's holdout fold): the blend is weighed on those folds' rows,
    and the log says which experiment has which folds. None when every experiment has the same
    folds; no fold shared is an error naming them."""
    folds = {name: sorted(pd.unique(oof["fold"]).tolist()) for name, oof in oofs.items()}
    shared = sorted(set.intersection(*(set(f) for f in folds.values())))
    if all(f == shared for f in folds.values()):
        return None
    told = "; ".join(f"'{name}': folds {f}" for name, f in folds.items())
    if not shared:
        raise ValueError(f"the experiments' OOF predictions share no fold, so no blend can be judged ({told}): "
                         f"train them on the same folds, or move the others out of {artifacts.models_root(cfg)}")
    logger.warning(f"the experiments' OOF predictions cover different folds ({told}): the blend is weighed on "
                   f"the rows of folds {shared}, which they all have")
    return shared


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


def hill_climb(preds: list[np.ndarray], y_true: np.ndarray, metric: str, iters: int = 50,
               weights: np.ndarray | None = None) -> np.ndarray:
    """Caruana's ensemble selection: start from the best model, then repeatedly add (with
    replacement) the model that most improves the blend; weights are the selection counts.
    Never worse in sample than the best single model."""
    sign = 1 if HIGHER_IS_BETTER[metric] else -1
    singles = [sign * get_score(metric, y_true, p, weights=weights) for p in preds]
    counts = np.zeros(len(preds))
    counts[int(np.argmax(singles))] = 1
    best = max(singles)
    for _ in range(iters):
        trials = [sign * get_score(metric, y_true, blend(preds, counts + np.eye(len(preds))[i]), weights=weights)
                  for i in range(len(preds))]
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


def normalise_rows(pred: np.ndarray) -> np.ndarray:
    return pred / np.clip(pred.sum(1, keepdims=True), 1e-12, None) if pred.shape[1] > 1 else pred


def fit_ensemble(experiments: list[Experiment], y_true: np.ndarray, folds: np.ndarray, metric: str,
                 method: str = "hill", iters: int = 50, label_weights: np.ndarray | None = None) -> dict:
    """Blend the experiments' OOF and test predictions.

    'hill': weights by hill climbing on all OOF rows (the in-sample score), and judged honestly:
    for each fold, weights fitted on the other folds score that fold (the held-out score; rows
    of one fold only: parts of it, holdout_parts).
    'mean': equal weights. 'rank': equal-weight average of per-column ranks.
    Multi-label: the held-out score also uses thresholds tuned on the other folds, and the
    thresholds tuned on every OOF row come back for the test set ('thresholds').
    Returns weights, in_sample, held_out, oof and test (the blended predictions)."""
    multilabel = np.asarray(y_true).ndim == 2
    oofs, tests = [e.oof for e in experiments], [e.test for e in experiments]
    if method == "hill" and len(np.unique(folds)) < 2:
        folds = holdout_parts(y_true, len(folds))
    if method == "rank":
        oofs = [rank_transform(p) for p in oofs]
        tests = [rank_transform(p) for p in tests]
    if method == "hill":
        weights = hill_climb(oofs, y_true, metric, iters, label_weights)
        held_out = np.zeros_like(oofs[0])
        for k in np.unique(folds):
            trn, val = folds != k, folds == k
            w = hill_climb([p[trn] for p in oofs], y_true[trn], metric, iters, label_weights)
            held_out[val] = blend([p[val] for p in oofs], w)
    else:
        weights = np.full(len(oofs), 1.0 / len(oofs))
        held_out = blend(oofs, weights)  # nothing is fitted: in-sample is held-out
    oof, test = blend(oofs, weights), blend(tests, weights)
    if method == "rank" and not multilabel:
        oof, test, held_out = normalise_rows(oof), normalise_rows(test), normalise_rows(held_out)
    result = {"method": method, "weights": weights, "in_sample": get_score(metric, y_true, oof, weights=label_weights),
              "held_out": get_score(metric, y_true, held_out, weights=label_weights), "oof": oof, "test": test}
    if multilabel:
        result["held_out"] = cross_fitted(metric, y_true, held_out, folds, label_weights)[0]
        result["thresholds"] = fit_thresholds(metric, y_true, oof)
    return result


def results_table(cfg: CFG, ensemble: dict | None = None, refits: set | None = None) -> pd.DataFrame:
    """Every experiment the ensemble blends (blend_dirs: experiment, model, where its weights came
    from, img_size, the epochs its folds really trained (mean) and its refit's, CV, CV mean ± std
    over folds, the training time of folds and refit), plus the ensemble's in-sample and held-out
    CV; written to models/results.csv."""
    rows = []
    for d in freshness.blend_dirs(cfg):
        score = artifacts.read_score(d)
        refit = d / artifacts.REFIT / "metrics.jsonl"  # the blended refit's epochs and time, beside its folds'
        blended = refit.exists() and (refits is None or d.name in refits)  # not an earlier run's, left on disk
        refit_rows = [json.loads(line) for line in refit.read_text().splitlines()] if blended else []
        wall = score.get("wall_s")
        rows.append({"experiment": d.name, "model": score.get("model"), "weights": score.get("weights"),
                     "img_size": score.get("img_size"), "epochs": score.get("epochs"),
                     "refit_epochs": len(refit_rows) or None, "metric": score["metric"], "cv": score["cv"],
                     "cv_mean": score["cv_mean"], "cv_std": score["cv_std"],
                     "wall_s": None if wall is None else round(wall + sum(r.get("time_s", 0.0) for r in refit_rows), 1)})
    if ensemble is not None:
        for kind in ("in_sample", "held_out"):
            rows.append({"experiment": f"ensemble ({ensemble['method']}, {kind.replace('_', '-')})", "model": "ensemble",
                         "metric": cfg.metric, "cv": ensemble[kind]})
    table = pd.DataFrame(rows)
    artifacts.write_results(cfg, table)
    return table


def correlation(experiments: list[Experiment]) -> pd.DataFrame:
    """Pearson correlation of the experiments' OOF predictions (all classes flattened)."""
    return pd.DataFrame({e.name: e.oof.ravel() for e in experiments}).corr()


def unfinished(members: list[CFG]) -> list[str]:
    """What keeps each experiment of the config out of the ensemble: folds not trained (or
    out of date), stacking not done, each with the command that does it."""
    problems = []
    for m in members:
        with freshness.decision():
            waiting = [k for k in m.fold_ids if freshness.stale(m, "train", k) or freshness.stale(m, "test", k)]
        if waiting and m.features_from == "folds":
            problems.append(f"experiment '{m.experiment}': folds {waiting} of {m.fold_ids} are not trained (or out of date); "
                            f"train them: python -m helpers.pipeline --config <config> --experiments {m.experiment} "
                            f"--stages 02_train --set folds={waiting} (or ensemble fewer folds with folds=[...])")
        if artifacts.refit_on(m) and not waiting and not m.time_limit and (
                why := freshness.stale(m, "refit") or freshness.stale(m, "refit_test")):
            problems.append(f"experiment '{m.experiment}': its refit (refit: {m.refit}) is not up to date ({why}); train it: "
                            f"python -m helpers.pipeline --config <config> --experiments {m.experiment} --stages 02_train "
                            f"(or set refit off)")
        stacker = artifacts.exp_dir(artifacts.stack_cfg(m))
        made = (stacker / "score.json").exists()
        if (made or m.features_from == "pretrained") and (why := freshness.stale(m, "stacking")):
            problems.append(f"experiment '{m.experiment}': its stacker {stacker.name} is "
                            f"{'out of date (' + why + ')' if made else 'not made'}; run 03_features and 04_stacking for it"
                            + (f" or delete {stacker}" if made else ""))
    return problems


def run_ensemble(cfg: CFG, logger: logging.Logger | None = None, members: list[CFG] | None = None) -> dict:
    """05_ensemble's work: collect, blend (cfg.ensemble_method), the results table, the
    submission (checked, then written) and its local LB score, the ensemble's score.json.
    `members`, the config's experiments, must be finished first (an error says what is
    missing and how to make it). Returns what the notebook shows: collection, result,
    weights, results, correlation, submission, local_lb, paths."""
    logger = logger or logging.getLogger("kaggle")
    members = members or [cfg]
    for m in members:
        if m.features_from == "folds":
            finalize_experiment(m, logger)  # the experiment's OOF once its folds are done (kept if up to date)
    problems = unfinished(members)
    if problems:
        raise RuntimeError("the ensemble needs every experiment of the config finished:\n  " + "\n  ".join(problems))
    with freshness.build(cfg, "ensemble"):
        made = _blend_and_submit(cfg, blended_refits(members, logger), logger)
    result, lb = made["result"], made["local_lb"]
    logger.info(f"ensemble ({result['method']}): {cfg.metric} {result['in_sample']:.5f} in-sample, "
                f"{result['held_out']:.5f} held-out; wrote {made['paths'][0]}" + (f"; local LB {lb:.5f}" if lb is not None else ""))
    return made


def blended_refits(members: list[CFG], logger: logging.Logger) -> set[str]:
    """The experiments whose refit (the model on all rows) is up to date, so blended into their
    test predictions; a time-limited run may have left one out (it says so)."""
    refits = set()
    for m in members:
        if artifacts.refit_on(m):
            why = freshness.stale(m, "refit") or freshness.stale(m, "refit_test")
            if why is None:
                refits.add(artifacts.exp_dir(m).name)
            else:  # time_limit only (unfinished() stops the others): the budget left it out
                logger.warning(f"experiment '{m.experiment}': its refit is not in the blend ({why}): "
                               f"the time limit left too little for it; its folds alone")
    return refits


def _blend_and_submit(cfg: CFG, refits: set[str], logger: logging.Logger) -> dict:
    """The blend of every experiment, its results table, the submission and the ensemble's score."""
    collection = collect_experiments(cfg, logger, refits)
    experiments = collection.experiments
    classes = classes_of(cfg, read_train(cfg))
    method, trained = cfg.ensemble_method, np.unique(collection.oof["fold"]).tolist()
    tuned = [what for what, fitted in (("hill climbing's weights", method == "hill"),
                                        ("the labels' thresholds", task_of(cfg).uses_thresholds and cfg.metric in THRESHOLD_METRICS)) if fitted]
    one_fold = bool(tuned) and len(trained) < 2  # `folds: [0]`, or time_limit's holdout
    if one_fold:
        parts = len(np.unique(holdout_parts(collection.y_true, len(collection.oof))))
        logger.info(f"ensemble: the OOF rows come from fold {trained} only: {' and '.join(tuned)} are judged on "
                    f"{parts} parts of its {len(collection.oof)} rows")
    result = fit_ensemble(experiments, collection.y_true, collection.oof["fold"].to_numpy(), cfg.metric,
                          method, cfg.ensemble_iters,
                          task_of(cfg).label_weights(cfg, classes))
    weights = pd.DataFrame({"experiment": [e.name for e in experiments], "cv": [e.score for e in experiments],
                            "weight": result["weights"]})
    results = results_table(cfg, result, set(refits))
    thresholds = result.get("thresholds")
    submission = create_submission(cfg, collection.test_ids, result["test"], classes, thresholds)
    paths = write_submission(cfg, submission, classes)
    lb = local_lb(cfg, submission, classes)
    artifacts.write_ensemble_score(cfg, {"metric": cfg.metric, "method": result["method"], "in_sample": result["in_sample"],
                                         "held_out": result["held_out"], "local_lb": lb,
                                         **({"held_out_on": f"{parts} parts of fold {trained[0]}"} if one_fold else {}),
                                         "weights": dict(zip(weights["experiment"], weights["weight"])),
                                         "refit": {name: cfg.refit for name in sorted(refits)},  # their test predictions
                                         **({"thresholds": dict(zip(map(str, classes), map(float, thresholds)))}
                                            if thresholds is not None else {}),
                                         "submission": str(paths[0])})
    return {"collection": collection, "result": result, "weights": weights, "results": results,
            "correlation": correlation(experiments), "submission": submission, "local_lb": lb, "paths": paths}
