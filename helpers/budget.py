"""A time budget for a whole run: `time_limit` ("20min", "8h", "1h30m", "600s"): the ledger and
each fold's epochs.

Kaggle kernels stop at 9 h (GPU) or 12 h (CPU). With `time_limit` set, the run spends its
time like this:

1. Before the first fold, helpers.planning makes the run's plan (the folds, image size and batch
   that fit, from a probe of each model) and keeps it in the ledger; `apply_plan` gives each
   experiment's config its planned size and folds. The holdout's fold gives the CV score and
   the ensemble's OOF rows; the refit, `refit: alone` unless `refit` is set, the test
   predictions. A notebook's start is timed on this machine (the runner's imports, then the
   notebooks run so far: notebook_s): 13-15 s on an H100 machine against 7-9 s on the 2-core CPU.
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

Without time_limit nothing here runs. Nothing here imports torch: the runner reads the ledger.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from datetime import datetime
from pathlib import Path

from . import artifacts, freshness, stages
from .config import CFG, to_dict
from .configfile import parse_duration
from .utils import atomic_write_text

# fewer epochs per fold than this: fewer folds, then a holdout, then a smaller image size (a model
# trained from scratch needs many more epochs than a pretrained one, and a pretrained model loses
# more from a halved image than from fewer epochs (its weights were made at 224 px and more; the
# halving itself is not measured here), and fine-tuned with EMA it is near its best within a few
# epochs: tf_efficientnet_lite1 on the recipe benchmark's 64 px digits, one fold at lr 1e-2 on the
# 2-core CPU, scored 0.875, 0.945, 0.957, 0.967 and 0.970 on its validation rows after 2 to 6 of 8)
MIN_EPOCHS = {"pretrained": 3, "scratch": 20}
REFIT_MIN_SHARE = 0.75  # a refit the time left cuts below this share of the CV's epochs is skipped
# in a holdout plan the refit, whose test predictions are the submission's, trains this many times
# the holdout fold's epochs: the fold's only give the CV score (a conservative one: fewer rows and
# epochs than the refit) and the OOF rows, and from scratch more epochs pay. The refit's longer
# schedule is one no score checked; the fold's epochs (1) were tried on 2026-12-05 and cost more
# than they bought: on the recipe benchmark's 600 s, 1 made the plan halve the images to 32 px
# (fold and refit 40 epochs each, 385 s used) and scored 0.964 on its test set, 2 kept 64 px
# (fold 20, refit 25) and scored 0.977 (earlier: 0.980 for 34 + 34 against 0.983 for 23 + 38)
HOLDOUT_REFIT = 2.0


class NoTime(RuntimeError):
    """The time left is too short for what was about to train (a refit)."""
PIPELINE = 1.3  # a real training step over the probe's (data loading, augmentation, loss, scheduler)
NOTEBOOK_S = 9.0  # a notebook's kernel start and imports, until measured (on the 2-core CPU machine: 8-10 s)
# a kernel's start and papermill's bookkeeping, beyond the first cell's imports: on an H100 machine a
# notebook ran 3.1-4.0 s longer than its cells, whose first (the imports) took 11-12 s there
KERNEL_S = 3.5
PLAN_AGAIN_AFTER = (2, 5)  # a budgeted fold plans its epochs after its first, then again after these


# --- the ledger ------------------------------------------------------------------------------
def ledger_path(cfg: CFG) -> Path:
    return artifacts.ensemble_dir(cfg) / "budget.json"


def read_ledger(cfg: CFG) -> dict | None:
    path = ledger_path(cfg)
    return json.loads(path.read_text()) if path.exists() else None


def limit_s(cfg: CFG) -> float:
    """The run's time_limit in seconds (0 without one)."""
    return parse_duration(cfg.time_limit) if cfg.time_limit else 0.0


def write_ledger(cfg: CFG, ledger: dict) -> None:
    path = ledger_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(ledger, indent=1))


def _settings_digest(cfgs: list[CFG]) -> str:
    """What a plan was made for: every experiment's settings, but for how fast they run."""
    keep = [{k: v for k, v in to_dict(c).items() if k not in stages.RUN_ONLY} for c in cfgs]
    return freshness.digest(keep)


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


def notebook_s(ledger: dict | None) -> float:
    """A notebook's kernel start and imports on this machine: the mean of what the notebooks this
    run has timed took beyond their work (stages.QUICK do little else; 03_features,
    04_stacking and 05_ensemble less the work the plan foretold them, after_work), else what
    the runner measured before the run (its imports + KERNEL_S), else NOTEBOOK_S. 01_folds
    alone is too quick a sample: on an H100 machine it took 8.6-9.5 s where 03_features,
    04_stacking and 05_ensemble took 12-18 s beyond their work, and a 240 s demo run ended 8 s late."""
    ledger = ledger or {}
    work = ledger.get("after_work") or {}
    seen = []
    for key, seconds in ledger.get("spent", {}).items():
        stage = key.rsplit("/", 1)[-1]
        if stage in stages.QUICK:
            seen.append(float(seconds))
        elif key in work or (stage == stages.FINAL and stage in work):
            seen.append(float(seconds) - work.get(key, work.get(stage, 0.0)))
    seen = [s for s in seen if s > 0]
    return sum(seen) / len(seen) if seen else float(ledger.get("notebook_s") or NOTEBOOK_S)


def later_s(ledger: dict, notebook: float, heavy: float | None = None) -> float:
    """What the stages after training still need: those of the experiments not yet through
    them (the runner takes one experiment to its stacker before the next one's folds train;
    their time is spent already, not to come). 03_features starts like a training kernel
    (`heavy` seconds: timm, the model, CUDA's context): on the 2-core CPU it took 7.7 s beyond
    its work where 01_folds took 4.8, and a recipe run planned with 4.8 ended 10 s late."""
    work = ledger.get("after_work")
    if work is None:  # no plan (a notebook run by hand), or one made before these estimates
        return ledger.get("after_s", 3 * notebook)
    done = set(ledger["spent"]) | {k.rsplit("/", 1)[-1] for k in ledger["spent"] if k.endswith(f"/{stages.FINAL}")}
    start = lambda k: max(notebook, heavy or 0.0) if k.endswith(f"/{stages.EMBED}") else notebook  # noqa: E731
    return sum(w + start(k) for k, w in work.items() if k not in done)


def _pretrained(cfg: CFG) -> bool:
    return cfg.arch == "timm" and bool(cfg.pretrained or cfg.pretrained_path)  # the hybrid has no weights to start from


def min_epochs(cfg: CFG) -> int:
    return min(cfg.epochs, MIN_EPOCHS["pretrained" if _pretrained(cfg) else "scratch"])


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


def folds_epochs(cfg: CFG) -> float:
    """The epochs the CV chose: the mean of the folds' best epochs; with time_limit (no early
    stop: each fold's schedule was planned and run to its end), the mean of the epochs they ran."""
    if cfg.time_limit:
        counts = [len(artifacts.read_metrics(cfg, k)) for k in cfg.fold_ids]
    else:
        counts = [artifacts.load_checkpoint(artifacts.checkpoint_path(cfg, k))["epoch"] for k in cfg.fold_ids]
    return sum(counts) / len(counts)


def refit_epochs(cfg: CFG) -> int:
    """The refit's epochs: folds_epochs, rounded, times HOLDOUT_REFIT in a holdout plan (the
    fold gives the CV score, the refit the submission), at most `epochs`."""
    return max(1, min(cfg.epochs, int(math.floor(folds_epochs(cfg) * refit_x(cfg) + 0.5))))


def undertrained(cfg: CFG, fold: int | str, planned: float) -> str | None:
    """Why a fold (or the refit) trained under a shorter time_limit trains again: the plan now
    gives it materially more epochs (a quarter more, and two at least) than it ran. None where
    it keeps: fewer epochs planned, about as many, or a fold that stopped early (its best epoch
    `patience` epochs or more before its last: more epochs would not help it)."""
    from .metrics import HIGHER_IS_BETTER  # scikit-learn: imported where the runner has timed its imports

    rows = artifacts.read_metrics(cfg, fold)
    ran, planned = len(rows), min(float(planned), cfg.epochs)
    under = max((float(r.get("time_limit_s") or 0) for r in rows), default=0.0)
    if under >= limit_s(cfg):  # trained under this time_limit or a longer one: its own plan ran (on a slower
        return None  # machine it may be fewer epochs than today's estimate, which is no reason to train again)
    scores = [r["metric"] for r in rows if r.get("metric") is not None]
    if scores:
        best = 1 + scores.index(max(scores) if HIGHER_IS_BETTER[cfg.metric] else min(scores))
        if ran - best >= cfg.patience:
            return None
    if ran and planned >= max(1.25 * ran, ran + 2):
        return f"time_limit {cfg.time_limit} plans about {planned:.0f} epochs for it; it trained {ran}, under a shorter time"
    return None


def apply_plan(cfg: CFG) -> CFG:
    """cfg with the run's planned image size and folds (as it is when no plan was made)."""
    if not cfg.time_limit:
        return cfg
    ledger = read_ledger(cfg)
    plan = (ledger or {}).get("plan") or {}
    changes = {}
    for key in ("img_size", "batch_size", "min_feature_map"):
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
