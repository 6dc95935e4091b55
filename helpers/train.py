"""Training one fold: the fold loop around the engine (helpers.engine), with callbacks for what
is not training (helpers.callbacks: the time-limit pacer, early stopping, checkpoints, EMA
bookkeeping, metrics.jsonl and the log, W&B, the OOF writer); the refit on all rows; a fold's
or the refit's test predictions.

From timm: the optimizer and scheduler (create_optimizer_v2 / create_scheduler_v2, layer-wise
LR decay), Mixup/CutMix, EMA weights (ModelEmaV3). A fold is trained again only when what it is
made from changed (helpers.freshness); a killed run resumes from last.pt with the same result
as an uninterrupted one; with `ddp` above 1, a fold trains in that many processes.
"""
from __future__ import annotations

import dataclasses
import logging
import resource
import time

import numpy as np
import pandas as pd
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2

from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn

from . import artifacts, budget, distributed, freshness
from .cache import create_cache
from .callbacks import Callback, Checkpoints, EarlyStop, EmaReport, MetricsLog, OofWriter, Pacer, WandbLog
from .config import CFG, cfg_from_dict, to_dict
from .data import create_loader
from .engine import (
    HEAD_PREFIXES,
    Diverged,
    divergence,
    epoch_updates,
    load_model,
    predict,
    rules_of,
    set_backbone_trainable,
    train_one_epoch,
)
from .losses import TargetScale
from .metrics import get_score
from .models import create_model
from .runtime import (
    channels_last,
    cpu_precision,
    create_scaler,
    get_device,
    optimizer_kwargs,
    precision,
    seed_everything,
    setup_device,
)
from .tasks import task_of
from .timmlib import param_groups_layer_decay, param_groups_weight_decay
from .transforms import InputNorm, device_augment, input_stats
from .utils import get_logger


def num_outputs(cfg: CFG, classes: list | None) -> int:
    """The model's output width for cfg's task."""
    return task_of(cfg).n_outputs(classes)


def param_groups(model: nn.Module, cfg: CFG) -> list[dict]:
    """Weight-decay groups; the backbone's at backbone_lr_scale (times the layer-wise decay of
    timm's param_groups_layer_decay when cfg.layer_decay), the head's at the full LR."""
    backbone = getattr(model, "backbone", None)
    if cfg.layer_decay and backbone is None:
        raise ValueError(f"config key 'layer_decay' needs a timm backbone (arch 'timm'), not arch '{cfg.arch}'")
    if backbone is not None:
        nwd = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
        if cfg.layer_decay:
            groups = param_groups_layer_decay(backbone, cfg.weight_decay, nwd, layer_decay=cfg.layer_decay)
        else:
            groups = param_groups_weight_decay(backbone, cfg.weight_decay, no_weight_decay_list=nwd)
    else:  # e.g. the hybrid model: everything but the classifier is the backbone
        body = [p for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIXES)]
        groups = [{"params": [p for p in body if p.ndim > 1], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in body if p.ndim <= 1], "weight_decay": 0.0}]
    head = [(n, p) for n, p in model.named_parameters() if n.startswith(HEAD_PREFIXES)]
    for g in groups:
        g["lr_scale"] = g.get("lr_scale", 1.0) * cfg.backbone_lr_scale
        g["backbone"] = True
    groups += [{"params": [p for _, p in head if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
               {"params": [p for _, p in head if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]


def seed_epoch(cfg: CFG, seed_id: int, epoch: int, rank: int = 0) -> int:
    """Every epoch's randomness from its own seed (a resumed run matches an uninterrupted one):
    seeds this process's generators, which draw dropout and drop-path masks, the device-side
    warp and Mixup, apart from the other processes' (rank 0 as a single process); returns the
    seed of the rows' order, which every process shares (EpochSampler deals it among them)."""
    order = (cfg.seed * 1000 + seed_id * 100 + epoch) % 2**32
    seed_everything((order + rank * 1_000_003) % 2**32)
    return order


def mixup_off(cfg: CFG, epochs: int) -> int:
    """The epoch from which Mixup/CutMix stop: `mixup_off_epoch` when it is an epoch number, or
    under 1 that share of the epochs the schedule runs (a time-limited run plans them, a refit
    runs its own); 0: never."""
    share = cfg.mixup_off_epoch
    if not share:
        return 0
    return int(share) if share >= 1 else max(1, round(share * epochs))


def _memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# --- the fold loop -----------------------------------------------------------------------------
class FoldRun:
    """One fold's training in this process (one of procs.world): its rows, model, optimizer,
    schedule, loaders, and the state last.pt keeps. fold 'refit' (artifacts.REFIT): every row,
    no validation; its "best" checkpoint holds the weights after the last epoch."""

    def __init__(self, cfg: CFG, folds: pd.DataFrame, fold: int | str, procs: distributed.Processes,
                 logger: logging.Logger, n_test: int = 0):
        self.started = time.perf_counter()
        self.fold, self.procs, self.logger, self.n_test = fold, procs, logger, n_test
        self.refit, self.name = fold == artifacts.REFIT, "refit" if fold == artifacts.REFIT else f"fold {fold}"
        self.device, self.task = procs.device, task_of(cfg)
        if cfg.batch_size % procs.world:
            raise ValueError(f"config key 'batch_size' ({cfg.batch_size}) must split evenly among ddp={procs.world} processes")
        if cfg.sync_bn and procs.world > 1 and self.device.type != "cuda":
            raise ValueError("config key 'sync_bn': SyncBatchNorm needs GPUs (NCCL); turn it off on the CPU")
        self.classes, self.scale = self.task.classes(folds, cfg), self.task.target_scale(folds)
        self.seed_id = cfg.n_folds if self.refit else fold  # the refit's randomness: unlike any fold's
        self.train_df = folds[folds["fold"] != fold].reset_index(drop=True)
        if cfg.sampling_ratio < 1:
            self.train_df = self.train_df.sample(frac=cfg.sampling_ratio, random_state=cfg.seed + self.seed_id).reset_index(drop=True)
        self.valid_df = folds[folds["fold"] == fold].reset_index(drop=True)
        self.epochs = 1 if cfg.debug else cfg.epochs
        seed_everything((cfg.seed + self.seed_id) % 2**32)
        self.cfg = self._build_model(cfg)
        self._build_data(folds)
        self._build_optimization()
        self.valid_targets = None if self.refit else self.task.targets(self.valid_df)
        self.weights = self.task.label_weights(self.cfg, self.classes)
        self.state = {"epoch": 0, "best_score": None, "best_epoch": -1, "bad_epochs": 0, "history": [], "best_preds": None,
                      "best_logits": None}
        self.last_path, self.best_path = artifacts.checkpoint_path(cfg, fold, "last"), artifacts.checkpoint_path(cfg, fold)
        self.improved, self.score, self.preds, self.logits, self.valid_s = False, None, None, None, 0.0

    def _build_model(self, cfg: CFG) -> CFG:
        """The model (channels_last, SyncBatchNorm, DDP, compiled as set) and its EMA; returns cfg
        with the precision this CPU trains it in."""
        if cfg.compile:  # several folds in one process: each compiles afresh, none runs into dynamo's recompile limit
            torch._dynamo.reset()
        self.n_out = self.task.n_outputs(self.classes)
        self.model = create_model(cfg, self.n_out).to(self.device)
        self.weights_from = getattr(self.model, "weights", "") or "none (from scratch)"
        if self.procs.main:
            self.logger.info(f"{self.name}: {cfg.model_name if cfg.arch == 'timm' else cfg.arch} weights: {self.weights_from}")
        if getattr(self.model, "stem_changes", None) and self.procs.main:
            self.logger.info(f"{self.name}: {cfg.model_name} at {cfg.img_size} px: {', '.join(self.model.stem_changes)} "
                             f"(min_feature_map {cfg.min_feature_map}: its last map at least that side)")
        cfg = cpu_precision(cfg, self.model, self.device, self.logger)
        self.nhwc = channels_last(cfg, self.device)
        if self.nhwc:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.procs.world > 1:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.trainable = None
        self._wrap(cfg, trainable=cfg.freeze_epochs == 0)
        # EMA with timm's warm-up: its decay grows with the steps taken, so the EMA that is validated
        # and saved follows the model early on instead of averaging in the untrained weights
        # (power 3/4, for the 10^4-10^5 steps of a Kaggle run; timm's 2/3 suits 10^6)
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=True, warmup_power=0.75) if cfg.ema else None
        self.eval_model = self.ema.module if self.ema is not None else self.model
        self.eval_step = torch.compile(self.eval_model) if cfg.compile else self.eval_model
        self.rules = rules_of(cfg, self.device)
        return cfg

    def _wrap(self, cfg: CFG, trainable: bool) -> None:
        """The module a step runs: DistributedDataParallel with several processes (compiled as
        set), built for the parameters that train now: DDP registers its gradient hooks once, so
        a backbone frozen or unfrozen (freeze_epochs) gets a wrapper built again."""
        if trainable == self.trainable:
            return
        set_backbone_trainable(self.model, trainable)
        self.trainable = trainable
        self.step_model = self.procs.wrap(self.model)
        self.step_model = torch.compile(self.step_model) if cfg.compile else self.step_model

    def _build_data(self, folds: pd.DataFrame) -> None:
        """The loaders (built once per fold, over the image cache one process builds) and the
        device-side normalisation (and, for training, augmentation)."""
        cfg, procs = self.cfg, self.procs
        local = dataclasses.replace(cfg, batch_size=cfg.batch_size // procs.world)  # each process's share of the global batch
        if procs.main:  # one process builds the cache, the others then map it
            create_cache(cfg, folds["path"].tolist(), self.logger)
        procs.barrier()
        cache = create_cache(cfg, folds["path"].tolist(), self.logger)
        self.train_loader = create_loader(local, self.train_df, train=True, cache=cache, rank=procs.rank, world=procs.world)
        self.valid_loader = None if self.refit else create_loader(local, self.valid_df, train=False, cache=cache, rank=procs.rank,
                                                                  world=procs.world)
        self.norm = InputNorm(input_stats(cfg), self.device, self.nhwc)  # built once, constants on the device
        self.train_norm = InputNorm(input_stats(cfg), self.device, self.nhwc, augment=device_augment(cfg))

    def _build_optimization(self) -> None:
        cfg = self.cfg
        self.criterion = self.task.criterion(cfg, self.train_df["target"].to_numpy(), self.n_out, self.classes).to(self.device)
        self.optimizer = create_optimizer_v2(param_groups(self.model, cfg), opt=cfg.optimizer, lr=cfg.lr,
                                             weight_decay=cfg.weight_decay, **optimizer_kwargs(cfg, self.device))
        self.steps = epoch_updates(len(self.train_loader), cfg.grad_accum)
        self.scheduler = self.schedule(self.epochs)
        self.scaler = create_scaler(cfg, self.device)
        self.mixup = None
        if cfg.mixup_alpha or cfg.cutmix_alpha:
            self.mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mixup_prob,
                               label_smoothing=cfg.label_smoothing, num_classes=self.n_out,
                               **({"multi_label": True} if self.task.mixup_multi_label else {}))  # timm < 1.0.31 has no multi_label

    def schedule(self, n_epochs: int):
        """timm's schedule over n_epochs: a function of the update count, so one can replace
        another mid-run (a time-limited fold plans its epochs after the first)."""
        cfg = self.cfg
        return create_scheduler_v2(self.optimizer, sched=cfg.scheduler, num_epochs=n_epochs,
                                   warmup_epochs=min(cfg.warmup_epochs, n_epochs - 1), min_lr=cfg.min_lr, warmup_lr=cfg.lr * 0.01,
                                   step_on_epochs=False, updates_per_epoch=self.steps)[0]

    @property
    def last_epoch(self) -> int:
        """Where training stops: the schedule's end, or, for the refit, the epoch its folds chose
        on the same schedule (`stop_after`)."""
        return min(self.epochs, self.cfg.stop_after) if self.cfg.stop_after and not self.cfg.debug else self.epochs

    def set_epochs(self, n_epochs: int) -> None:
        self.epochs = n_epochs
        self.scheduler = self.schedule(n_epochs)

    def resume(self, made_from: dict) -> None:
        """Go on from last.pt when it was made from the same settings and data (whatever the
        number of processes that made it); an older version's or a foreign file is never loaded."""
        if not self.last_path.exists() or self.cfg.retrain:
            return
        try:
            last = artifacts.load_checkpoint(self.last_path)
        except ValueError as e:
            self.logger.warning(f"{self.name}: {e}")
            last = {}
        if last.get("made_from") != freshness.digest(made_from):
            self.logger.info(f"{self.name}: {self.last_path} was made from other settings or data; starting over")
            return
        self.model.load_state_dict(last["model"])
        self.optimizer.load_state_dict(last["optimizer"])
        self.scheduler.load_state_dict(last["scheduler"])
        if last["scaler"] and self.scaler.is_enabled():  # a bf16 run has no scaler state: a T4 resumes with a fresh one
            self.scaler.load_state_dict(last["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(last["ema"])
        self.state = {**last["state"], **{k: None if last["state"].get(k) is None else np.asarray(last["state"][k])
                                          for k in ("best_preds", "best_logits")}}
        if self.state.get("planned_epochs"):  # time_limit: the plan this fold made after its first epoch
            self.set_epochs(self.state["planned_epochs"])
            self.scheduler.load_state_dict(last["scheduler"])
        self.logger.info(f"{self.name}: resuming from {self.last_path} after epoch {self.state['epoch']}")

    def validate(self, model: nn.Module) -> tuple:
        """(loss, score, predictions, logits) over every process's share of the validation rows:
        gathered to rank 0, which scores them and tells the others (they get None for the rows).
        Multi-label scores use the thresholds that suit these rows (the model's reach: epochs are
        compared, the reported CV is cross-fitted later)."""
        procs = self.procs
        preds, loss, logits = predict(model, self.valid_loader, self.device, self.rules, self.norm, self.criterion, scale=self.scale)
        loss = procs.mean(loss, len(self.valid_loader.sampler))
        preds, logits = procs.gather_rows(preds), procs.gather_rows(logits)
        bad = procs.broadcast(int((~np.isfinite(preds)).any(axis=tuple(range(1, preds.ndim))).sum()) if procs.main else None)
        if bad or not np.isfinite(loss):
            raise Diverged(f"the validation loss is {loss:.4g} and {bad} of its rows' predictions are NaN or inf")
        score = procs.broadcast(get_score(self.cfg.metric, self.valid_targets, preds, weights=self.weights) if procs.main else None)
        return loss, score, preds, logits

    def run_epoch(self, callbacks: list[Callback]) -> dict:
        """One epoch: train, check it stayed finite, validate; its row of metrics."""
        cfg, epoch, start = self.cfg, self.state["epoch"], time.perf_counter()
        order = seed_epoch(cfg, self.seed_id, epoch, self.procs.rank)
        frozen = epoch < cfg.freeze_epochs
        self._wrap(cfg, trainable=not frozen)
        self.train_loader.sampler.set_epoch(order)
        off = mixup_off(cfg, self.epochs)
        health: dict = {}
        train_loss = train_one_epoch(self.model, self.train_loader, self.criterion, self.optimizer, self.scheduler, self.scaler,
                                     self.device, epoch, self.rules, self.train_norm, self.scale,
                                     self.mixup if not (off and epoch >= off) else None, self.ema, self.step_model, frozen,
                                     cfg.freeze_epochs > 0 and epoch == cfg.freeze_epochs, health, f"epoch {epoch + 1}/{cfg.epochs}")
        train_loss = self.procs.mean(train_loss, len(self.train_loader.sampler))
        self.scheduler.step(epoch + 1)
        self._check(train_loss, health, epoch)
        row = {"epoch": epoch + 1, "train_loss": round(train_loss, 6),
               **({} if self.refit else {"valid_loss": round(self.valid_loss, 6), "metric": round(self.score, 6)}),
               "lr": max(g["lr"] for g in self.optimizer.param_groups), "time_s": 0.0, "mem_MiB": round(_memory_mib(self.device), 1),
               **({"weights": self.weights_from} if epoch == 0 else {})}  # where they came from: score.json says it
        for cb in callbacks:
            cb.on_row(self, row)
        row["time_s"] = round(time.perf_counter() - start, 2)
        self.state["history"].append(row)
        self.state["epoch"] = epoch + 1
        return row

    def _check(self, train_loss: float, health: dict, epoch: int) -> None:
        """The epoch's weights and loss finite (a skipped step said), then the validation."""
        try:
            why = divergence(self.model, train_loss, health)
            if why is None and health.get("skipped"):
                self.logger.warning(f"{self.name} epoch {epoch + 1}: {health['skipped']} of {health['steps']} step(s) had NaN or "
                                    f"inf gradients and were skipped")
            valid_start = time.perf_counter()
            if why is not None:
                raise Diverged(why)
            self.valid_loss, self.score, self.preds, self.logits = (float("nan"), None, None, None) if self.refit else \
                self.validate(self.eval_step)
            self.valid_s = time.perf_counter() - valid_start
        except Diverged as e:
            amp, _ = precision(self.cfg.amp_dtype, self.device)
            raise Diverged(f"{self.cfg.experiment} {self.name} diverged in epoch {epoch + 1}: {e}, at lr "
                           f"{self.optimizer.param_groups[0]['lr']:.3g} in {'fp32' if amp is None else str(amp).removeprefix('torch.')}. "
                           f"Nothing of it was kept as trained (no OOF or test predictions). Lower config key 'lr' (now "
                           f"{self.cfg.lr:g}), keep 'grad_clip' on (now {self.cfg.grad_clip:g}), or train in fp32 (amp_dtype: "
                           f"fp32); then run it again") from None


def create_callbacks(run: FoldRun, made_from: dict) -> list[Callback]:
    """The fold's callbacks, in the order they act after an epoch: the pacer plans the epochs,
    early stopping judges the epoch, checkpoints keep it, the log and W&B report it; the OOF
    writer acts at the end."""
    cfg, budgeted = run.cfg, bool(run.cfg.time_limit) and not run.cfg.debug
    callbacks: list[Callback] = [Pacer()] if budgeted else []
    callbacks += [EarlyStop(), Checkpoints(made_from), MetricsLog()]
    if run.ema is not None and not budgeted and not run.refit:  # the raw weights' score too: is the EMA helping?
        callbacks.append(EmaReport())
    if cfg.wandb and run.procs.main:
        callbacks.append(WandbLog())
    return callbacks + ([] if run.refit else [OofWriter()])


def fit_fold(cfg: CFG, folds: pd.DataFrame, fold: int | str, made_from: dict, procs: distributed.Processes,
             logger: logging.Logger, n_test: int = 0) -> None:
    """The training loop of one fold in this process (one of procs.world): the best and last
    checkpoints, metrics.jsonl, the OOF predictions and logits, written by rank 0. With
    time_limit, the fold's epochs are planned after its first (helpers.budget.fold_epochs;
    `n_test`: the test rows it will predict after training)."""
    run = FoldRun(cfg, folds, fold, procs, logger, n_test)
    run.resume(made_from)
    amp, needs_scaler = precision(run.cfg.amp_dtype, run.device)
    logger.info(f"{run.name}: {len(run.train_df)} train / {len(run.valid_df)} valid rows, {run.epochs} epochs on {run.device}"
                + (f" x {procs.world} processes" if procs.world > 1 else "")
                + ("" if amp is None else f", {str(amp).removeprefix('torch.')} autocast" + (" + GradScaler" if needs_scaler else ""))
                + (", channels_last" if run.nhwc else ""))
    callbacks = create_callbacks(run, made_from)
    for cb in callbacks:
        cb.on_fit_start(run)
    while run.state["epoch"] < run.last_epoch and run.state["bad_epochs"] < run.cfg.patience:
        row = run.run_epoch(callbacks)
        for cb in callbacks:
            cb.on_epoch_end(run, row)
    for cb in callbacks:
        cb.on_fit_end(run)
    procs.barrier()


# --- a fold, the refit, their test predictions ---------------------------------------------------
def train_fold(cfg: CFG, folds: pd.DataFrame, fold: int, test: pd.DataFrame | None = None,
               logger: logging.Logger | None = None) -> dict:
    """Train one fold (in cfg.ddp processes when above 1) and predict the test set with it. An
    up-to-date fold is kept (unless cfg.retrain), only its test predictions redone if the test
    set changed; a killed run resumes from last.pt. Returns {'fold', 'score', 'best_epoch',
    'history'}."""
    logger = logger or logging.getLogger("kaggle")
    why = "retrain is set" if cfg.retrain else freshness.stale(cfg, "train", fold)
    best, why = _kept(artifacts.checkpoint_path(cfg, fold), why)
    if why is None:
        logger.info(f"fold {fold}: up to date (score {best['score']:.5f}); set retrain=True to train it again")
        if test is not None and (test_why := freshness.stale(cfg, "test", fold)):
            logger.info(f"fold {fold}: predicting the test set again: {test_why}")
            predict_test(cfg, best, test, fold, logger)
        return {"fold": fold, "score": best["score"], "best_epoch": best["epoch"], "history": best["history"], "skipped": True}
    logger.info(f"fold {fold}: training: {why}")
    with freshness.build(cfg, "train", fold) as made_from:  # recorded after every file of the fold: then it counts as done
        _fit(cfg, folds, fold, made_from, logger, 0 if test is None else len(test))
    best = artifacts.load_checkpoint(artifacts.checkpoint_path(cfg, fold))
    if test is not None:
        _timed_test(cfg, best, test, fold, logger)
    logger.info(f"fold {fold}: best {cfg.metric} {best['score']:.5f} at epoch {best['epoch']}")
    return {"fold": fold, "score": best["score"], "best_epoch": best["epoch"], "history": best["history"]}


def _kept(path, why: str | None) -> tuple[dict | None, str | None]:
    """(the checkpoint of a model that is up to date, None), or (None, why it is trained again):
    stale, or a checkpoint this version does not load (an older version's pickled objects)."""
    if why is not None:
        return None, why
    try:
        return artifacts.load_checkpoint(path), None
    except ValueError as e:
        return None, str(e)


def _fit(cfg: CFG, folds: pd.DataFrame, fold: int | str, made_from: dict, logger: logging.Logger, n_test: int) -> None:
    """fit_fold in this process, or in cfg.ddp processes (DistributedDataParallel)."""
    if cfg.ddp > 1:
        logger.info(f"{artifacts.fold_name(fold)}: {cfg.ddp} processes (DistributedDataParallel)")
        distributed.launch(_ddp_worker, cfg.ddp, to_dict(cfg), folds, fold, made_from, str(artifacts.log_path(cfg)), n_test)
    else:
        device = get_device(cfg.device)
        setup_device(device)
        fit_fold(cfg, folds, fold, made_from, distributed.Processes(device), logger, n_test)


def _ddp_worker(cfg_dict: dict, folds: pd.DataFrame, fold: int | str, made_from: dict, log_file: str, n_test: int = 0) -> None:
    """One of the processes torchrun's launcher started for a fold."""
    procs = distributed.start()
    try:
        logger = get_logger("kaggle", log_file) if procs.main else distributed.quiet_logger(procs.rank, logging.getLogger("kaggle"))
        fit_fold(cfg_from_dict(cfg_dict), folds, fold, made_from, procs, logger, n_test)
    finally:
        distributed.stop()


def _timed_test(cfg: CFG, best: dict, test: pd.DataFrame, fold: int | str, logger: logging.Logger) -> None:
    """predict_test, its seconds added to the model's in the time ledger."""
    start = time.perf_counter()
    predict_test(cfg, best, test, fold, logger)
    if cfg.time_limit:
        budget.add(cfg, budget.train_key(cfg, fold), time.perf_counter() - start)


def train_refit(cfg: CFG, folds: pd.DataFrame, test: pd.DataFrame | None = None,
                logger: logging.Logger | None = None) -> dict | None:
    """`refit`: one more model on every training row, for the epochs the CV chose (the folds'
    mean best epoch), then its test predictions (test_refit.csv), kept apart from the folds':
    it has no OOF rows, so no CV score. Up to date: kept, like a fold (its test predictions
    redone if the test set changed); a killed refit resumes from last.pt. Returns {'epochs',
    'history'}, or None when `refit` is off."""
    logger = logger or logging.getLogger("kaggle")
    if not artifacts.refit_on(cfg):  # off, or the experiment's fold CNNs are not blended (features_from: pretrained)
        return None
    why = freshness.todo(cfg, "refit", [None], cfg.retrain).get(None)  # every fold first: it trains for their mean best epoch
    path = artifacts.checkpoint_path(cfg, artifacts.REFIT)
    best, why = _kept(path, why)
    if why is None:
        logger.info(f"refit: up to date ({best['epoch']} epochs on all rows); set retrain=True to train it again")
        if test is not None and (test_why := freshness.stale(cfg, "refit_test")):
            logger.info(f"refit: predicting the test set again: {test_why}")
            predict_test(cfg, best, test, artifacts.REFIT, logger)
        return {"epochs": best["epoch"], "history": best["history"], "skipped": True}
    epochs = budget.refit_epochs(cfg)
    # the folds' own schedule: with time_limit they ran their planned schedules to the end (the
    # refit's is as long); else the refit follows the folds' schedule of `epochs` and stops at
    # their mean best epoch, so its learning rate, Mixup and EMA are those the CV judged
    logger.info(f"refit: training on all {len(folds)} rows for {epochs} epochs (the folds' mean "
                + ("planned epochs, their schedule" if cfg.time_limit else
                   f"best epoch, on their schedule of {cfg.epochs} epochs") + f"): {why}")
    run = dataclasses.replace(cfg, epochs=epochs, patience=max(cfg.patience, epochs)) if cfg.time_limit else \
        dataclasses.replace(cfg, stop_after=epochs, patience=max(cfg.patience, cfg.epochs))
    try:
        with freshness.build(cfg, "refit") as made_from:  # of the settings as written, before the epochs are set
            _fit(run, folds, artifacts.REFIT, made_from, logger, 0 if test is None else len(test))
    except budget.NoTime as e:
        logger.warning(f"refit: skipped, {e}; the ensemble uses the folds alone (a later run with time to spare trains it)")
        return None
    best = artifacts.load_checkpoint(path)
    if test is not None:
        _timed_test(cfg, best, test, artifacts.REFIT, logger)
    logger.info(f"refit: {best['epoch']} epochs on all rows; its test predictions: "
                f"{artifacts.predictions_path(cfg, 'test', artifacts.REFIT)} (no CV score: it saw every row)")
    return {"epochs": best["epoch"], "history": best["history"]}


def predict_test(cfg: CFG, best: dict, test: pd.DataFrame, fold: int | str, logger: logging.Logger) -> None:
    """Fold k's (or the refit's) test predictions from its checkpoint, recorded as made from it."""
    kind, part = ("refit_test", None) if fold == artifacts.REFIT else ("test", fold)
    with freshness.build(cfg, kind, part):
        device = get_device(cfg.device)
        model = load_model(best, device, cfg)
        scale = TargetScale(*best["target_range"]) if best.get("target_range") else None
        loader = create_loader(cfg, test, train=False, cache=create_cache(cfg, test["path"].tolist(), logger))
        preds = predict(model, loader, device, rules_of(cfg, device), InputNorm(input_stats(cfg), device, channels_last(cfg, device)),
                        scale=scale)
        columns = task_of(artifacts.checkpoint_config(best)).pred_columns(best["classes"])
        artifacts.write_predictions(cfg, "test", artifacts.frame_predictions(test[cfg.id_col], preds, cfg, columns), fold)
