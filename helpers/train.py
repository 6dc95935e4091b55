"""Training one fold: explicit `train_one_epoch`, `validate`, `predict`, `train_fold`.

From timm: the optimizer and scheduler (create_optimizer_v2 / create_scheduler_v2, layer-wise
LR decay), Mixup/CutMix, EMA weights (ModelEmaV3). Also gradient accumulation and clipping,
AMP on CUDA (bf16 where supported, else fp16 with a GradScaler), channels_last, torch.compile,
progressive unfreezing, TTA, early stopping on the CV metric. Per fold it writes, under
models/<exp>/: fold{k}/best.pt, fold{k}/last.pt (resumable, every epoch), fold{k}/metrics.jsonl
(one line per epoch), oof_fold{k}.csv (the fold's validation rows), oof_logits_fold{k}.npy (their
raw outputs) and test_fold{k}.csv. `finalize_experiment` combines the folds into oof.csv,
oof_logits.npy, test.csv and score.json.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.data import Mixup
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .cache import build_cache
from .config import CFG, to_dict
from .data import ImageDataset, get_classes, get_transforms, input_stats, pred_columns, to_model_input
from .losses import TargetScale, loss_kind, make_criterion
from .models import create_model
from .utils import atomic_save, atomic_save_npy, atomic_to_csv, atomic_write_text, get_device, get_score, is_better, seed_everything

# settings that do not change what a fold learns: a finished fold trained under other values is kept
RUN_ONLY_KEYS = {"folds", "retrain", "num_workers", "device", "debug_rows", "submission_name", "ensemble_iters",
                 "cache", "cache_dir", "wandb", "wandb_project", "compile", "models_dir", "submissions_dir"}
RUN_ONLY_KEYS |= {k for k in to_dict(CFG()) if k.startswith(("lgbm_", "stack", "ensemble_"))} | {"features_from"}
HEAD_PREFIXES = ("head.", "classifier.")  # parameters of the head; the rest is the backbone


def num_outputs(cfg: CFG, classes: list | None) -> int:
    return 1 if cfg.task == "regression" else len(classes)


def _worker_init(worker_id: int) -> None:
    """Each DataLoader worker gets its own augmentation stream, derived from the loader's seed."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def make_loader(cfg: CFG, df: pd.DataFrame, train: bool, seed: int = 0, cache=None) -> DataLoader:
    """A DataLoader over df's images; train loaders shuffle and augment, reproducibly per `seed`."""
    targets = df["target"].to_numpy() if "target" in df else None
    dataset = ImageDataset(df["path"].tolist(), targets, get_transforms(cfg, train), cfg.in_chans, cache)
    dataset.transform.set_random_seed(seed)  # used as is when num_workers == 0
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if cfg.num_workers > 0 else None,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),
    )


def autocast(cfg: CFG, device: torch.device):
    """bf16 autocast on CUDA where supported, fp16 otherwise; off on CPU/MPS or with amp off."""
    if not (cfg.amp and device.type == "cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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
        head = [(n, p) for n, p in model.named_parameters() if n.startswith(HEAD_PREFIXES)]
    else:  # e.g. the hybrid model: everything but the classifier is the backbone
        body = [p for n, p in model.named_parameters() if not n.startswith(HEAD_PREFIXES)]
        groups = [{"params": [p for p in body if p.ndim > 1], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in body if p.ndim <= 1], "weight_decay": 0.0}]
        head = [(n, p) for n, p in model.named_parameters() if n.startswith(HEAD_PREFIXES)]
    for g in groups:
        g["lr_scale"] = g.get("lr_scale", 1.0) * cfg.backbone_lr_scale
    groups += [{"params": [p for _, p in head if p.ndim > 1], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
               {"params": [p for _, p in head if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Progressive unfreezing: the backbone frozen (or not); the head always trains."""
    for name, p in model.named_parameters():
        if not name.startswith(HEAD_PREFIXES):
            p.requires_grad_(trainable)


def loss_targets(targets: torch.Tensor, cfg: CFG, scale: TargetScale | None) -> torch.Tensor:
    """What the loss compares with: class indices (or soft targets), or the target in [0, 1]."""
    return scale.to01(targets.float()) if cfg.task == "regression" else targets


def to_predictions(outputs: torch.Tensor, cfg: CFG, scale: TargetScale | None) -> torch.Tensor:
    """Raw outputs -> class probabilities, or the regression value on the original scale."""
    if cfg.task == "regression":
        return scale.from_outputs(outputs, loss_kind(cfg))
    return outputs.float().softmax(1)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, cfg: CFG, device, epoch: int,
                    scale: TargetScale | None = None, mixup: Mixup | None = None, ema: ModelEmaV3 | None = None,
                    step_model: nn.Module | None = None) -> float:
    """One pass over the training data; returns the mean loss. `step_model` is the module
    that runs the forward pass (the torch.compile'd model), `model` the one whose weights
    are clipped and averaged."""
    step_model = step_model if step_model is not None else model
    model.train()
    total = torch.zeros((), device=device)
    count, accum = 0, cfg.grad_accum
    updates = epoch * (len(loader) // accum)
    stats = input_stats(cfg)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, mininterval=1.0)
    for step, (images, targets) in enumerate(bar, 1):
        images = model_input(images, cfg, device, stats)
        targets = loss_targets(targets.to(device, non_blocking=True), cfg, scale)
        if mixup is not None:
            images, targets = mixup(images, targets.long())
        with autocast(cfg, device):
            loss = criterion(step_model(images).float(), targets)
        if (step - 1) % accum == 0:  # first micro-batch of a step; here, not after the step, lets
            optimizer.zero_grad(set_to_none=True)  # backward reuse the old gradients' memory (10% on CPU)
        scaler.scale(loss / accum if accum > 1 else loss).backward()
        if step % accum == 0 or step == len(loader):
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            updates += 1
            scheduler.step_update(updates)
            if ema is not None:
                ema.update(model, step=updates)
        total += loss.detach() * len(images)
        count += len(images)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{total.item() / count:.4f}", refresh=False)
    return total.item() / max(count, 1)


def model_input(images: torch.Tensor, cfg: CFG, device, stats: tuple | None = None) -> torch.Tensor:
    """A loader's batch on the device, normalised, in the configured memory format."""
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    images = to_model_input(images.to(device, non_blocking=True), stats or input_stats(cfg))
    return images.contiguous(memory_format=memory_format)


@torch.no_grad()
def predict_batch(model, images: torch.Tensor, cfg: CFG, device, scale: TargetScale | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions averaged over the cfg.tta flips, raw outputs of the unflipped images) of a
    batch already on the device (model_input)."""
    with autocast(cfg, device):
        out = model(images)
        preds = to_predictions(out, cfg, scale)
        for flip in cfg.tta:
            preds += to_predictions(model(images.flip(3 if flip == "hflip" else 2)), cfg, scale)
    return preds / (1 + len(cfg.tta)), out


@torch.no_grad()
def predict(model, loader, cfg: CFG, device, criterion=None, features: bool = False, scale: TargetScale | None = None):
    """Predictions (probabilities / values, averaged over cfg.tta flips), or embeddings with
    features=True. With a criterion, also the mean loss and the raw outputs (logits) of the
    unflipped images: (preds, loss, logits)."""
    model.eval()
    outs, logits, total, count = [], [], 0.0, 0
    stats = input_stats(cfg)
    for images, targets in tqdm(loader, desc="embed" if features else "predict", leave=False, mininterval=1.0):
        images = model_input(images, cfg, device, stats)
        if features:
            with autocast(cfg, device):
                outs.append(model.features(images).float().cpu())
            continue
        preds, out = predict_batch(model, images, cfg, device, scale)
        if criterion is not None:
            total += criterion(out.float(), loss_targets(targets.to(device), cfg, scale)).item() * len(images)
            count += len(images)
            logits.append(out.float().cpu())
        outs.append(preds.cpu())
    preds = torch.cat(outs).numpy()
    return (preds, total / max(count, 1), torch.cat(logits).numpy()) if criterion is not None else preds


def validate(model, loader, criterion, cfg: CFG, device, targets: np.ndarray, scale: TargetScale | None = None):
    """Validation loss, metric, predictions and logits."""
    preds, loss, logits = predict(model, loader, cfg, device, criterion, scale=scale)
    return loss, get_score(cfg.metric, targets, preds), preds, logits


def _memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def fold_dir(cfg: CFG, fold: int) -> Path:
    return cfg.exp_dir / f"fold{fold}"


def _same_run(saved: dict, cfg: CFG) -> bool:
    now = to_dict(cfg)
    return all(saved.get(k) == v for k, v in now.items() if k not in RUN_ONLY_KEYS)


def fold_is_done(cfg: CFG, fold: int) -> bool:
    """A fold is done when its OOF file exists and its best.pt was trained with this config."""
    best = fold_dir(cfg, fold) / "best.pt"
    if not (cfg.exp_dir / f"oof_fold{fold}.csv").exists() or not best.exists():
        return False
    return _same_run(torch.load(best, map_location="cpu", weights_only=False)["cfg"], cfg)


def frame_predictions(ids: pd.Series, preds: np.ndarray, cfg: CFG, classes: list | None) -> pd.DataFrame:
    """id + one column per class probability (or `pred`)."""
    cols = pred_columns(cfg, classes)
    out = pd.DataFrame(preds.reshape(len(ids), len(cols)), columns=cols)
    out.insert(0, cfg.id_col, ids.to_numpy())
    return out


def _wandb_run(cfg: CFG, fold: int):
    """A W&B run when cfg.wandb (offline without WANDB_API_KEY); None otherwise."""
    if not cfg.wandb:
        return None
    try:
        import wandb
    except ImportError as e:
        raise ImportError("config key 'wandb' is on but wandb is not installed: pip install wandb") from e
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project=cfg.wandb_project, name=f"{cfg.experiment}_fold{fold}", config=to_dict(cfg),
                      mode=mode, dir=str(cfg.exp_dir), reinit=True)


def train_fold(cfg: CFG, folds: pd.DataFrame, fold: int, test: pd.DataFrame | None = None,
               logger: logging.Logger | None = None) -> dict:
    """Train one fold; resumes from last.pt when a killed run left one, skips a finished fold
    (unless cfg.retrain). Returns {'fold', 'score', 'best_epoch', 'history'}."""
    logger = logger or logging.getLogger("kaggle")
    out_dir = fold_dir(cfg, fold)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.retrain and fold_is_done(cfg, fold):
        best = torch.load(out_dir / "best.pt", map_location="cpu", weights_only=False)
        logger.info(f"fold {fold}: already trained (score {best['score']:.5f}); set retrain=True to train again")
        return {"fold": fold, "score": best["score"], "best_epoch": best["epoch"], "history": best["history"], "skipped": True}

    device = get_device(cfg.device)
    classes = get_classes(folds, cfg) if cfg.task == "classification" else None
    scale = TargetScale(folds["target"].min(), folds["target"].max()) if cfg.task == "regression" else None
    train_df = folds[folds["fold"] != fold].reset_index(drop=True)
    if cfg.sampling_ratio < 1:
        train_df = train_df.sample(frac=cfg.sampling_ratio, random_state=cfg.seed + fold).reset_index(drop=True)
    valid_df = folds[folds["fold"] == fold].reset_index(drop=True)
    epochs = 1 if cfg.debug else cfg.epochs
    n_out = num_outputs(cfg, classes)
    seed_everything(cfg.seed + fold)

    model = create_model(cfg, n_out).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model
    criterion = make_criterion(cfg, train_df["target"].to_numpy(), n_out).to(device)
    optimizer = create_optimizer_v2(param_groups(model, cfg), opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(len(train_df) // cfg.batch_size // cfg.grad_accum, 1)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.scheduler, num_epochs=epochs, warmup_epochs=min(cfg.warmup_epochs, epochs - 1),
                                       min_lr=cfg.min_lr, warmup_lr=cfg.lr * 0.01, step_on_epochs=False, updates_per_epoch=steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    mixup = None
    if cfg.mixup_alpha or cfg.cutmix_alpha:
        mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mixup_prob,
                      label_smoothing=cfg.label_smoothing, num_classes=n_out)
    train_cache = build_cache(cfg, folds["path"].tolist(), logger)
    valid_loader = make_loader(cfg, valid_df, train=False, cache=train_cache)

    state = {"epoch": 0, "best_score": None, "best_epoch": -1, "bad_epochs": 0, "history": [], "best_preds": None,
             "best_logits": None}
    last_path = out_dir / "last.pt"
    if last_path.exists() and not cfg.retrain:
        last = torch.load(last_path, map_location="cpu", weights_only=False)
        if _same_run(last["cfg"], cfg):
            model.load_state_dict(last["model"])
            optimizer.load_state_dict(last["optimizer"])
            scheduler.load_state_dict(last["scheduler"])
            scaler.load_state_dict(last["scaler"])
            if ema is not None:
                ema.load_state_dict(last["ema"])
            state = last["state"]
            logger.info(f"fold {fold}: resuming from {last_path} after epoch {state['epoch']}")
        else:
            logger.info(f"fold {fold}: {last_path} was made with another config; starting over")

    logger.info(f"fold {fold}: {len(train_df)} train / {len(valid_df)} valid rows, {epochs} epochs on {device}")
    valid_targets = valid_df["target"].to_numpy()
    wandb_run = _wandb_run(cfg, fold)
    for epoch in range(state["epoch"], epochs):
        if state["bad_epochs"] >= cfg.patience:
            break
        start = time.perf_counter()
        epoch_seed = cfg.seed * 1000 + fold * 100 + epoch
        seed_everything(epoch_seed)  # every epoch's randomness from its own seed: a resumed run matches
        set_backbone_trainable(model, epoch >= cfg.freeze_epochs)
        train_loader = make_loader(cfg, train_df, train=True, seed=epoch_seed, cache=train_cache)
        mix = mixup if mixup is not None and not (cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch) else None
        train_loss = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, scaler, cfg, device, epoch,
                                     scale, mix, ema, step_model)
        scheduler.step(epoch + 1)
        eval_model = ema.module if ema is not None else model
        valid_loss, score, preds, logits = validate(eval_model, valid_loader, criterion, cfg, device, valid_targets, scale)
        row = {"epoch": epoch + 1, "train_loss": round(train_loss, 6), "valid_loss": round(valid_loss, 6),
               "metric": round(score, 6), "lr": max(g["lr"] for g in optimizer.param_groups),
               "time_s": round(time.perf_counter() - start, 2), "mem_MiB": round(_memory_mib(device), 1)}
        state["history"].append(row)
        improved = is_better(cfg.metric, score, state["best_score"])
        if improved:
            state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0, best_preds=preds, best_logits=logits)
            atomic_save({"model": eval_model.state_dict(), "cfg": to_dict(cfg), "classes": classes, "epoch": epoch + 1,
                         "score": score, "history": state["history"], "num_features": model.num_features,
                         "target_range": (scale.low, scale.high) if scale else None}, out_dir / "best.pt")
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                     "state": state, "cfg": to_dict(cfg)}, last_path)
        atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))
        if wandb_run is not None:
            wandb_run.log(row)
        logger.info(f"fold {fold} epoch {epoch + 1}/{epochs}: train_loss {train_loss:.4f} valid_loss {valid_loss:.4f} "
                    f"{cfg.metric} {score:.5f}{' *' if improved else ''} ({row['time_s']:.1f}s)")
    if wandb_run is not None:
        wandb_run.finish()

    oof = frame_predictions(valid_df[cfg.id_col], state["best_preds"], cfg, classes)
    oof.insert(1, cfg.target_col, valid_df[cfg.target_col].to_numpy())
    oof.insert(2, "fold", fold)
    best = torch.load(out_dir / "best.pt", map_location="cpu", weights_only=False)
    best["history"] = state["history"]
    atomic_save(best, out_dir / "best.pt")
    if test is not None:
        model.load_state_dict(best["model"])
        test_cache = build_cache(cfg, test["path"].tolist(), logger)
        test_preds = predict(model, make_loader(cfg, test, train=False, cache=test_cache), cfg, device, scale=scale)
        atomic_to_csv(frame_predictions(test[cfg.id_col], test_preds, cfg, classes), cfg.exp_dir / f"test_fold{fold}.csv")
    logits_path = cfg.exp_dir / f"oof_logits_fold{fold}.npy"  # raw outputs, rows as in oof_fold{k}.csv
    if state.get("best_logits") is not None:
        atomic_save_npy(state["best_logits"].astype(np.float32), logits_path)
    else:  # resumed from a last.pt that kept no logits: never leave an earlier run's file beside this OOF
        logits_path.unlink(missing_ok=True)
    atomic_to_csv(oof, cfg.exp_dir / f"oof_fold{fold}.csv")  # last: its presence marks the fold done
    logger.info(f"fold {fold}: best {cfg.metric} {state['best_score']:.5f} at epoch {state['best_epoch']}")
    return {"fold": fold, "score": state["best_score"], "best_epoch": state["best_epoch"], "history": state["history"]}


def finalize_experiment(cfg: CFG, logger: logging.Logger | None = None) -> dict | None:
    """When every fold of cfg.fold_ids is done: oof.csv (all folds), test.csv (mean over folds)
    and score.json (CV over all OOF rows, and mean ± std over folds). None until then."""
    logger = logger or logging.getLogger("kaggle")
    paths = [cfg.exp_dir / f"oof_fold{k}.csv" for k in cfg.fold_ids]
    if not all(p.exists() for p in paths):
        return None
    oof = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    test_paths = [cfg.exp_dir / f"test_fold{k}.csv" for k in cfg.fold_ids]
    if all(p.exists() for p in test_paths):
        tests = [pd.read_csv(p) for p in test_paths]
        test = tests[0].copy()
        cols = [c for c in test.columns if c != cfg.id_col]
        test[cols] = np.mean([t[cols].to_numpy() for t in tests], axis=0)
        atomic_to_csv(test, cfg.exp_dir / "test.csv")
    atomic_to_csv(oof, cfg.exp_dir / "oof.csv")
    logit_paths = [cfg.exp_dir / f"oof_logits_fold{k}.npy" for k in cfg.fold_ids]
    if all(p.exists() for p in logit_paths):  # rows as in oof.csv
        atomic_save_npy(np.concatenate([np.load(p) for p in logit_paths]), cfg.exp_dir / "oof_logits.npy")
    wall = sum(sum(json.loads(line)["time_s"] for line in (fold_dir(cfg, k) / "metrics.jsonl").read_text().splitlines())
               for k in cfg.fold_ids if (fold_dir(cfg, k) / "metrics.jsonl").exists())
    return write_score(cfg, oof, logger, wall_s=wall)


def oof_targets(cfg: CFG, oof: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) of an OOF frame: class indices + probabilities, or values."""
    cols = [c for c in oof.columns if c.startswith("prob_")] or ["pred"]
    if cfg.task == "regression":
        return oof[cfg.target_col].to_numpy(float), oof["pred"].to_numpy(float)
    classes = [c[len("prob_"):] for c in cols]
    index = {c: i for i, c in enumerate(classes)}
    return oof[cfg.target_col].astype(str).map(index).to_numpy(), oof[cols].to_numpy(float)


def write_score(cfg: CFG, oof: pd.DataFrame, logger: logging.Logger | None = None, wall_s: float | None = None) -> dict:
    """score.json of an experiment: CV on all OOF rows, mean ± std over folds, wall time."""
    y_true, y_pred = oof_targets(cfg, oof)
    per_fold = [get_score(cfg.metric, y_true[oof["fold"] == k], y_pred[(oof["fold"] == k).to_numpy()])
                for k in sorted(oof["fold"].unique())]
    score = {"experiment": cfg.experiment, "metric": cfg.metric, "cv": get_score(cfg.metric, y_true, y_pred),
             "cv_mean": float(np.mean(per_fold)), "cv_std": float(np.std(per_fold)), "folds": per_fold,
             "wall_s": None if wall_s is None else round(wall_s, 1)}
    atomic_write_text(cfg.exp_dir / "score.json", json.dumps(score, indent=1))
    if logger:
        logger.info(f"{cfg.experiment}: CV {cfg.metric} {score['cv']:.5f} "
                    f"(folds {score['cv_mean']:.5f} ± {score['cv_std']:.5f})")
    return score
