"""Training one fold: explicit `train_one_epoch`, `validate`, `predict`, `train_fold`.

AdamW and a cosine schedule with warm-up from timm, gradient clipping, AMP on CUDA, early
stopping on the CV metric. Per fold it writes, under models/<exp>/:
  fold{k}/best.pt, fold{k}/last.pt (resumable), fold{k}/metrics.jsonl (one line per epoch),
  oof_fold{k}.csv (the fold's validation rows) and test_fold{k}.csv.
`finalize_experiment` combines the folds into oof.csv, test.csv and score.json.
"""
from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import CFG, to_dict
from .data import ImageDataset, get_classes, get_transforms, pred_columns
from .models import create_model
from .utils import atomic_save, atomic_to_csv, atomic_write_text, get_device, get_score, is_better, seed_everything

# settings that do not change what a fold learns: a finished fold trained under other values is kept
RUN_ONLY_KEYS = {"folds", "retrain", "num_workers", "device", "debug_rows", "submission_name", "ensemble_iters"}
RUN_ONLY_KEYS |= {k for k in to_dict(CFG()) if k.startswith("lgbm_")}


def num_outputs(cfg: CFG, classes: list | None) -> int:
    return 1 if cfg.task == "regression" else len(classes)


def _worker_init(worker_id: int) -> None:
    """Each DataLoader worker gets its own augmentation stream, derived from the loader's seed."""
    info = torch.utils.data.get_worker_info()
    info.dataset.transform.set_random_seed(torch.initial_seed() % 2**32)


def make_loader(cfg: CFG, df: pd.DataFrame, train: bool, seed: int = 0) -> DataLoader:
    """A DataLoader over df's images; train loaders shuffle and augment, reproducibly per `seed`."""
    targets = df["target"].to_numpy() if "target" in df else None
    dataset = ImageDataset(df["path"].tolist(), targets, get_transforms(cfg, train), cfg.in_chans)
    dataset.transform.set_random_seed(seed)  # used as is when num_workers == 0
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=train,
        drop_last=train and len(dataset) > cfg.batch_size,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=_worker_init if cfg.num_workers > 0 else None,
        generator=generator,
    )


def autocast(cfg: CFG, device: torch.device):
    """bf16 autocast on CUDA where supported, fp16 otherwise; off on CPU/MPS or with amp off."""
    enabled = cfg.amp and device.type == "cuda"
    dtype = torch.bfloat16 if enabled and torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def make_criterion(cfg: CFG) -> nn.Module:
    return nn.MSELoss() if cfg.task == "regression" else nn.CrossEntropyLoss()


def loss_of(criterion: nn.Module, outputs: torch.Tensor, targets: torch.Tensor, cfg: CFG) -> torch.Tensor:
    if cfg.task == "regression":
        return criterion(outputs.squeeze(1).float(), targets.float())
    return criterion(outputs.float(), targets.long())


def to_predictions(outputs: torch.Tensor, cfg: CFG) -> torch.Tensor:
    """Raw outputs -> class probabilities, or the regression value."""
    return outputs.float().squeeze(1) if cfg.task == "regression" else outputs.float().softmax(1)


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, cfg, device, epoch, logger=None) -> float:
    """One pass over the training data; returns the mean loss."""
    model.train()
    total, count = 0.0, 0
    updates = epoch * len(loader)
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, mininterval=1.0)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(cfg, device):
            loss = loss_of(criterion, model(images), targets, cfg)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        updates += 1
        scheduler.step_update(updates)
        total += loss.item() * len(images)
        count += len(images)
        bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
    return total / max(count, 1)


@torch.no_grad()
def predict(model, loader, cfg: CFG, device, criterion=None, features: bool = False):
    """Predictions (probabilities / values), or embeddings with features=True, for a loader.
    With a criterion, also returns the mean loss: (preds, loss)."""
    model.eval()
    outs, total, count = [], 0.0, 0
    for images, targets in tqdm(loader, desc="embed" if features else "predict", leave=False, mininterval=1.0):
        images = images.to(device, non_blocking=True)
        with autocast(cfg, device):
            out = model.features(images) if features else model(images)
        if criterion is not None:
            total += loss_of(criterion, out, targets.to(device), cfg).item() * len(images)
            count += len(images)
        outs.append(out.float().cpu() if features else to_predictions(out, cfg).cpu())
    preds = torch.cat(outs).numpy()
    return (preds, total / max(count, 1)) if criterion is not None else preds


def validate(model, loader, criterion, cfg: CFG, device, targets: np.ndarray):
    """Validation loss, metric and predictions."""
    preds, loss = predict(model, loader, cfg, device, criterion)
    return loss, get_score(cfg.metric, targets, preds), preds


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
    train_df = folds[folds["fold"] != fold].reset_index(drop=True)
    valid_df = folds[folds["fold"] == fold].reset_index(drop=True)
    epochs = 1 if cfg.debug else cfg.epochs
    seed_everything(cfg.seed + fold)
    model = create_model(cfg, num_outputs(cfg, classes)).to(device)
    criterion = make_criterion(cfg)
    optimizer = create_optimizer_v2(model, opt="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(len(train_df) // cfg.batch_size, 1)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=min(cfg.warmup_epochs, epochs - 1),
                                       min_lr=cfg.min_lr, warmup_lr=cfg.lr * 0.01, step_on_epochs=False, updates_per_epoch=steps)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())
    valid_loader = make_loader(cfg, valid_df, train=False)

    state = {"epoch": 0, "best_score": None, "best_epoch": -1, "bad_epochs": 0, "history": [], "best_preds": None}
    last_path = out_dir / "last.pt"
    if last_path.exists() and not cfg.retrain:
        last = torch.load(last_path, map_location="cpu", weights_only=False)
        if _same_run(last["cfg"], cfg):
            model.load_state_dict(last["model"])
            optimizer.load_state_dict(last["optimizer"])
            scheduler.load_state_dict(last["scheduler"])
            scaler.load_state_dict(last["scaler"])
            state = last["state"]
            logger.info(f"fold {fold}: resuming from {last_path} after epoch {state['epoch']}")
        else:
            logger.info(f"fold {fold}: {last_path} was made with another config; starting over")

    logger.info(f"fold {fold}: {len(train_df)} train / {len(valid_df)} valid rows, {epochs} epochs on {device}")
    valid_targets = valid_df["target"].to_numpy()
    for epoch in range(state["epoch"], epochs):
        if state["bad_epochs"] >= cfg.patience:
            break
        start = time.perf_counter()
        epoch_seed = cfg.seed * 1000 + fold * 100 + epoch
        seed_everything(epoch_seed)  # every epoch's randomness from its own seed: a resumed run matches
        train_loader = make_loader(cfg, train_df, train=True, seed=epoch_seed)
        train_loss = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, scaler, cfg, device, epoch)
        scheduler.step(epoch + 1)
        valid_loss, score, preds = validate(model, valid_loader, criterion, cfg, device, valid_targets)
        row = {"epoch": epoch + 1, "train_loss": round(train_loss, 6), "valid_loss": round(valid_loss, 6),
               "metric": round(score, 6), "lr": optimizer.param_groups[0]["lr"],
               "time_s": round(time.perf_counter() - start, 2), "mem_MiB": round(_memory_mib(device), 1)}
        state["history"].append(row)
        improved = is_better(cfg.metric, score, state["best_score"])
        if improved:
            state.update(best_score=score, best_epoch=epoch + 1, bad_epochs=0, best_preds=preds)
            atomic_save({"model": model.state_dict(), "cfg": to_dict(cfg), "classes": classes, "epoch": epoch + 1,
                         "score": score, "history": state["history"], "num_features": model.num_features}, out_dir / "best.pt")
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict(), "state": state, "cfg": to_dict(cfg)}, last_path)
        atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))
        logger.info(f"fold {fold} epoch {epoch + 1}/{epochs}: train_loss {train_loss:.4f} valid_loss {valid_loss:.4f} "
                    f"{cfg.metric} {score:.5f}{' *' if improved else ''} ({row['time_s']:.1f}s)")

    oof = frame_predictions(valid_df[cfg.id_col], state["best_preds"], cfg, classes)
    oof.insert(1, cfg.target_col, valid_df[cfg.target_col].to_numpy())
    oof.insert(2, "fold", fold)
    best = torch.load(out_dir / "best.pt", map_location="cpu", weights_only=False)
    best["history"] = state["history"]
    atomic_save(best, out_dir / "best.pt")
    if test is not None:
        model.load_state_dict(best["model"])
        test_preds = predict(model, make_loader(cfg, test, train=False), cfg, device)
        atomic_to_csv(frame_predictions(test[cfg.id_col], test_preds, cfg, classes), cfg.exp_dir / f"test_fold{fold}.csv")
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
    return write_score(cfg, oof, logger)


def oof_targets(cfg: CFG, oof: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) of an OOF frame: class indices + probabilities, or values."""
    cols = [c for c in oof.columns if c.startswith("prob_")] or ["pred"]
    if cfg.task == "regression":
        return oof[cfg.target_col].to_numpy(float), oof["pred"].to_numpy(float)
    classes = [c[len("prob_"):] for c in cols]
    index = {c: i for i, c in enumerate(classes)}
    return oof[cfg.target_col].astype(str).map(index).to_numpy(), oof[cols].to_numpy(float)


def write_score(cfg: CFG, oof: pd.DataFrame, logger: logging.Logger | None = None) -> dict:
    """score.json of an experiment: CV on all OOF rows and mean ± std over folds."""
    y_true, y_pred = oof_targets(cfg, oof)
    per_fold = [get_score(cfg.metric, y_true[oof["fold"] == k], y_pred[(oof["fold"] == k).to_numpy()])
                for k in sorted(oof["fold"].unique())]
    score = {"experiment": cfg.experiment, "metric": cfg.metric, "cv": get_score(cfg.metric, y_true, y_pred),
             "cv_mean": float(np.mean(per_fold)), "cv_std": float(np.std(per_fold)), "folds": per_fold}
    atomic_write_text(cfg.exp_dir / "score.json", json.dumps(score, indent=1))
    if logger:
        logger.info(f"{cfg.experiment}: CV {cfg.metric} {score['cv']:.5f} "
                    f"(folds {score['cv_mean']:.5f} ± {score['cv_std']:.5f})")
    return score
