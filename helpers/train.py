"""Training one fold: explicit `train_one_epoch`, `validate`, `predict`, `train_fold`.

From timm: the optimizer and scheduler (create_optimizer_v2 / create_scheduler_v2, layer-wise
LR decay), Mixup/CutMix, EMA weights (ModelEmaV3). Also gradient accumulation and clipping,
AMP on CUDA (bf16 where supported, else fp16 with a GradScaler), channels_last, torch.compile,
progressive unfreezing, TTA, early stopping on the CV metric. Per fold it writes (through
helpers.artifacts, which knows where): the best and the last (resumable) checkpoint, the
epochs' metrics, the fold's OOF predictions and their logits, and its test predictions.
`finalize_experiment` combines the folds into the experiment's OOF, test predictions and score.
A fold is trained again only when what it is made from changed (helpers.artifacts.stale).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import resource
import time
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import artifacts, budget, distributed
from .cache import create_cache
from .config import CFG, cfg_from_dict, to_dict
from .data import EpochSampler, ImageDataset, InputNorm, create_transforms, device_augment, get_classes, input_stats
from .losses import TargetScale, create_criterion, loss_kind
from .metrics import cross_fitted, get_score, is_better, label_weights
from .models import create_model, one_pixel_strided_convs
from .utils import channels_last, get_device, precision, seed_everything, setup_device

if TYPE_CHECKING:  # timm is imported where a fold trains: 04_stacking and 05_ensemble need not pay for it at start
    from timm.data import Mixup
    from timm.utils import ModelEmaV3

HEAD_PREFIXES = ("head.", "classifier.")  # parameters of the head; the rest is the backbone


def num_outputs(cfg: CFG, classes: list | None) -> int:
    return 1 if cfg.task == "regression" else len(classes)


def create_loader(cfg: CFG, df: pd.DataFrame, train: bool, seed: int = 0, cache=None, rank: int = 0,
                  world: int = 1) -> DataLoader:
    """A DataLoader over df's images (this process's share of them with several: `rank` of
    `world`), built once per fold (persistent workers). A training loader shuffles and augments
    from the seed of its EpochSampler: `loader.sampler.set_epoch` before each epoch gives that
    epoch's order and augmentations, the same in a resumed run."""
    targets = df["target"].to_numpy() if "target" in df else None
    dataset = ImageDataset(df["path"].tolist(), targets, create_transforms(cfg, train), cfg.in_chans, cache)
    sampler = EpochSampler(len(dataset), shuffle=train, batch_size=cfg.batch_size, rank=rank, world=world)
    sampler.set_epoch(seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=train and len(sampler) > cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=cfg.num_workers > 0,
    )


def autocast(cfg: CFG, device: torch.device, bf16: bool = True):
    """Autocast in the dtype helpers.utils.precision decides (none on MPS or with fp32).
    bf16=False, for embeddings (the stackers' inputs): fp32 where that dtype is bf16, which keeps
    8 bits of mantissa where the float16 they are stored in keeps 11 (LightGBM splits on them:
    the demo's resnet18 stacker scored 0.976 on bf16 embeddings, 0.980 on fp32 ones of the same
    models); fp16 autocast (a T4) stays. 03_features and the Predictor both embed so."""
    dtype, _ = precision(cfg.amp_dtype, device)
    if dtype is None or (dtype is torch.bfloat16 and not bf16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def optimizer_kwargs(cfg: CFG, device: torch.device) -> dict:
    """Fused Adam/AdamW on CUDA: one kernel for the update, and a GradScaler that needs not read
    its inf check back to the host every step (the fused optimizers take it on the device)."""
    return {"fused": True} if device.type == "cuda" and cfg.optimizer.lower() in ("adam", "adamw") else {}


def create_scaler(cfg: CFG, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only where helpers.utils.precision says fp16 needs one."""
    return torch.amp.GradScaler(device.type, enabled=precision(cfg.amp_dtype, device)[1])


def param_groups(model: nn.Module, cfg: CFG) -> list[dict]:
    """Weight-decay groups; the backbone's at backbone_lr_scale (times the layer-wise decay of
    timm's param_groups_layer_decay when cfg.layer_decay), the head's at the full LR."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    backbone = getattr(model, "backbone", None)
    if cfg.layer_decay and backbone is None:
        raise ValueError(f"config key 'layer_decay' needs a timm backbone (arch 'timm'), not arch '{cfg.arch}'")
    if backbone is not None:
        nwd = backbone.no_weight_decay() if hasattr(backbone, "no_weight_decay") else ()
        if cfg.layer_decay:
            groups = param_groups_layer_decay(backbone, cfg.weight_decay, nwd, layer_decay=cfg.layer_decay)
        else:
            groups = param_groups_weight_decay(backbone, cfg.weight_decay, no_weight_decay_list=nwd)
        head = [(n, p) for n, p in model.named_parameters() if n.startswith(HEAD_PREFIXES)]
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


def epoch_updates(batches: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch of this many batches (the last partial accumulation counts)."""
    return max(-(-batches // grad_accum), 1)


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Progressive unfreezing: the backbone frozen (or not); the head always trains."""
    for name, p in model.named_parameters():
        if not name.startswith(HEAD_PREFIXES):
            p.requires_grad_(trainable)


def loss_targets(targets: torch.Tensor, cfg: CFG, scale: TargetScale | None) -> torch.Tensor:
    """What the loss compares with: class indices (or soft targets), 0/1 per label, or the
    target in [0, 1]."""
    if cfg.task == "regression":
        return scale.to01(targets.float())
    return targets.float() if cfg.task == "multilabel" else targets


def to_predictions(outputs: torch.Tensor, cfg: CFG, scale: TargetScale | None) -> torch.Tensor:
    """Raw outputs -> class probabilities (each label's, for multi-label), or the regression
    value on the original scale."""
    if cfg.task == "regression":
        return scale.from_outputs(outputs, loss_kind(cfg))
    if cfg.task == "multilabel":
        return outputs.float().sigmoid()
    return outputs.float().softmax(1)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, cfg: CFG, device, epoch: int,
                    scale: TargetScale | None = None, mixup: Mixup | None = None, ema: ModelEmaV3 | None = None,
                    step_model: nn.Module | None = None, norm: InputNorm | None = None, frozen: bool = False,
                    warm_backbone: bool = False, health: dict | None = None) -> float:
    """One pass over the training data; returns the mean loss. `step_model` is the module
    that runs the forward pass (the torch.compile'd model), `model` the one whose weights
    are clipped and averaged. Nothing in a step waits for a GPU (the loss is summed there and
    read once, at the end). `frozen`: the backbone's BatchNorm layers stay in eval mode;
    `warm_backbone`: its LR ramps up over this epoch (the first after unfreezing).

    A step whose gradients are not finite is skipped, as a GradScaler skips one, wherever that
    costs no wait: on a CPU (where the host is the device) and with fp16's GradScaler. On a
    GPU without one, the fold loop checks the loss and weights after the epoch (a wait per
    epoch, not per step). `health` gets the count of skipped steps ('skipped') and of steps."""
    step_model = step_model if step_model is not None else model
    model.train()
    if frozen:
        freeze_batchnorm(model)
    norm = norm or InputNorm(input_stats(cfg), device, channels_last(cfg, device))
    total = torch.zeros((), device=device)
    count, accum, skipped = 0, cfg.grad_accum, 0
    steps = epoch_updates(len(loader), accum)
    updates = epoch * steps
    check_steps = device.type == "cpu" and not scaler.is_enabled()  # reading the norm back costs nothing there
    if warm_backbone:
        _ramp_backbone(optimizer, 1 / steps)  # the first update of the epoch too
    for step, (images, targets) in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, mininterval=1.0), 1):
        images = norm(images)
        targets = loss_targets(targets.to(device, non_blocking=True), cfg, scale)
        if mixup is not None:  # timm's Mixup/CutMix; multi-hot targets are mixed as they are
            images, targets = mixup(images, targets if cfg.task == "multilabel" else targets.long())
        with autocast(cfg, device):
            loss = criterion(step_model(images).float(), targets)
        if (step - 1) % accum == 0:  # first micro-batch of a step; here, not after the step, lets
            optimizer.zero_grad(set_to_none=True)  # backward reuse the old gradients' memory (10% on CPU)
        scaler.scale(loss / accum if accum > 1 else loss).backward()
        if step % accum == 0 or step == len(loader):
            finite = True
            if cfg.grad_clip > 0 or check_steps:
                scaler.unscale_(optimizer)
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                finite = not check_steps or bool(torch.isfinite(grad_norm))
            if finite:
                scaler.step(optimizer)
            else:  # a NaN or inf gradient: this step is skipped, the weights stay as they were
                skipped += 1
            scaler.update()
            updates += 1
            scheduler.step_update(updates)
            if warm_backbone:  # the first epoch after unfreezing: the backbone's LR from ~0 up to its schedule
                _ramp_backbone(optimizer, min(1.0, (updates - epoch * steps + 1) / steps))
            if ema is not None and finite:
                ema.update(model, step=updates)
        total += loss.detach() * len(images)
        count += len(images)
    if health is not None:
        health.update(skipped=skipped, steps=steps)
    return total.item() / max(count, 1)


class Diverged(RuntimeError):
    """A fold's loss, gradients, weights or validation predictions stopped being finite numbers."""


def divergence(model: nn.Module, train_loss: float, health: dict) -> str | None:
    """What is not finite after an epoch (the mean training loss, every step's gradients, a
    weight, named), or None: read once per epoch."""
    if not np.isfinite(train_loss):
        return f"the training loss is {train_loss}"
    if health.get("steps") and health.get("skipped", 0) >= health["steps"]:
        return f"every one of its {health['steps']} steps had NaN or inf gradients (each was skipped)"
    params = [(n, p) for n, p in model.named_parameters()]
    finite = torch.stack([torch.isfinite(p).all() for _, p in params]).cpu().numpy()  # one wait for them all
    if not finite.all():
        bad = [n for (n, _), ok in zip(params, finite) if not ok]
        return f"{len(bad)} weight tensor(s) hold NaN or inf (e.g. {', '.join(bad[:3])})"
    return None


def _ramp_backbone(optimizer, factor: float) -> None:
    """The backbone's groups at this share of the LR the schedule gave them, for the next update."""
    for g in optimizer.param_groups:
        if g.get("backbone"):
            g["lr"] *= factor


def freeze_batchnorm(model: nn.Module) -> None:
    """The backbone's normalisation layers in eval mode: a frozen backbone keeps its running
    statistics too (model.train() would let them drift on the new data)."""
    for name, module in model.named_modules():
        if not name.startswith(HEAD_PREFIXES) and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def predict_batch(model, images: torch.Tensor, cfg: CFG, device, scale: TargetScale | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions averaged over the cfg.tta flips, raw outputs of the unflipped images) of a
    batch already on the device (InputNorm)."""
    with autocast(cfg, device):
        out = model(images)
        preds = to_predictions(out, cfg, scale)
        for flip in cfg.tta:
            preds += to_predictions(model(images.flip(3 if flip == "hflip" else 2)), cfg, scale)
    return preds / (1 + len(cfg.tta)), out


@torch.no_grad()
def predict(model, loader, cfg: CFG, device, criterion=None, features: bool = False, scale: TargetScale | None = None,
            norm: InputNorm | None = None):
    """Predictions (probabilities / values, averaged over cfg.tta flips), or embeddings with
    features=True. With a criterion, also the mean loss and the raw outputs (logits) of the
    unflipped images: (preds, loss, logits). Results stay on the device until the end."""
    model.eval()
    norm = norm or InputNorm(input_stats(cfg), device, channels_last(cfg, device))
    outs, logits, total, count = [], [], torch.zeros((), device=device), 0
    for images, targets in tqdm(loader, desc="embed" if features else "predict", leave=False, mininterval=1.0):
        images = norm(images)
        if features:  # kept on the device (half precision: they are saved as float16), copied once at the end
            with autocast(cfg, device, bf16=False):
                outs.append(model.features(images).half())
            continue
        preds, out = predict_batch(model, images, cfg, device, scale)
        if criterion is not None:
            total += criterion(out.float(), loss_targets(targets.to(device, non_blocking=True), cfg, scale)) * len(images)
            count += len(images)
            logits.append(out.float())
        outs.append(preds.float())
    preds = torch.cat(outs).float().cpu().numpy()
    if criterion is None:
        return preds
    return preds, total.item() / max(count, 1), torch.cat(logits).cpu().numpy()


def _memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _wandb_run(cfg: CFG, fold: int):
    """A W&B run when cfg.wandb (offline without WANDB_API_KEY); None otherwise."""
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError as e:
        raise ImportError("config key 'wandb' is on but wandb is not installed: pip install wandb") from e
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=cfg.wandb_project, name=f"{cfg.experiment}_{artifacts.fold_name(fold)}", config=to_dict(cfg),
                      mode=mode, dir=str(artifacts.exp_dir(cfg)), reinit=True)


def train_fold(cfg: CFG, folds: pd.DataFrame, fold: int, test: pd.DataFrame | None = None,
               logger: logging.Logger | None = None) -> dict:
    """Train one fold (in cfg.ddp processes when above 1) and predict the test set with it. An
    up-to-date fold is kept (unless cfg.retrain), only its test predictions redone if the test
    set changed; a killed run resumes from last.pt. Returns {'fold', 'score', 'best_epoch',
    'history'}."""
    logger = logger or logging.getLogger("kaggle")
    why = "retrain is set" if cfg.retrain else artifacts.stale(cfg, "train", fold)
    if why is None:
        best = artifacts.load_checkpoint(artifacts.checkpoint_path(cfg, fold))
        logger.info(f"fold {fold}: up to date (score {best['score']:.5f}); set retrain=True to train it again")
        if test is not None and (test_why := artifacts.stale(cfg, "test", fold)):
            logger.info(f"fold {fold}: predicting the test set again: {test_why}")
            predict_test(cfg, best, test, fold, logger)
        return {"fold": fold, "score": best["score"], "best_epoch": best["epoch"], "history": best["history"], "skipped": True}
    logger.info(f"fold {fold}: training: {why}")
    made_from = artifacts.fingerprint(cfg, "train", fold)
    _fit(cfg, folds, fold, made_from, logger, 0 if test is None else len(test))
    best = artifacts.load_checkpoint(artifacts.checkpoint_path(cfg, fold))
    artifacts.record(cfg, "train", fold, made_from)  # after every file of the fold: from now on it counts as done
    if test is not None:
        start = time.perf_counter()
        predict_test(cfg, best, test, fold, logger)
        if cfg.time_limit:
            budget.add(cfg, budget.train_key(cfg, fold), time.perf_counter() - start)
    logger.info(f"fold {fold}: best {cfg.metric} {best['score']:.5f} at epoch {best['epoch']}")
    return {"fold": fold, "score": best["score"], "best_epoch": best["epoch"], "history": best["history"]}


def _fit(cfg: CFG, folds: pd.DataFrame, fold: int | str, made_from: dict, logger: logging.Logger, n_test: int) -> None:
    """fit_fold in this process, or in cfg.ddp processes (DistributedDataParallel)."""
    if cfg.ddp > 1:
        logger.info(f"{artifacts.fold_name(fold)}: {cfg.ddp} processes (DistributedDataParallel)")
        distributed.launch(_ddp_worker, cfg.ddp, to_dict(cfg), folds, fold, made_from, str(artifacts.log_path(cfg)), n_test)
    else:
        device = get_device(cfg.device)
        setup_device(device)
        fit_fold(cfg, folds, fold, made_from, distributed.Processes(device), logger, n_test)


def cpu_precision(cfg: CFG, model: nn.Module, device: torch.device, logger: logging.Logger) -> CFG:
    """cfg, in fp32 on a CPU whose `auto` precision is bf16 when the model has a stride-2
    convolution that sees a 1x1 map (tiny images): oneDNN's bf16 weight gradient of one is
    sometimes NaN, differently from run to run (models.one_pixel_strided_convs). An explicit
    amp_dtype 'bf16' is kept, with a warning (such a step is skipped when it happens)."""
    if device.type != "cpu" or precision(cfg.amp_dtype, device)[0] is not torch.bfloat16:
        return cfg
    tiny = one_pixel_strided_convs(model, cfg.img_size, cfg.in_chans)
    if not tiny:
        return cfg
    why = (f"at {cfg.img_size} px, {tiny[0]} (a strided convolution) sees a 1x1 map, where oneDNN's bf16 weight "
           f"gradient is sometimes NaN")
    if cfg.amp_dtype == "bf16":
        logger.warning(f"amp_dtype bf16 kept as set, but {why} (a step with NaN gradients is skipped)")
        return cfg
    logger.info(f"fp32 on this CPU, not bf16: {why}")
    return dataclasses.replace(cfg, amp_dtype="fp32")


def mixup_off(cfg: CFG, epochs: int) -> int:
    """The epoch from which Mixup/CutMix stop: `mixup_off_epoch` when it is an epoch number, or
    under 1 that share of the epochs the schedule runs (a time-limited run plans them, a refit
    runs its own); 0: never."""
    share = cfg.mixup_off_epoch
    if not share:
        return 0
    return int(share) if share >= 1 else max(1, round(share * epochs))


def folds_epochs(cfg: CFG) -> float:
    """The epochs the CV chose: the mean of the folds' best epochs; with time_limit (no early
    stop: each fold's schedule was planned and run to its end), the mean of the epochs they ran."""
    if cfg.time_limit:
        counts = [len(artifacts.read_metrics(cfg, k)) for k in cfg.fold_ids]
    else:
        counts = [artifacts.load_checkpoint(artifacts.checkpoint_path(cfg, k))["epoch"] for k in cfg.fold_ids]
    return float(np.mean(counts))


def refit_epochs(cfg: CFG) -> int:
    """The refit's epochs: folds_epochs, rounded, times budget.HOLDOUT_REFIT in a holdout plan
    (the fold gives the CV score, the refit the submission), at most `epochs`."""
    return max(1, min(cfg.epochs, int(np.floor(folds_epochs(cfg) * budget.refit_x(cfg) + 0.5))))


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
    for k in cfg.fold_ids:
        artifacts.require(cfg, "train", k, "train every fold first: the refit trains for their mean best epoch")
    why = "retrain is set" if cfg.retrain else artifacts.stale(cfg, "refit")
    path = artifacts.checkpoint_path(cfg, artifacts.REFIT)
    if why is None:
        best = artifacts.load_checkpoint(path)
        logger.info(f"refit: up to date ({best['epoch']} epochs on all rows); set retrain=True to train it again")
        if test is not None and (test_why := artifacts.stale(cfg, "refit_test")):
            logger.info(f"refit: predicting the test set again: {test_why}")
            predict_test(cfg, best, test, artifacts.REFIT, logger)
        return {"epochs": best["epoch"], "history": best["history"], "skipped": True}
    made_from = artifacts.fingerprint(cfg, "refit")  # of the settings as written, before the epochs are set
    epochs = refit_epochs(cfg)
    logger.info(f"refit: training on all {len(folds)} rows for {epochs} epochs (the folds' mean "
                f"{'planned epochs' if cfg.time_limit else 'best epoch'}"
                f"{f' x{budget.refit_x(cfg):g}: a holdout plan' if budget.refit_x(cfg) != 1 else ''}): {why}")
    run = dataclasses.replace(cfg, epochs=epochs, patience=max(cfg.patience, epochs))
    try:
        _fit(run, folds, artifacts.REFIT, made_from, logger, 0 if test is None else len(test))
    except budget.NoTime as e:
        logger.warning(f"refit: skipped, {e}; the ensemble uses the folds alone (a later run with time to spare trains it)")
        return None
    best = artifacts.load_checkpoint(path)
    artifacts.record(cfg, "refit", made_from=made_from)
    if test is not None:
        start = time.perf_counter()
        predict_test(cfg, best, test, artifacts.REFIT, logger)
        if cfg.time_limit:
            budget.add(cfg, budget.train_key(cfg, artifacts.REFIT), time.perf_counter() - start)
    logger.info(f"refit: {best['epoch']} epochs on all rows; its test predictions: "
                f"{artifacts.predictions_path(cfg, 'test', artifacts.REFIT)} (no CV score: it saw every row)")
    return {"epochs": best["epoch"], "history": best["history"]}


def _ddp_worker(cfg_dict: dict, folds: pd.DataFrame, fold: int | str, made_from: dict, log_file: str, n_test: int = 0) -> None:
    """One of the processes torchrun's launcher started for a fold."""
    import torch.distributed as dist

    from .utils import get_logger

    procs = distributed.start()
    try:
        logger = get_logger("kaggle", log_file) if procs.main else distributed.quiet_logger(procs.rank, logging.getLogger("kaggle"))
        fit_fold(cfg_from_dict(cfg_dict), folds, fold, made_from, procs, logger, n_test)
    finally:
        dist.destroy_process_group()


def validate(procs, model, loader, criterion, cfg: CFG, device, targets: np.ndarray, scale, norm, weights=None):
    """(loss, score, predictions, logits) over every process's share of the validation rows:
    gathered to rank 0, which scores them and tells the others (they get None for the rows).
    Multi-label scores use the thresholds that suit these rows (the model's reach: epochs are
    compared, the reported CV is cross-fitted later)."""
    preds, loss, logits = predict(model, loader, cfg, device, criterion, scale=scale, norm=norm)
    loss = procs.mean(loss, len(loader.sampler))
    preds, logits = procs.gather_rows(preds), procs.gather_rows(logits)
    bad = procs.broadcast(int((~np.isfinite(preds)).any(axis=tuple(range(1, preds.ndim))).sum()) if procs.main else None)
    if bad or not np.isfinite(loss):
        raise Diverged(f"the validation loss is {loss:.4g} and {bad} of its rows' predictions are NaN or inf")
    score = procs.broadcast(get_score(cfg.metric, targets, preds, weights=weights) if procs.main else None)
    return loss, score, preds, logits


def fit_fold(cfg: CFG, folds: pd.DataFrame, fold: int | str, made_from: dict, procs: distributed.Processes,
             logger: logging.Logger, n_test: int = 0) -> None:
    """The training loop of one fold in this process (one of procs.world): the best and last
    checkpoints, metrics.jsonl, the OOF predictions and logits, written by rank 0. With
    time_limit, the fold's epochs are planned after its first (helpers.budget.fold_epochs;
    `n_test`: the test rows it will predict after training). fold 'refit' (artifacts.REFIT):
    every row, no validation; its "best" checkpoint holds the weights after the last epoch."""
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    fold_start = time.perf_counter()
    device, world = procs.device, procs.world
    if cfg.batch_size % world:
        raise ValueError(f"config key 'batch_size' ({cfg.batch_size}) must split evenly among ddp={world} processes")
    if cfg.sync_bn and world > 1 and device.type != "cuda":
        raise ValueError("config key 'sync_bn': SyncBatchNorm needs GPUs (NCCL); turn it off on the CPU")
    local = dataclasses.replace(cfg, batch_size=cfg.batch_size // world)  # each process's share of the global batch
    classes = None if cfg.task == "regression" else get_classes(folds, cfg)
    scale = TargetScale(folds["target"].min(), folds["target"].max()) if cfg.task == "regression" else None
    refit = fold == artifacts.REFIT
    seed_id = cfg.n_folds if refit else fold  # the refit's randomness: unlike any fold's
    train_df = folds[folds["fold"] != fold].reset_index(drop=True)
    if cfg.sampling_ratio < 1:
        train_df = train_df.sample(frac=cfg.sampling_ratio, random_state=cfg.seed + seed_id).reset_index(drop=True)
    valid_df = folds[folds["fold"] == fold].reset_index(drop=True)
    epochs = 1 if cfg.debug else cfg.epochs
    n_out = num_outputs(cfg, classes)
    seed_everything((cfg.seed + seed_id) % 2**32)

    if cfg.compile:  # several folds in one process: each compiles afresh, none runs into dynamo's recompile limit
        torch._dynamo.reset()
    model = create_model(cfg, n_out).to(device)
    cfg = cpu_precision(cfg, model, device, logger)
    nhwc = channels_last(cfg, device)
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    step_model = procs.wrap(model)  # DistributedDataParallel with several processes
    step_model = torch.compile(step_model) if cfg.compile else step_model
    norm = InputNorm(input_stats(cfg), device, nhwc)  # built once, constants on the device
    train_norm = InputNorm(input_stats(cfg), device, nhwc, augment=device_augment(cfg))
    criterion = create_criterion(cfg, train_df["target"].to_numpy(), n_out, classes).to(device)
    optimizer = create_optimizer_v2(param_groups(model, cfg), opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    **optimizer_kwargs(cfg, device))
    if procs.main:  # one process builds the cache, the others then map it
        create_cache(cfg, folds["path"].tolist(), logger)
    procs.barrier()
    train_cache = create_cache(cfg, folds["path"].tolist(), logger)
    train_loader = create_loader(local, train_df, train=True, cache=train_cache, rank=procs.rank, world=world)  # once per fold
    valid_loader = None if refit else create_loader(local, valid_df, train=False, cache=train_cache, rank=procs.rank, world=world)
    steps = epoch_updates(len(train_loader), cfg.grad_accum)

    def schedule(n_epochs: int):  # timm's schedulers are functions of the update count: one can replace another mid-run
        return create_scheduler_v2(optimizer, sched=cfg.scheduler, num_epochs=n_epochs, warmup_epochs=min(cfg.warmup_epochs, n_epochs - 1),
                                   min_lr=cfg.min_lr, warmup_lr=cfg.lr * 0.01, step_on_epochs=False, updates_per_epoch=steps)[0]

    scheduler = schedule(epochs)
    scaler = create_scaler(cfg, device)
    # EMA with timm's warm-up: its decay grows with the steps taken, so the EMA that is validated
    # and saved follows the model early on instead of averaging in the untrained weights
    # (power 3/4, for the 10^4-10^5 steps of a Kaggle run; timm's 2/3 suits 10^6)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True, warmup_power=0.75) if cfg.ema else None
    eval_model = ema.module if ema is not None else model
    eval_step = torch.compile(eval_model) if cfg.compile else eval_model
    mixup = None
    if cfg.mixup_alpha or cfg.cutmix_alpha:
        mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mixup_prob,
                      label_smoothing=cfg.label_smoothing, num_classes=n_out, multi_label=cfg.task == "multilabel")

    name = "refit" if refit else f"fold {fold}"
    state = {"epoch": 0, "best_score": None, "best_epoch": -1, "bad_epochs": 0, "history": [], "best_preds": None,
             "best_logits": None}
    last_path, best_path = artifacts.checkpoint_path(cfg, fold, "last"), artifacts.checkpoint_path(cfg, fold)
    if last_path.exists() and not cfg.retrain:
        try:
            last = artifacts.load_checkpoint(last_path)
        except ValueError as e:  # an older version's, or not ours: never loaded, the fold starts over
            logger.warning(f"{name}: {e}")
            last = {}
        if last.get("made_from") == artifacts.digest(made_from):  # whatever the number of processes it was made with
            model.load_state_dict(last["model"])
            optimizer.load_state_dict(last["optimizer"])
            scheduler.load_state_dict(last["scheduler"])
            if last["scaler"] and scaler.is_enabled():  # a bf16 run has no scaler state: a T4 resumes with a fresh one
                scaler.load_state_dict(last["scaler"])
            if ema is not None:
                ema.load_state_dict(last["ema"])
            state = {**last["state"], **{k: None if last["state"].get(k) is None else np.asarray(last["state"][k])
                                         for k in ("best_preds", "best_logits")}}
            if state.get("planned_epochs"):  # time_limit: the plan this fold made after its first epoch
                epochs = state["planned_epochs"]
                scheduler = schedule(epochs)
                scheduler.load_state_dict(last["scheduler"])
            logger.info(f"{name}: resuming from {last_path} after epoch {state['epoch']}")
        else:
            logger.info(f"{name}: {last_path} was made from other settings or data; starting over")

    amp, needs_scaler = precision(cfg.amp_dtype, device)
    logger.info(f"{name}: {len(train_df)} train / {len(valid_df)} valid rows, {epochs} epochs on {device}"
                + (f" x {world} processes" if world > 1 else "")
                + ("" if amp is None else f", {str(amp).removeprefix('torch.')} autocast" + (" + GradScaler" if needs_scaler else ""))
                + (", channels_last" if nhwc else ""))
    valid_targets = None if refit else np.stack(valid_df["target"].to_numpy()) if cfg.task == "multilabel" else valid_df["target"].to_numpy()
    weights = label_weights(cfg.label_weights, classes) if cfg.task == "multilabel" else None
    wandb_run = _wandb_run(cfg, fold) if procs.main else None
    budgeted = bool(cfg.time_limit) and not cfg.debug
    fold_key = budget.train_key(cfg, fold)
    before = sum(r["time_s"] for r in state["history"]) + (time.perf_counter() - fold_start)  # a resumed fold's earlier epochs
    process_start = time.perf_counter()
    for epoch in range(state["epoch"], cfg.epochs if budgeted else epochs):
        if state["bad_epochs"] >= cfg.patience or epoch >= epochs:
            break
        start = time.perf_counter()
        epoch_seed = (cfg.seed * 1000 + seed_id * 100 + epoch) % 2**32
        seed_everything(epoch_seed)  # every epoch's randomness from its own seed: a resumed run matches
        frozen = epoch < cfg.freeze_epochs
        set_backbone_trainable(model, not frozen)
        train_loader.sampler.set_epoch(epoch_seed)
        off = mixup_off(cfg, epochs)
        mix = mixup if mixup is not None and not (off and epoch >= off) else None
        health: dict = {}
        train_loss = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, scaler, cfg, device, epoch,
                                     scale, mix, ema, step_model, train_norm, frozen=frozen,
                                     warm_backbone=cfg.freeze_epochs > 0 and epoch == cfg.freeze_epochs, health=health)
        train_loss = procs.mean(train_loss, len(train_loader.sampler))
        scheduler.step(epoch + 1)
        try:
            why = divergence(model, train_loss, health)
            if why is None and health.get("skipped"):
                logger.warning(f"{name} epoch {epoch + 1}: {health['skipped']} of {health['steps']} step(s) had NaN or inf "
                               f"gradients and were skipped")
            valid_start = time.perf_counter()
            if why is not None:
                raise Diverged(why)
            if refit:  # nothing held out: no score, the last epoch's weights are kept
                valid_loss, score, preds, logits = float("nan"), None, None, None
            else:
                valid_loss, score, preds, logits = validate(procs, eval_step, valid_loader, criterion, cfg, device,
                                                             valid_targets, scale, norm, weights)
        except Diverged as e:
            amp, _ = precision(cfg.amp_dtype, device)
            raise Diverged(f"{cfg.experiment} {name} diverged in epoch {epoch + 1}: {e}, at lr {optimizer.param_groups[0]['lr']:.3g} "
                           f"in {'fp32' if amp is None else str(amp).removeprefix('torch.')}. Nothing of it was kept as trained "
                           f"(no OOF or test predictions). Lower config key 'lr' (now {cfg.lr:g}), keep 'grad_clip' on (now "
                           f"{cfg.grad_clip:g}), or train in fp32 (amp_dtype: fp32); then run it again") from None
        valid_s = time.perf_counter() - valid_start
        row = {"epoch": epoch + 1, "train_loss": round(train_loss, 6),
               **({} if refit else {"valid_loss": round(valid_loss, 6), "metric": round(score, 6)}),
               "lr": max(g["lr"] for g in optimizer.param_groups), "time_s": 0.0, "mem_MiB": round(_memory_mib(device), 1)}
        if ema is not None and not budgeted and not refit:  # the raw weights' score too: is the EMA helping? (not on a budget)
            _, raw_score, _, _ = validate(procs, model, valid_loader, criterion, cfg, device, valid_targets, scale, norm, weights)
            row.update(metric_raw=round(raw_score, 6), metric_ema=round(score, 6), ema_decay=round(ema.get_decay(steps * (epoch + 1)), 6))
        row["time_s"] = round(time.perf_counter() - start, 2)
        state["history"].append(row)
        if budgeted and procs.main:
            budget.spend(cfg, fold_key, before + time.perf_counter() - process_start)
        # planned again from the second epoch: the first pays for start-up (CUDA's context, cuDNN's
        # autotuning, the workers; on a CPU the first pass over the cache and oneDNN's kernels: the
        # recipe's refit took 9.9 s, then 8.9 and 8.6 on average, and planned from the first it
        # ended 27 s early)
        # and from the fifth again, at the mean pace of the epochs after the first (the recipe's
        # refit, planned at its second epoch's 9.5 s, then ran 8.6 s on average and ended 40 s early)
        again = budgeted and epoch + 1 in budget.PLAN_AGAIN_AFTER and 0 < state.get("planned_after", 0) < epoch + 1
        if budgeted and (not state.get("planned_epochs") or again):  # after the timed first epoch: the epochs that fit
            pace = [r["time_s"] for r in state["history"][1:]] or [row["time_s"]]
            epoch_s = sum(pace) / len(pace)
            # its test predictions, at the validation's pace (the refit's: a third of a training step's)
            test_s = n_test * epoch_s / max(len(train_df), 1) / 3 if refit else n_test * valid_s / max(len(valid_df), 1)
            planned = budget.fold_epochs(cfg, fold, before + time.perf_counter() - process_start, epoch_s, test_s, logger,
                                         epochs_done=epoch + 1) if procs.main else None
            state["planned_epochs"] = epochs = int(procs.broadcast(planned))
            state["planned_after"] = epoch + 1
            if epoch == 0:
                state["first_slow"] = bool(procs.broadcast(budget.started_up(cfg, fold, row["time_s"]) if procs.main else None))
            # a refit cut short has no score to catch it: skipped, once its pace is known
            validated = folds_epochs(cfg) if refit else 0.0  # what the CV ran (a holdout plan's refit plans more)
            if refit and epochs < budget.REFIT_MIN_SHARE * validated and not (epoch == 0 and state["first_slow"]):
                artifacts.checkpoint_path(cfg, fold, "last").unlink(missing_ok=True)
                raise budget.NoTime(f"the time left gives it {epochs} epoch(s), less than {budget.REFIT_MIN_SHARE:.0%} "
                                    f"of the {validated:.0f} the folds ran")
            scheduler = schedule(epochs)
        improved = (epoch + 1 >= epochs) if refit else is_better(cfg.metric, score, state["best_score"])
        if improved:
            state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0, best_preds=preds, best_logits=logits)
            if procs.main:
                artifacts.save_checkpoint({"model": eval_model.state_dict(), "cfg": to_dict(cfg), "classes": classes,
                                           "epoch": epoch + 1, "score": score, "history": state["history"],
                                           "num_features": model.num_features,
                                           "target_range": (scale.low, scale.high) if scale else None}, best_path)
        elif not refit:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        if procs.main:
            artifacts.save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                       "ema": ema.state_dict() if ema is not None else None, "state": state,
                                       "cfg": to_dict(cfg), "made_from": artifacts.digest(made_from)}, last_path)
            artifacts.write_metrics(cfg, fold, state["history"])
        if wandb_run is not None:
            wandb_run.log(row)
        logger.info(f"{name} epoch {epoch + 1}/{epochs}: train_loss {train_loss:.4f} " + (
            "" if refit else f"valid_loss {valid_loss:.4f} {cfg.metric} {score:.5f}{' *' if improved else ''} ")
            + f"({row['time_s']:.1f}s)")
    if wandb_run is not None:
        wandb_run.finish()
    if procs.main:
        best = artifacts.load_checkpoint(best_path)
        best["history"] = state["history"]
        artifacts.save_checkpoint(best, best_path)
        if not cfg.keep_last:  # a finished fold keeps its best weights only: optimizer and EMA state are many MB
            last_path.unlink(missing_ok=True)
    if procs.main and not refit:  # the refit has no OOF rows
        oof = artifacts.frame_predictions(valid_df[cfg.id_col], state["best_preds"], cfg, classes)
        oof.insert(1, cfg.target_col, valid_df[cfg.target_col].to_numpy())
        oof.insert(2, "fold", fold)
        artifacts.save_logits(cfg, state.get("best_logits"), fold)  # None (resumed from a last.pt without them): no stale file
        artifacts.write_predictions(cfg, "oof", oof, fold)
    procs.barrier()


def load_model(ckpt: dict, device, runtime: CFG | None = None) -> nn.Module:
    """The model a checkpoint describes (its own config), with its weights, ready for inference;
    compiled when `runtime` (this run's config) says so."""
    model_cfg = artifacts.checkpoint_config(ckpt, runtime)
    no_download = dataclasses.replace(model_cfg, pretrained=False, pretrained_path="")  # the weights are in ckpt
    model = create_model(no_download, num_outputs(model_cfg, ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    if channels_last(model_cfg, device):
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device).eval()
    return torch.compile(model) if model_cfg.compile else model  # as in training: every path that runs the model


def predict_test(cfg: CFG, best: dict, test: pd.DataFrame, fold: int | str, logger: logging.Logger) -> None:
    """Fold k's (or the refit's) test predictions from its checkpoint, recorded as made from it."""
    stage, part = ("refit_test", None) if fold == artifacts.REFIT else ("test", fold)
    made_from = artifacts.fingerprint(cfg, stage, part)
    device = get_device(cfg.device)
    model = load_model(best, device, cfg)
    scale = TargetScale(*best["target_range"]) if best.get("target_range") else None
    loader = create_loader(cfg, test, train=False, cache=create_cache(cfg, test["path"].tolist(), logger))
    preds = predict(model, loader, cfg, device, scale=scale)
    artifacts.write_predictions(cfg, "test", artifacts.frame_predictions(test[cfg.id_col], preds, cfg, best["classes"]), fold)
    artifacts.record(cfg, stage, part, made_from)


def finalize_experiment(cfg: CFG, logger: logging.Logger | None = None) -> dict | None:
    """When every fold of cfg.fold_ids is trained and has predicted the test set: the
    experiment's OOF (all folds), test predictions (mean over folds), OOF logits and score.
    None until then; the recorded score when nothing changed since."""
    logger = logger or logging.getLogger("kaggle")
    with artifacts.decision():
        waiting = [k for k in cfg.fold_ids if artifacts.stale(cfg, "train", k) or artifacts.stale(cfg, "test", k)]
        if waiting:
            logger.info(f"{cfg.experiment}: folds {waiting} are not trained (or not up to date) yet")
            return None
        if artifacts.stale(cfg, "cv") is None:
            return artifacts.read_score(artifacts.exp_dir(cfg))
        made_from = artifacts.fingerprint(cfg, "cv")
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
    score = write_score(cfg, oof, logger, wall_s=wall)
    artifacts.record(cfg, "cv", made_from=made_from)
    return score


def write_score(cfg: CFG, oof: pd.DataFrame, logger: logging.Logger | None = None, wall_s: float | None = None,
                model: str | None = None) -> dict:
    """score.json of an experiment: CV on all OOF rows, mean ± std over folds, wall time, what
    made it (model, image size, epochs) and which data it belongs to."""
    y_true, y_pred = artifacts.oof_targets(cfg, oof)
    extra = {}
    if cfg.task == "multilabel":  # each fold judged with thresholds tuned on the other folds
        labels = [c[len("prob_"):] for c in oof.columns if c.startswith("prob_")]
        weights = label_weights(cfg.label_weights, labels)
        cv, per_fold, thresholds = cross_fitted(cfg.metric, y_true, y_pred, oof["fold"].to_numpy(), weights)
        prevalence = np.broadcast_to(y_true.mean(0), y_true.shape)  # what a model that saw no image could say
        baseline = cross_fitted(cfg.metric, y_true, prevalence, oof["fold"].to_numpy(), weights)[0]
        extra = {"thresholds": dict(zip(labels, map(float, thresholds))),  # tuned on every OOF row: for the test set
                 "baseline": baseline}
    else:
        per_fold = [get_score(cfg.metric, y_true[oof["fold"] == k], y_pred[(oof["fold"] == k).to_numpy()])
                    for k in sorted(oof["fold"].unique())]
        cv = get_score(cfg.metric, y_true, y_pred)
    cnn = model is None
    score = {"experiment": cfg.experiment, "metric": cfg.metric, "cv": cv, **extra,
             "cv_mean": float(np.mean(per_fold)), "cv_std": float(np.std(per_fold)), "folds": per_fold,
             "wall_s": None if wall_s is None else round(wall_s, 1),
             "model": (cfg.model_name if cfg.arch == "timm" else cfg.arch) if cnn else model,
             "img_size": cfg.img_size if cnn else None, "epochs": cfg.epochs if cnn else None,
             "data": artifacts.competition_digest(cfg)}
    artifacts.write_score(cfg, score)
    if logger:
        logger.info(f"{cfg.experiment}: CV {cfg.metric} {score['cv']:.5f} "
                    f"(folds {score['cv_mean']:.5f} ± {score['cv_std']:.5f})"
                    + (f"; per-label prevalence baseline {score['baseline']:.5f}" if "baseline" in score else ""))
    return score
