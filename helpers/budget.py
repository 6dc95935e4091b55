"""A time budget for a whole run: `time_limit` ("20min", "8h", "1h30m", "600s").

Kaggle kernels stop at 9 h (GPU) or 12 h (CPU). With `time_limit` set, the run spends its
time like this:

1. Before the first fold, `plan_run` times a few training and inference steps of each
   experiment's model (a probe of a few seconds) and checks that every fold can have at least
   MIN_EPOCHS epochs in the time left after the stages that follow training. When it cannot,
   it trains fewer folds (down to three), then one holdout fold and a refit on all rows, then
   halves the image size (down to 32 px), and says so: each model left gets more epochs, and
   from scratch the epochs and the rows matter most. Folds that fit MIN_EPOCHS but not
   WELL_TRAINED also become a holdout and a refit: on the recipe benchmark's test set, 3 folds
   of 23 epochs blended scored 0.963, one model of 31 epochs on every row 0.978 (AutoGluon,
   likewise, holds out instead of bagging on a short budget). The holdout's fold gives the CV
   score and the ensemble's OOF rows; the refit, `refit: alone` unless `refit` is set, the test
   predictions. Folds you set (`folds`) are trained as set: never dropped nor held out. The
   decision is kept in the ledger, so a restarted run, or the next run with the same settings,
   keeps it (and what it already made stays up to date). A notebook's start is timed on this
   machine (time_imports, then the notebooks run so far: notebook_s): 13-15 s on an H100
   machine against 7-9 s on the 2-core CPU. A budget too short after every cut says so, with
   the time that would do.
2. Each fold times its first epoch, then `fold_epochs` gives it the epochs that fit its share
   of what is left (the time left, less the estimated cost of the remaining stages, split over
   the folds not trained yet; `epochs` is the most it gets, two the least), and again from its
   second and fifth epochs at the mean pace of those after the first (the first pays for
   start-up: on a GPU, CUDA and cuDNN's autotuning made it 20 times longer). So every fold is
   re-planned from the time the earlier ones really took. Its training kernel's own start
   counts from the runner's mark (kernel_started), before the kernel records it. In a
   holdout plan the refit, whose predictions are submitted, counts as HOLDOUT_REFIT times the
   fold's epochs.
3. The ledger (`budget.json` beside the ensemble) records the seconds each stage took, under
   one key per output: a killed run, restarted, goes on with the time it has left.

Without time_limit nothing here runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from datetime import datetime
from pathlib import Path

from . import artifacts
from .config import CFG, parse_duration, to_dict
from .utils import atomic_write_text

# fewer epochs per fold than this: fewer folds, then a holdout, then a smaller image size (a model
# trained from scratch needs many more epochs than a pretrained one)
MIN_EPOCHS = {"pretrained": 6, "scratch": 20}
# fewer epochs per fold than this: one holdout fold and a refit on all rows instead of a fold
# ensemble (on the recipe benchmark, 3 folds of 23 epochs scored 0.963 on its test set, one
# model of 31 epochs on every row 0.978: a model from scratch gains from rows and epochs up to
# 40-50 epochs, more than from an ensemble of undertrained folds). Fine-tuning pretrained weights
# is not measured here: its folds are kept whenever they get MIN_EPOCHS
WELL_TRAINED = {"pretrained": MIN_EPOCHS["pretrained"], "scratch": 40}
MIN_IMG_SIZE = 32
MAX_BATCH = 256  # halving the image size doubles the batch up to this
MIN_FOLDS = 2  # without a holdout (features_from other than folds), folds are dropped down to this after the image size
FEW_FOLDS = 3  # folds are dropped down to this before the image size is halved
REFIT_MIN_SHARE = 0.75  # a refit the time left cuts below this share of the CV's epochs is skipped
# in a holdout plan the refit, whose test predictions are the submission's, trains this many times
# the holdout fold's epochs: the fold's only give the CV score (a conservative one: fewer rows and
# epochs than the refit) and the OOF rows, and from scratch more epochs pay (on the recipe
# benchmark, 600 s: the fold and the refit at 34 epochs each scored 0.980 on its test set, the
# fold at 23 and the refit at 38 (46 planned) 0.983; the plain loop 0.971-0.974)
HOLDOUT_REFIT = 2.0


class NoTime(RuntimeError):
    """The time left is too short for what was about to train (a refit)."""
PIPELINE = 1.3  # a real training step over the probe's (data loading, augmentation, loss, scheduler)
STACK_FOLD_S = 7.5  # a stacker per fold, where stack_fold_s measures none (38 s for 5 LightGBM folds of 10 classes on the 2-core CPU)
# boosting rounds of a fold's LightGBM stacker, its early-stopped fit and its refit together, at
# the cost of a round on random features (stack_fold_s): on the 2-core CPU the demo's folds took
# 4.2-4.5 s (foretold 4.6) and the recipe benchmark's 2.7 s (foretold 6)
STACK_ROUNDS = 120
STACK_PROBE_ROWS = 5000  # a bigger fold is timed on this many rows and scaled
NOTEBOOK_S = 9.0  # a notebook's kernel start and imports, until measured (on the 2-core CPU machine: 8-10 s)
# a kernel's start and papermill's bookkeeping, beyond the first cell's imports: on an H100 machine a
# notebook ran 3.1-4.0 s longer than its cells, whose first (the imports) took 11-12 s there
KERNEL_S = 3.5
PLAN_AGAIN_AFTER = (2, 5)  # a budgeted fold plans its epochs after its first, then again after these
QUICK_NOTEBOOKS = ("01_folds",)  # little work beyond its start: it measures it (00_eda reads image headers)


# --- the ledger ------------------------------------------------------------------------------
def ledger_path(cfg: CFG) -> Path:
    return artifacts.ensemble_dir(cfg) / "budget.json"


def read_ledger(cfg: CFG) -> dict | None:
    path = ledger_path(cfg)
    return json.loads(path.read_text()) if path.exists() else None


def write_ledger(cfg: CFG, ledger: dict) -> None:
    path = ledger_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(ledger, indent=1))


def _settings_digest(cfgs: list[CFG]) -> str:
    """What a plan was made for: every experiment's settings, but for how fast they run."""
    keep = [{k: v for k, v in to_dict(c).items() if k not in artifacts.RUN_ONLY} for c in cfgs]
    return artifacts.digest(keep)


def open_ledger(cfgs: list[CFG], train_jobs: list[str]) -> dict:
    """The run's ledger: the unfinished one (a restarted run goes on with its time), or a new
    one. A finished ledger's plan is kept when the settings are the same."""
    cfg = cfgs[0]
    limit = parse_duration(cfg.time_limit)
    old = read_ledger(cfg)
    digest = _settings_digest(cfgs)
    if old is not None and not old.get("finished") and old.get("digest") == digest:
        old.update(limit_s=limit, train_jobs=train_jobs)
        old.pop("kernel", None)  # a killed run's training kernel: its time is lost with it
        write_ledger(cfg, old)
        return old
    # the same settings and time: the same plan and estimates (another time_limit plans again: a
    # 10-minute holdout plan is no plan for 9 hours; what is made and still fits stays up to date)
    same = old is not None and old.get("digest") == digest and float(old.get("limit_s", -1)) == limit
    ledger = {"limit_s": limit, "digest": digest, "started": datetime.now().isoformat(timespec="seconds"),
              "finished": False, "spent": {}, "train_jobs": train_jobs,
              **({k: old[k] for k in ("plan", "rates", "after_s", "after_work", "rows") if k in old} if same else {"plan": None, "rates": {}})}
    write_ledger(cfg, ledger)
    return ledger


def spend(cfg: CFG, key: str, seconds: float) -> None:
    """Record what an output took (the larger of what is recorded and `seconds`: a resumed
    fold's job is shorter than the fold)."""
    ledger = read_ledger(cfg)
    if ledger is None or ledger.get("finished"):
        return
    ledger["spent"][key] = round(max(float(ledger["spent"].get(key, 0.0)), float(seconds)), 2)
    write_ledger(cfg, ledger)


def add(cfg: CFG, key: str, seconds: float) -> None:
    """Add seconds to what an output took (a fold's test predictions, after its training)."""
    ledger = read_ledger(cfg)
    if ledger is None or ledger.get("finished"):
        return
    ledger["spent"][key] = round(float(ledger["spent"].get(key, 0.0)) + float(seconds), 2)
    write_ledger(cfg, ledger)


def _now() -> float:  # the wall clock, shared by the runner and its kernels
    return time.time()


def kernel_started(cfg: CFG, keys: list[str]) -> None:
    """The runner starts a training kernel for the models `keys` (an experiment's folds one after
    another): its start (the kernel, the imports, CUDA's context) is spent before any of them
    records a second, and the runner records it (<exp>/02_train_kernel) only when it ends."""
    ledger = read_ledger(cfg)
    if ledger is not None and not ledger.get("finished"):
        ledger["kernel"] = {"since": _now(), "before": {k: float(ledger["spent"].get(k, 0.0)) for k in keys}}
        write_ledger(cfg, ledger)


def kernel_ended(cfg: CFG, seconds: float) -> None:
    """The training kernel kernel_started marked took `seconds`: what its models did not record
    is its own start, booked as <exp>/02_train_kernel."""
    ledger = read_ledger(cfg)
    if ledger is None or ledger.get("finished") or "kernel" not in ledger:
        return
    before = ledger.pop("kernel").get("before", {})
    models = sum(float(ledger["spent"].get(k, 0.0)) - b for k, b in before.items())
    key = f"{cfg.experiment}/02_train_kernel"
    ledger["spent"][key] = round(float(ledger["spent"].get(key, 0.0)) + max(0.0, seconds - models), 2)
    write_ledger(cfg, ledger)


def kernel_so_far(ledger: dict, key: str, elapsed_s: float) -> float:
    """Seconds the training kernel running `key` (elapsed_s into it) has spent beyond its models
    so far: its start, not in the ledger yet (10-11 s on the 2-core CPU, 22-24 s on an H100
    machine with CUDA's context and timm's import, where a notebook without them took 12.5-13 s).
    What a resumed model recorded before this kernel is not this kernel's."""
    kernel = ledger.get("kernel") or {}
    before = kernel.get("before", {})
    if key not in before:
        return 0.0
    models = sum(float(ledger["spent"].get(k, 0.0)) - b for k, b in before.items() if k != key)
    return max(0.0, _now() - float(kernel["since"]) - models - (elapsed_s - before[key]))


def spent_in(cfg: CFG, keys: list[str]) -> float:
    """Seconds the ledger records for these keys together."""
    ledger = read_ledger(cfg) or {"spent": {}}
    return sum(float(ledger["spent"].get(k, 0.0)) for k in keys)


def finish(cfg: CFG) -> dict | None:
    ledger = read_ledger(cfg)
    if ledger is None:
        return None
    ledger["finished"] = True
    write_ledger(cfg, ledger)
    return ledger


def spent_s(ledger: dict, but: str | None = None) -> float:
    """Seconds of the budget spent: folds trained side by side (one per GPU) share the clock."""
    parallel = max(1, int(ledger.get("parallel", 1)))
    return sum(v / (parallel if "/train_fold" in k else 1) for k, v in ledger["spent"].items() if k != but)


def train_key(cfg: CFG, fold: int | str) -> str:
    """'exp/train_fold3', or 'exp/train_refit' for the model on all rows."""
    return f"{cfg.experiment}/train_{artifacts.fold_name(fold)}"


def refit_weight(cfg: CFG) -> float:
    """What the refit costs in folds (when on): its epochs (as many as a fold's, HOLDOUT_REFIT
    times as many in a holdout plan), each training on all rows where a fold's trains on
    (k-1)/k of them and predicts the other 1/k (inference: about a third of a training step's
    time), so 3k/(3k-2) per epoch: 1.29 folds with 3 folds, 1.15 with 5 (measured on the recipe
    benchmark, 3 folds at 32 px: 4.0 s against 3.5-3.9 s per epoch)."""
    return refit_cost(cfg.n_folds) * refit_x(cfg) if artifacts.refit_on(cfg) else 0.0


def holdout(cfg: CFG) -> bool:
    """A holdout plan: on a budget, one fold (the CV score, the OOF rows) and a refit on all rows
    whose test predictions are used alone (with `refit: blend` the fold's are half of them: the
    two models split the time evenly)."""
    return bool(cfg.time_limit) and cfg.refit == "alone" and artifacts.refit_on(cfg) and len(cfg.fold_ids) == 1


def refit_x(cfg: CFG) -> float:
    """The refit's epochs over the folds' mean: HOLDOUT_REFIT in a holdout plan, else 1."""
    return HOLDOUT_REFIT if holdout(cfg) else 1.0


def refit_cost(n_folds: int) -> float:
    return 3 * n_folds / (3 * n_folds - 2)


# --- what a notebook's start and the stages after training cost --------------------------------
def time_imports() -> float | None:
    """Seconds this process takes to import what the notebooks import (torch, timm,
    albumentations, matplotlib, seaborn, the helpers): with KERNEL_S, a notebook's start on this
    machine (11-12 s on an H100 machine, 6 s on the 2-core CPU). None when they are imported
    already (the runner called from Python)."""
    import sys

    if "torch" in sys.modules:
        return None
    start = time.perf_counter()
    import timm  # noqa: F401  (the notebooks that train or embed import it)

    from . import data, models, plots, train  # noqa: F401
    return time.perf_counter() - start


def notebook_s(ledger: dict | None) -> float:
    """A notebook's kernel start and imports on this machine: the mean of what the notebooks this
    run has timed took beyond their work (QUICK_NOTEBOOKS do little else; 03_features,
    04_stacking and 05_ensemble less the work the plan foretold them, after_work), else what
    the runner measured before the run (its imports + KERNEL_S), else NOTEBOOK_S. 01_folds
    alone is too quick a sample: on an H100 machine it took 8.6-9.5 s where 03_features,
    04_stacking and 05_ensemble took 12-18 s beyond their work, and a 240 s demo run ended 8 s late."""
    ledger = ledger or {}
    work = ledger.get("after_work") or {}
    seen = []
    for key, seconds in ledger.get("spent", {}).items():
        stage = key.rsplit("/", 1)[-1]
        if stage in QUICK_NOTEBOOKS:
            seen.append(float(seconds))
        elif key in work or (stage == "05_ensemble" and stage in work):
            seen.append(float(seconds) - work.get(key, work.get(stage, 0.0)))
    seen = [s for s in seen if s > 0]
    return sum(seen) / len(seen) if seen else float(ledger.get("notebook_s") or NOTEBOOK_S)


def after_work(cfgs: list[CFG], rates: dict, rows: tuple[int, int]) -> dict[str, float]:
    """Estimated seconds of work, a notebook's start aside, of each stage after training, under
    the ledger's key of its output: each fold model embeds its OOF rows and the test set
    (03_features), a LightGBM head per fold (04_stacking), the blend (05_ensemble)."""
    n_train, n_test = rows
    work = {}
    for cfg in cfgs:
        rate = rates.get(cfg.experiment, {})
        embed = rate.get("embed_img_s", rate.get("infer_img_s", 500.0))
        folds = len(cfg.fold_ids)
        work[f"{cfg.experiment}/03_features"] = (n_train + folds * n_test) / embed
        work[f"{cfg.experiment}/04_stacking"] = rate.get("stack_fold_s", STACK_FOLD_S) * folds
    work["05_ensemble"] = 0.0
    return work


def after_training_s(cfgs: list[CFG], rates: dict, rows: tuple[int, int], notebook: float = NOTEBOOK_S) -> float:
    """Estimated seconds of 03_features, 04_stacking and 05_ensemble, `notebook` seconds of
    start each included (03_features: and the start-up a training process pays, later_s)."""
    start_up = _start_up(rates)
    return sum(w + notebook + (start_up if k.endswith("/03_features") else 0.0) for k, w in after_work(cfgs, rates, rows).items())


def later_s(ledger: dict, notebook: float, heavy: float | None = None) -> float:
    """What the stages after training still need: those of the experiments not yet through
    them (the runner takes one experiment to its stacker before the next one's folds train;
    their time is spent already, not to come). 03_features starts like a training kernel
    (`heavy` seconds: timm, the model, CUDA's context): on the 2-core CPU it took 7.7 s beyond
    its work where 01_folds took 4.8, and a recipe run planned with 4.8 ended 10 s late."""
    work = ledger.get("after_work")
    if work is None:  # no plan (a notebook run by hand), or one made before these estimates
        return ledger.get("after_s", 3 * notebook)
    done = set(ledger["spent"]) | {k.rsplit("/", 1)[-1] for k in ledger["spent"] if k.endswith("/05_ensemble")}
    start = lambda k: max(notebook, heavy or 0.0) if k.endswith("/03_features") else notebook  # noqa: E731
    return sum(w + start(k) for k, w in work.items() if k not in done)


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
    import lightgbm as lgb
    import numpy as np
    import torch

    from .stacking import LGBM_DEFAULTS

    rows = max(2, n_train * (cfg.n_folds - 1) // max(cfg.n_folds, 1))
    n = min(rows, STACK_PROBE_ROWS)
    features = (min(cfg.stack_pca, width) if cfg.stack_pca else width) + len(cfg.metadata_cols)
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, features)).astype(np.float32)
    regression = cfg.task == "regression"
    classes = n_out if cfg.task == "classification" and n_out > 2 else 2
    y = rng.normal(size=n) if regression else np.arange(n) % classes
    params = {**LGBM_DEFAULTS, "verbose": -1, "n_jobs": max(torch.get_num_threads(), 1), **cfg.lgbm_params}
    params.pop("early_stopping_round", None)
    create = lgb.LGBMRegressor if regression else lgb.LGBMClassifier

    def fit(rounds: int) -> float:
        start = time.perf_counter()
        create(**{**params, "n_estimators": rounds}).fit(X, y)
        return time.perf_counter() - start

    few, more = fit(2), fit(12)
    per_round = max(more - few, 0.0) / 10
    binning = max(few - 2 * per_round, 0.0)
    fits = n_out if cfg.task == "multilabel" else 1
    return round(fits * (2 * binning + STACK_ROUNDS * per_round) * rows / n, 3)


# --- the plan before training -------------------------------------------------------------------
def probe(cfg: CFG, n_out: int, steps: int = 3) -> dict:
    """Training and inference images/s of the experiment's model at its image size on this
    machine, in the precision training uses (a few steps on random images; PIPELINE covers
    the data pipeline)."""
    import torch

    from .utils import get_device

    device = get_device(cfg.device)
    rates = _measure(cfg, n_out, device, steps)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the runner keeps no GPU memory from the folds' processes
    return rates


def _measure(cfg: CFG, n_out: int, device, steps: int) -> dict:
    import torch

    from .models import create_model
    from .train import autocast
    from .utils import channels_last, precision

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
    # the stackers' embeddings are never bf16 (train.autocast): fp32 there, slower on a bf16 CPU
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
    from .models import model_problems

    logger = logger or logging.getLogger("kaggle")
    ledger = read_ledger(cfgs[0])
    ledger["rows"] = list(rows)
    if ledger.get("plan"):
        write_ledger(cfgs[0], ledger)
        return ledger["plan"]
    left = ledger["limit_s"] - spent_s(ledger)
    kernels = ledger.get("kernels", "per_job")
    notebook = notebook_s(ledger)
    trials = list(cfgs)
    rates = {c.experiment: probe(c, n_out) for c, n_out in zip(cfgs, n_outs)}
    for c, n_out in zip(cfgs, n_outs):  # the stacker's cost per fold on this machine (the image size changes it not)
        rates[c.experiment]["stack_fold_s"] = stack_fold_s(c, rows[0], n_out, rates[c.experiment].get("num_features", 0))
    notes = []
    may_drop = not any(c.folds for c in cfgs)  # folds the user set are trained as set
    may_holdout = may_drop and all(c.features_from == "folds" and len(c.fold_ids) > 1 for c in cfgs)

    parallel = max(1, int(ledger.get("parallel", 1)))

    def split(trials: list[CFG], left: float = left) -> dict:  # {exp: (its folds' epochs, its refit's)}
        return {c.experiment: holdout_split(c, _epochs_that_fit(trials, rates, rows, left, c.experiment, kernels, notebook,
                                                                parallel)) for c in trials}

    def fit(trials: list[CFG], left: float = left) -> dict:
        return {k: v[0] for k, v in split(trials, left).items()}

    while True:
        fits = fit(trials)
        # the worst: the furthest below its own need (from scratch needs more epochs than pretrained)
        i = min(range(len(trials)), key=lambda j: fits[trials[j].experiment] / min_epochs(trials[j]))
        worst = trials[i]
        if fits[worst.experiment] >= min_epochs(worst):
            under = [c for c in trials if fits[c.experiment] < well_trained(c)]
            if may_holdout and len(worst.fold_ids) > 1 and under:
                trials, change = _holdout(trials)
                c = under[0]
                notes.append(f"{change} ({c.experiment}: about {fits[c.experiment]:.1f} epochs per fold fit, under the "
                             f"{well_trained(c)} a model from {'pretrained weights' if _pretrained(c) else 'scratch'} wants)")
                logger.warning(f"time_limit: {notes[-1]}")
                continue
            break
        if may_drop and len(worst.fold_ids) > FEW_FOLDS:
            trials, change = _one_fold_fewer(trials, worst)
        elif may_holdout and len(worst.fold_ids) > 1:
            trials, change = _holdout(trials)
        elif worst.img_size // 2 >= MIN_IMG_SIZE and not model_problems(dataclasses.replace(worst, img_size=worst.img_size // 2)):
            # a quarter of the pixels: twice the batch (the same memory) keeps the device busy; on 2 CPU
            # threads resnet18 at 32 px runs 402 img/s in batches of 32, 656 in 64, 890 in 128
            batch = min(MAX_BATCH, worst.batch_size * 2) if worst.batch_size < MAX_BATCH else worst.batch_size
            trials[i] = dataclasses.replace(worst, img_size=worst.img_size // 2, batch_size=batch)
            # the start-up stays the first probe's: CUDA's context is up in this process by now
            rates[worst.experiment] = {**rates[worst.experiment], **probe(trials[i], n_outs[i]),
                                       "start_s": rates[worst.experiment].get("start_s", 0.0)}
            change = f"img_size {worst.img_size} -> {trials[i].img_size} px" + (
                f", batch_size {worst.batch_size} -> {batch}" if batch != worst.batch_size else "")
        elif may_drop and len(worst.fold_ids) > MIN_FOLDS:
            trials, change = _one_fold_fewer(trials, worst)
        else:
            break
        notes.append(f"{worst.experiment}: {change} (about {fits[worst.experiment]:.1f} epochs per fold fit before)")
        logger.warning(f"time_limit: {notes[-1]}")
    splits = split(trials)
    fits = {k: v[0] for k, v in splits.items()}
    short = [c for c in trials if fits[c.experiment] < min_epochs(c)]
    if short:  # nothing left to cut: say what it costs and what would do (for the one that needs the most)
        needs = {c.experiment: _time_for(lambda extra, c=c: fit(trials, left + extra)[c.experiment], min_epochs(c)) for c in short}
        c = max(short, key=lambda c: needs[c.experiment])
        more = needs[c.experiment]
        notes.append(f"too short: {c.experiment} gets about {fits[c.experiment]:.1f} epochs per model, under the "
                     f"{min_epochs(c)} it needs; expect weak predictions (about {ledger['limit_s'] + more:.0f}s would give it "
                     f"{min_epochs(c)}; a notebook's start here takes about {notebook:.0f}s)")
        logger.warning(f"time_limit {cfgs[0].time_limit} is {notes[-1]}")
    holdouts = {c.experiment for c in trials if holdout(c)}
    plan = {"img_size": {c.experiment: c.img_size for c in trials}, "folds": {c.experiment: c.fold_ids for c in trials},
            "batch_size": {c.experiment: c.batch_size for c in trials}, "refit": {c.experiment: c.refit for c in trials},
            "notes": notes, "expected_epochs": {k: round(v, 1) for k, v in fits.items()},
            "refit_epochs": {k: round(v[1], 1) for k, v in splits.items() if k in holdouts}}
    ledger.update(plan=plan, rates=rates, after_s=round(after_training_s(trials, rates, rows, notebook), 1),
                  after_work={k: round(v, 2) for k, v in after_work(trials, rates, rows).items()})
    write_ledger(cfgs[0], ledger)
    logger.info(f"time_limit {cfgs[0].time_limit} ({ledger['limit_s']:.0f}s, {left:.0f}s left): "
                + "; ".join(f"{c.experiment}: {c.img_size} px, folds {c.fold_ids}, about "
                            f"{min(fits[c.experiment], c.epochs):.1f} epochs per fold"
                            + (f" and {min(plan['refit_epochs'][c.experiment], c.epochs):.1f} for its refit" if holdout(c) else "")
                            for c in trials)
                + f"; {ledger['after_s']:.0f}s kept for features, stacking and the ensemble")
    return plan


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


def _pretrained(cfg: CFG) -> bool:
    return bool(cfg.pretrained or cfg.pretrained_path)


def min_epochs(cfg: CFG) -> int:
    return min(cfg.epochs, MIN_EPOCHS["pretrained" if _pretrained(cfg) else "scratch"])


def well_trained(cfg: CFG) -> int:
    return min(cfg.epochs, WELL_TRAINED["pretrained" if _pretrained(cfg) else "scratch"])


def _epoch_s(cfg: CFG, rate: dict, n_train: int, refit: bool = False) -> float:
    """A fold's epoch at the probe's rates: training on (k-1)/k of the rows, predicting the
    other 1/k (the probe's steps run on random tensors: loading, augmenting and the loss take
    the rest, x1.3 measured on the 2-core CPU machine); the refit's trains on every row."""
    if refit:
        return n_train / rate["train_img_s"] * PIPELINE
    k = cfg.n_folds
    return n_train * (k - 1) / k / rate["train_img_s"] * PIPELINE + n_train / k / rate["infer_img_s"]


def started_up(cfg: CFG, fold: int | str, epoch_s: float) -> bool:
    """Whether a first epoch of epoch_s paid for start-up (CUDA's context, cuDNN's autotuning,
    the workers: 6.4 s against 0.5 s for the next on an H100): over twice what the probe
    foretold; without a probe (a notebook run by hand), who knows: yes."""
    ledger = read_ledger(cfg) or {}
    rate, rows = (ledger.get("rates") or {}).get(cfg.experiment), ledger.get("rows")
    if not (rate and rows):
        return True
    return epoch_s > 2 * _epoch_s(cfg, rate, rows[0], refit=fold == artifacts.REFIT)


def _start_up(rates: dict) -> float:
    """A training kernel's start-up: the largest the probes measured (the first of the run's
    probes pays CUDA's context; a later one in the same process does not)."""
    return max([float(r.get("start_s", 0.0)) for r in rates.values()] or [0.0])


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


def apply_plan(cfg: CFG) -> CFG:
    """cfg with the run's planned image size and folds (as it is when no plan was made)."""
    if not cfg.time_limit:
        return cfg
    ledger = read_ledger(cfg)
    plan = (ledger or {}).get("plan") or {}
    changes = {}
    for key in ("img_size", "batch_size"):
        if cfg.experiment in plan.get(key, {}):
            changes[key] = plan[key][cfg.experiment]
    if cfg.experiment in plan.get("folds", {}) and not cfg.folds:
        changes["folds"] = plan["folds"][cfg.experiment]
        if plan.get("refit", {}).get(cfg.experiment):  # a holdout plan's refit
            changes["refit"] = plan["refit"][cfg.experiment]
    return dataclasses.replace(cfg, **changes) if changes else cfg


# --- each fold's epochs ---------------------------------------------------------------------------
def fold_epochs(cfg: CFG, fold: int | str, elapsed_s: float, epoch_s: float, test_s: float,
                logger: logging.Logger | None = None, epochs_done: int = 1) -> int:
    """The epochs fold `fold` gets (at most cfg.epochs), after `epochs_done` epochs, the last of
    epoch_s, that end elapsed_s into the fold: its share of the time left, less the later
    stages, split over the folds not trained yet (this one included), less its test predictions."""
    logger = logger or logging.getLogger("kaggle")
    ledger = read_ledger(cfg)
    if ledger is None:  # a notebook run by hand, without the runner: this experiment alone
        ledger = open_ledger([cfg], [train_key(cfg, k) for k in cfg.fold_ids] + ([train_key(cfg, "refit")] if artifacts.refit_on(cfg) else []))
    elif ledger.get("finished"):  # by hand after a finished run: new time, the same plan and estimates
        ledger.update(finished=False, spent={}, started=datetime.now().isoformat(timespec="seconds"))
        write_ledger(cfg, ledger)
    key = train_key(cfg, fold)
    done = {k for k in ledger["spent"] if k.split("/")[-1].startswith("train_") and k != key}
    waiting = [k for k in ledger.get("train_jobs", []) if k not in done] or [key]
    notebook = notebook_s(ledger)  # measured by the notebooks run so far, once there are some
    refits = [k for k in waiting if k.endswith("/train_refit")]  # they run alone, after their folds
    weight = refit_cost(cfg.n_folds) * refit_x(cfg)  # a refit, in folds
    fold_rounds = math.ceil((len(waiting) - len(refits)) / max(1, int(ledger.get("parallel", 1))))  # side by side, one per GPU
    rounds = max(fold_rounds + weight * len(refits), 1e-9)
    if ledger.get("kernels") == "per_experiment":  # folds one after another share their experiment's kernel
        kernels = len({k.split("/")[0] for k in waiting})
    else:
        kernels = fold_rounds + len(refits)
    start_up = _start_up(ledger.get("rates") or {})  # each kernel to come pays it
    so_far = kernel_so_far(ledger, key, elapsed_s)  # this kernel's start: spent, not recorded yet
    measured = [float(v) for k, v in ledger["spent"].items() if k.endswith("/02_train_kernel")] + ([so_far] if so_far else [])
    kernel = max([notebook + start_up] + measured)  # a training kernel to come: as long as those seen, at least
    later = later_s(ledger, notebook, heavy=kernel)
    left = ledger["limit_s"] - spent_s(ledger, but=key) - so_far - later - kernel * (kernels - 1)
    share = left * (weight if key in refits else 1.0) / rounds
    if holdout(cfg) and refits and key not in refits:  # a holdout fold: what a CV score needs, if an even split has it
        even = left / (fold_rounds + refit_cost(cfg.n_folds) * len(refits))
        need = elapsed_s + max(0, min_epochs(cfg) - epochs_done) * epoch_s + test_s
        share = max(share, min(even, need))
    epochs = epochs_done + math.floor(max(0.0, share - elapsed_s - test_s) / max(epoch_s, 1e-6))
    # a first epoch that paid for start-up: a second, then planned again from it (train.fit_fold),
    # rather than a model of one epoch, or a refit skipped for want of time it has
    first_slow = epochs_done == 1 and started_up(cfg, fold, epoch_s)
    epochs = int(min(cfg.epochs, max(epochs_done, epochs, 2 if first_slow else 0)))
    logger.info(f"time_limit: {'the refit' if key in refits else f'fold {fold}'} gets {epochs} epoch(s) of {epoch_s:.1f}s (its share {share:.0f}s of "
                f"{left:.0f}s left for {len(waiting)} model(s) to train; at most epochs={cfg.epochs})"
                + (f"; planned again after epoch {epochs_done}, at the pace of those after the first (it paid for start-up)"
                   if epochs_done > 1 else ""))
    if epochs < min_epochs(cfg) and key not in refits and not first_slow:  # the plan after the second will say
        logger.warning(f"time_limit: fold {fold} gets {epochs} epoch(s), under the "
                       f"{min_epochs(cfg)} a model from {'pretrained weights' if _pretrained(cfg) else 'scratch'} needs: "
                       f"its predictions will be weak (the run is short of time: a notebook's start here takes about {notebook:.0f}s)")
    return epochs
