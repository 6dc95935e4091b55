"""The plan of a time-limited run, made once before the first fold: a probe of each model (its
training and inference images/s on this machine, in the precision training uses, and its
stacker's cost), then the folds, image size and batch that fit the budget. While some
experiment's folds would get fewer than MIN_EPOCHS epochs, it trains fewer folds (down to
three), then one holdout fold and a refit on all rows, then halves the image size (down to 32
px), and says so: each model left gets more epochs, and from scratch the epochs and the rows
matter most. Folds that fit MIN_EPOCHS but not WELL_TRAINED also become a holdout and a refit:
on the recipe benchmark's test set, 3 folds of 23 epochs blended scored 0.963, one model of 31
epochs on every row 0.978 (AutoGluon, likewise, holds out instead of bagging on a short
budget). Folds you set (`folds`) are trained as set. The plan is kept in the ledger
(helpers.budget), so a restarted run, or the next run with the same settings, keeps it. A
budget too short after every cut says so, with the time that would do.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import lightgbm as lgb
import numpy as np
import torch

from . import artifacts
from .budget import (HOLDOUT_REFIT, NOTEBOOK_S, _epoch_s, _pretrained, _start_up, holdout, min_epochs, notebook_s,
                     read_ledger, refit_cost, refit_weight, spent_s, write_ledger)
from .config import CFG
from .models import create_model, model_problems, stem_changes
from .runtime import autocast, channels_last, get_device, precision
from .stacking import LGBM_DEFAULTS
from .stages import EMBED, STAGES
from .tasks import task_of

# fewer epochs per fold than this: one holdout fold and a refit on all rows instead of a fold
# ensemble (on the recipe benchmark, 3 folds of 23 epochs scored 0.963 on its test set, one
# model of 31 epochs on every row 0.978: a model from scratch gains from rows and epochs up to
# 40-50 epochs, more than from an ensemble of undertrained folds). Fine-tuned pretrained weights
# are near their best after 6 (budget.MIN_EPOCHS); from 3 to 6 a holdout and a refit
WELL_TRAINED = {"pretrained": 6, "scratch": 40}


MIN_IMG_SIZE = 32


MAX_BATCH = 256  # halving the image size doubles the batch up to this


MIN_FOLDS = 2  # without a holdout (features_from other than folds), folds are dropped down to this after the image size


FEW_FOLDS = 3  # folds are dropped down to this before the image size is halved


STACK_FOLD_S = 7.5  # a stacker per fold, where stack_fold_s measures none (38 s for 5 LightGBM folds of 10 classes on the 2-core CPU)


# boosting rounds of a fold's LightGBM stacker, its early-stopped fit and its refit together, at
# the cost of a round on random features (stack_fold_s): on the 2-core CPU the demo's folds took
# 4.2-4.5 s (foretold 4.6) and the recipe benchmark's 2.7 s (foretold 6)
STACK_ROUNDS = 120


STACK_PROBE_ROWS = 5000  # a bigger fold is timed on this many rows and scaled


def after_work(cfgs: list[CFG], rates: dict, rows: tuple[int, int]) -> dict[str, float]:
    """Estimated seconds of work, a notebook's start aside, of each stage after training (the
    stage graph's), under the ledger's key of its output: each fold model embeds its OOF rows
    and the test set (03_features), a LightGBM head per fold (04_stacking), the blend (05_ensemble:
    too little to count)."""
    n_train, n_test = rows
    work = {}
    for stage in (s for s in STAGES if s.after_training):
        if stage.scope == "run":
            work[stage.name] = 0.0
            continue
        for cfg in cfgs:
            rate = rates.get(cfg.experiment, {})
            folds = len(cfg.fold_ids)
            embed = (n_train + folds * n_test) / rate.get("embed_img_s", rate.get("infer_img_s", 500.0))
            work[f"{cfg.experiment}/{stage.name}"] = embed if stage.name == EMBED else rate.get("stack_fold_s", STACK_FOLD_S) * folds
    return work


def after_training_s(cfgs: list[CFG], rates: dict, rows: tuple[int, int], notebook: float = NOTEBOOK_S) -> float:
    """Estimated seconds of 03_features, 04_stacking and 05_ensemble, `notebook` seconds of
    start each included (03_features: and the start-up a training process pays, later_s)."""
    start_up = _start_up(rates)
    return sum(w + notebook + (start_up if k.endswith(f"/{EMBED}") else 0.0) for k, w in after_work(cfgs, rates, rows).items())


def stack_fold_s(cfg: CFG, n_train: int, n_out: int, width: int) -> float:
    """Seconds of one fold's stacker on this machine. LightGBM: a fit of 2 rounds and one of 12
    at the stacker's settings, on random features of the fold's shape (its training rows, the
    embeddings' width or stack_pca, the metadata columns) and its number of classes, give the
    cost of a round and of binning the data; a fold bins twice (the early-stopped fit, then
    the refit on all its rows) and runs about STACK_ROUNDS rounds; a multi-label target fits
    one model per label. A constant STACK_FOLD_S tuned on 2 cores would be 4 times too long on
    a 16-core GPU machine and far too short for 50,000 rows. The scikit-learn heads: STACK_FOLD_S."""
    if cfg.stacker != "lgbm" or width <= 0 or n_train < 2:
        return STACK_FOLD_S


    rows = max(2, n_train * (cfg.n_folds - 1) // max(cfg.n_folds, 1))
    n = min(rows, STACK_PROBE_ROWS)
    features = (min(cfg.stack_pca, width) if cfg.stack_pca else width) + len(cfg.metadata_cols)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, features)).astype(np.float32)
    task = task_of(cfg)
    y = np.arange(n) % task.stacker_classes(n_out) if task.stacker_classifies else rng.normal(size=n)
    params = {**LGBM_DEFAULTS, "verbose": -1, "n_jobs": max(torch.get_num_threads(), 1), **cfg.lgbm_params}
    params.pop("early_stopping_round", None)
    create = lgb.LGBMClassifier if task.stacker_classifies else lgb.LGBMRegressor

    def fit(rounds: int) -> float:
        start = time.perf_counter()
        create(**{**params, "n_estimators": rounds}).fit(X, y)
        return time.perf_counter() - start

    few, more = min(fit(2), fit(2)), min(fit(12), fit(12))  # the faster of two: a stall of a loaded machine is not the cost
    per_round = max(more - few, 0.0) / 10
    binning = max(few - 2 * per_round, 0.0)
    return round(task.stacker_fits(n_out) * (2 * binning + STACK_ROUNDS * per_round) * rows / n, 3)


# --- the plan before training -------------------------------------------------------------------
def probe(cfg: CFG, n_out: int, steps: int = 3) -> dict:
    """Training and inference images/s of the experiment's model at its image size on this
    machine, in the precision training uses (a few steps on random images; PIPELINE covers
    the data pipeline)."""


    device = get_device(cfg.device)
    rates = _measure(cfg, n_out, device, steps)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the runner keeps no GPU memory from the folds' processes
    return rates


def _measure(cfg: CFG, n_out: int, device, steps: int) -> dict:


    begin = time.perf_counter()  # the start a training process pays once: CUDA's context, cuDNN's autotuning
    model = create_model(dataclasses.replace(cfg, pretrained=False, pretrained_path=""), n_out).to(device)
    x = torch.randn(cfg.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    if channels_last(cfg, device):  # the memory format training uses (on an H200, bf16 NCHW ran at half its speed)
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with autocast(cfg, device):  # the precision training runs in (bf16/fp16 on a GPU)
            loss = model(x).float().logsumexp(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def median_s(run) -> float:
        """The median of `steps` timed calls: one slowed by another process (on 2 cores, a
        second Python importing torch made a probe foretell a fifth of the real pace, and the
        plan halved the image size) does not set the pace."""
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    step()  # warm-up
    sync()
    start_s = time.perf_counter() - begin
    train = cfg.batch_size / median_s(step)
    model.eval()

    def infer_rate(bf16: bool) -> float:
        with torch.no_grad(), autocast(cfg, device, bf16=bf16):
            model(x)
            sync()
            return cfg.batch_size / median_s(lambda: model(x)) / max(1, 1 + len(cfg.tta))

    infer = infer_rate(True)  # validation and test predictions, in training's precision
    # the stackers' embeddings are never bf16 (runtime.autocast): fp32 there, slower on a bf16 CPU
    embed = infer_rate(False) if precision(cfg.amp_dtype, device)[0] is torch.bfloat16 else infer
    return {"train_img_s": train, "infer_img_s": infer, "embed_img_s": embed, "img_size": cfg.img_size,
            "start_s": round(start_s, 2), "num_features": int(getattr(model, "num_features", 0))}


def plan_run(cfgs: list[CFG], rows: tuple[int, int], n_outs: list[int], logger: logging.Logger | None = None) -> dict:
    """The run's plan, made once per settings and kept in the ledger: {'img_size': {exp: px},
    'folds': {exp: [...]}, 'batch_size', 'refit', 'notes': [...], 'expected_epochs': {exp: n}},
    from a probe of each model. While some experiment's folds would get fewer than MIN_EPOCHS
    epochs, the worst one trains one fold fewer (to FEW_FOLDS), then every experiment trains
    one holdout fold and a refit (_holdout), then the worst one's image size is halved (to
    MIN_IMG_SIZE at least). Folds that fit MIN_EPOCHS but not WELL_TRAINED become a holdout and
    a refit too. Without a holdout (stackers on a frozen backbone's embeddings) the worst trains
    one fold fewer again after the image size (to MIN_FOLDS at least). Folds you set (`folds`)
    are yours: neither dropped nor held out, only the image size is halved (apply_plan would
    not drop them either, so the plan does not count on it)."""
    logger = logger or logging.getLogger("kaggle")
    ledger = read_ledger(cfgs[0])
    ledger["rows"] = list(rows)
    if ledger.get("plan"):
        write_ledger(cfgs[0], ledger)
        return ledger["plan"]
    planner = _Planner(_probe_all(cfgs, rows, n_outs), rows, ledger["limit_s"] - spent_s(ledger), ledger.get("kernels", "per_job"),
                       notebook_s(ledger), max(1, int(ledger.get("parallel", 1))), n_outs)
    trials, notes = list(cfgs), []
    may_drop = not any(c.folds for c in cfgs)  # folds the user set are trained as set
    may_holdout = may_drop and all(c.features_from == "folds" and len(c.fold_ids) > 1 for c in cfgs)
    while (cut := _next_cut(planner, trials, may_drop, may_holdout)) is not None:
        trials, note = cut
        notes.append(note)
        logger.warning(f"time_limit: {note}")
    splits = planner.split(trials)
    short = _too_short(planner, trials, splits, ledger["limit_s"])
    if short:
        notes.append(short)
        logger.warning(f"time_limit {cfgs[0].time_limit} is {short}")
    holdouts = {c.experiment for c in trials if holdout(c)}
    plan = {"img_size": {c.experiment: c.img_size for c in trials}, "folds": {c.experiment: c.fold_ids for c in trials},
            "batch_size": {c.experiment: c.batch_size for c in trials},
            "min_feature_map": {c.experiment: c.min_feature_map for c in trials}, "refit": {c.experiment: c.refit for c in trials},
            "notes": notes, "expected_epochs": {k: round(v[0], 1) for k, v in splits.items()},
            "refit_epochs": {k: round(v[1], 1) for k, v in splits.items() if k in holdouts}}
    ledger.update(plan=plan, rates=planner.rates, after_s=round(after_training_s(trials, planner.rates, rows, planner.notebook), 1),
                  after_work={k: round(v, 2) for k, v in after_work(trials, planner.rates, rows).items()})
    write_ledger(cfgs[0], ledger)
    logger.info(f"time_limit {cfgs[0].time_limit} ({ledger['limit_s']:.0f}s, {planner.left:.0f}s left): "
                + "; ".join(f"{c.experiment} ({_wants(c)}): {c.img_size} px, folds {c.fold_ids}, about "
                            f"{min(splits[c.experiment][0], c.epochs):.1f} epochs per fold"
                            + (f" and {min(plan['refit_epochs'][c.experiment], c.epochs):.1f} for its refit" if holdout(c) else "")
                            for c in trials)
                + f"; {ledger['after_s']:.0f}s kept for features, stacking and the ensemble")
    return plan


def _wants(cfg: CFG) -> str:
    """What the plan gave the model's epochs for: fine-tuning wants far fewer than from scratch."""
    return (f"{'fine-tuning pretrained weights' if _pretrained(cfg) else 'from scratch'}: {min_epochs(cfg)} epochs at least, "
            f"{well_trained(cfg)} for a fold ensemble")


def _probe_all(cfgs: list[CFG], rows: tuple[int, int], n_outs: list[int]) -> dict:
    """Each experiment's probe, with its stacker's cost per fold on this machine (the image size
    changes it not)."""
    rates = {c.experiment: probe(c, n_out) for c, n_out in zip(cfgs, n_outs)}
    for c, n_out in zip(cfgs, n_outs):
        rates[c.experiment]["stack_fold_s"] = stack_fold_s(c, rows[0], n_out, rates[c.experiment].get("num_features", 0))
    return rates


@dataclasses.dataclass
class _Planner:
    """What the plan is made from: the probes' rates, the rows, the time left, how notebooks run."""

    rates: dict
    rows: tuple[int, int]
    left: float
    kernels: str
    notebook: float
    parallel: int
    n_outs: list[int]

    def split(self, trials: list[CFG], extra: float = 0.0) -> dict:
        """{exp: (its folds' epochs, its refit's)} with `extra` seconds more."""
        return {c.experiment: holdout_split(c, _epochs_that_fit(trials, self.rates, self.rows, self.left + extra, c.experiment,
                                                                self.kernels, self.notebook, self.parallel)) for c in trials}

    def fits(self, trials: list[CFG], extra: float = 0.0) -> dict:
        return {k: v[0] for k, v in self.split(trials, extra).items()}

    def coarser_stem(self, trials: list[CFG], i: int) -> tuple[list[CFG], str] | None:
        """The i-th experiment with one stride of its small-image stem given back (min_feature_map
        halved until its stem changes: the max-pool back, then the first convolution's stride 2;
        a quarter of the compute each), probed again; None where its stem is timm's."""
        worst = trials[i]
        now, fewer = stem_changes(worst), worst.min_feature_map
        while fewer and stem_changes(dataclasses.replace(worst, min_feature_map=fewer)) == now:
            fewer //= 2
        if not now:
            return None
        if not stem_changes(dataclasses.replace(worst, min_feature_map=fewer)):
            fewer = 0  # timm's stem, for good: a halved image later does not take the strides again
        trials = list(trials)
        trials[i] = dataclasses.replace(worst, min_feature_map=fewer)
        self.rates[worst.experiment] = {**self.rates[worst.experiment], **probe(trials[i], self.n_outs[i]),
                                        "start_s": self.rates[worst.experiment].get("start_s", 0.0)}
        stem = ", ".join(stem_changes(trials[i])) or "timm's own"
        return trials, f"min_feature_map {worst.min_feature_map} -> {fewer} (its stem: {stem})"

    def halve(self, trials: list[CFG], i: int) -> tuple[list[CFG], str] | None:
        """The i-th experiment at half its image size (twice its batch), probed again; None
        below MIN_IMG_SIZE or where the model cannot take it."""
        worst = trials[i]
        if worst.img_size // 2 < MIN_IMG_SIZE or model_problems(dataclasses.replace(worst, img_size=worst.img_size // 2)):
            return None
        # a quarter of the pixels: twice the batch (the same memory) keeps the device busy; on 2 CPU
        # threads resnet18 at 32 px runs 402 img/s in batches of 32, 656 in 64, 890 in 128
        batch = min(MAX_BATCH, worst.batch_size * 2) if worst.batch_size < MAX_BATCH else worst.batch_size
        trials = list(trials)
        trials[i] = dataclasses.replace(worst, img_size=worst.img_size // 2, batch_size=batch)
        # the start-up stays the first probe's: CUDA's context is up in this process by now
        self.rates[worst.experiment] = {**self.rates[worst.experiment], **probe(trials[i], self.n_outs[i]),
                                        "start_s": self.rates[worst.experiment].get("start_s", 0.0)}
        return trials, f"img_size {worst.img_size} -> {trials[i].img_size} px" + (
            f", batch_size {worst.batch_size} -> {batch}" if batch != worst.batch_size else "")


def _next_cut(planner: _Planner, trials: list[CFG], may_drop: bool, may_holdout: bool) -> tuple[list[CFG], str] | None:
    """The next cut and its note (fewer folds, a holdout, half the image size), or None when
    every model fits or nothing is left to cut."""
    fits = planner.fits(trials)
    # the worst: the furthest below its own need (from scratch needs more epochs than pretrained)
    i = min(range(len(trials)), key=lambda j: fits[trials[j].experiment] / min_epochs(trials[j]))
    worst = trials[i]
    if fits[worst.experiment] >= min_epochs(worst):
        under = [c for c in trials if fits[c.experiment] < well_trained(c)]
        if not under:
            return None
        c = under[0]
        why = (f"({c.experiment}: about {fits[c.experiment]:.1f} epochs per fold fit, under the {well_trained(c)} "
               f"a model from {'pretrained weights' if _pretrained(c) else 'scratch'} wants)")
        if may_holdout and len(worst.fold_ids) > 1:
            trials, change = _holdout(trials)
            return trials, f"{change} {why}"
        # epochs before a small-image stem's map (presets.SMALL_IMAGES): in 300 s on the 2-core CPU a
        # plain loop's ResNet-18 on 28 px digits scored 0.905 with timm's stem (49 epochs), 0.853
        # without the max-pool (20)
        coarser = planner.coarser_stem(trials, trials.index(c))
        return (coarser[0], f"{c.experiment}: {coarser[1]} {why}") if coarser else None
    if may_drop and len(worst.fold_ids) > FEW_FOLDS:
        trials, change = _one_fold_fewer(trials, worst)
    elif may_holdout and len(worst.fold_ids) > 1:
        trials, change = _holdout(trials)
    elif (coarser := planner.coarser_stem(trials, i)) is not None:  # before halving: at 32 px a small-image
        trials, change = coarser  # stem costs what it costs at 64 px, so halving alone would save nothing
    elif (halved := planner.halve(trials, i)) is not None:
        trials, change = halved
    elif may_drop and len(worst.fold_ids) > MIN_FOLDS:
        trials, change = _one_fold_fewer(trials, worst)
    else:
        return None
    return trials, f"{worst.experiment}: {change} (about {fits[worst.experiment]:.1f} epochs per fold fit before)"


def _too_short(planner: _Planner, trials: list[CFG], splits: dict, limit_s: float) -> str | None:
    """With nothing left to cut: what it costs and what would do (for the model that needs the most)."""
    fits = {k: v[0] for k, v in splits.items()}
    short = [c for c in trials if fits[c.experiment] < min_epochs(c)]
    if not short:
        return None
    needs = {c.experiment: _time_for(lambda extra, c=c: planner.fits(trials, extra)[c.experiment], min_epochs(c)) for c in short}
    c = max(short, key=lambda c: needs[c.experiment])
    return (f"too short: {c.experiment} gets about {fits[c.experiment]:.1f} epochs per model, under the "
            f"{min_epochs(c)} it needs; expect weak predictions (about {limit_s + needs[c.experiment]:.0f}s would give it "
            f"{min_epochs(c)}; a notebook's start here takes about {planner.notebook:.0f}s)")


def holdout_split(cfg: CFG, epochs: float) -> tuple[float, float]:
    """(the fold's epochs, the refit's) from the fold's `epochs` at refit_weight's weights. In a
    holdout plan the fold gets what a CV score needs (min_epochs) when an even split of the
    experiment's time would give it that, and HOLDOUT_REFIT times less than the refit at least;
    the refit (the submission's model) gets the rest. Elsewhere the refit trains the folds' epochs."""
    if not holdout(cfg):
        return epochs, epochs
    w = refit_cost(cfg.n_folds)
    even = epochs * (1 + HOLDOUT_REFIT * w) / (1 + w)  # each model's epochs, were the time split evenly
    fold = max(epochs, min(even, min_epochs(cfg)))
    return fold, (even * (1 + w) - fold) / w


def _time_for(epochs_with, needed: float) -> float:
    """The extra seconds that give `needed` epochs, where epochs_with(extra) grows linearly with
    the extra time once it is above zero."""
    lo, hi = 1e6, 2e6  # far above zero: on the line
    slope = (epochs_with(hi) - epochs_with(lo)) / (hi - lo)
    return max(0.0, lo + (needed - epochs_with(lo)) / slope) if slope > 0 else float("inf")


def _one_fold_fewer(trials: list[CFG], worst: CFG) -> tuple[list[CFG], str]:
    """Every experiment drops the same fold: the ensemble weighs them on the OOF rows they share."""
    keep = len(worst.fold_ids) - 1
    trials = [dataclasses.replace(t, folds=t.fold_ids[:keep]) if len(t.fold_ids) > keep else t for t in trials]
    return trials, f"folds {worst.fold_ids} -> {worst.fold_ids[:keep]}" + (" (every experiment)" if len(trials) > 1 else "")


def _holdout(trials: list[CFG]) -> tuple[list[CFG], str]:
    """Every experiment trains its first fold (the CV score, the ensemble's OOF rows) and a refit
    on all rows that predicts the test set alone (or as `refit` says, when set)."""
    trials = [dataclasses.replace(t, folds=t.fold_ids[:1], refit=t.refit or "alone") for t in trials]
    return trials, (f"folds -> [{trials[0].fold_ids[0]}] (a holdout of 1/{trials[0].n_folds} of the rows: the CV score) "
                    f"+ a refit on all rows (refit: {trials[0].refit}, its test predictions"
                    f"{' alone' if trials[0].refit == 'alone' else ''})" + (" (every experiment)" if len(trials) > 1 else ""))


def well_trained(cfg: CFG) -> int:
    return min(cfg.epochs, WELL_TRAINED["pretrained" if _pretrained(cfg) else "scratch"])


def _epochs_that_fit(cfgs: list[CFG], rates: dict, rows: tuple[int, int], left: float, name: str,
                     kernels: str = "per_job", notebook: float = NOTEBOOK_S, parallel: int = 1) -> float:
    """Epochs per fold of experiment `name` when the time left, less the notebooks' starts
    (`notebook` seconds each: 00_eda, 01_folds, the training kernels and the later stages), the
    training processes' start-up and the later stages' work, is split evenly over every fold of
    every experiment (kernels 'per_experiment': an experiment's folds share one notebook run;
    `parallel` GPUs: that many folds, each in its own kernel, at a time)."""
    n_train, n_test = rows
    rounds = {c.experiment: math.ceil(len(c.fold_ids) / parallel) for c in cfgs}
    folds = sum(rounds[c.experiment] + refit_weight(c) for c in cfgs)  # a refit counts as 3k/(3k-2) folds
    jobs = len(cfgs) if kernels == "per_experiment" else sum(rounds[c.experiment] + artifacts.refit_on(c) for c in cfgs)
    start_up = _start_up({c.experiment: rates.get(c.experiment, {}) for c in cfgs})
    per_fold = (left - after_training_s(cfgs, rates, rows, notebook) - notebook * (1 + len(cfgs))
                - (notebook + start_up) * jobs) / max(folds, 1)
    c = next(c for c in cfgs if c.experiment == name)
    r = rates.get(name, {"train_img_s": 100.0, "infer_img_s": 300.0})
    return max(0.0, (per_fold - n_test / r["infer_img_s"]) / _epoch_s(c, r, n_train))
