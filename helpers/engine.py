"""The training core: one epoch of training, predictions with TTA (validation, test,
embeddings), and a model rebuilt from its checkpoint. Explicit arguments, no config and no
files written: the fold loop (helpers.train) decides what is kept; `rules_of` turns a config
into the few values a step needs.

From timm, the caller's optimizer, scheduler, Mixup/CutMix and EMA (ModelEmaV3). Here:
gradient accumulation and clipping, AMP (the autocast dtype helpers.runtime decides, a
GradScaler with fp16), progressive unfreezing's frozen BatchNorm and LR ramp, TTA. Nothing in a
step waits for a GPU: the loss is summed on the device and read once, at the end of the epoch.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import artifacts
from .config import CFG
from .losses import TargetScale
from .models import create_model
from .runtime import amp_context, channels_last, precision
from .tasks import Task, task_of
from .transforms import InputNorm

if TYPE_CHECKING:  # timm is imported where a fold trains
    from timm.data import Mixup
    from timm.utils import ModelEmaV3

HEAD_PREFIXES = ("head.", "classifier.")  # parameters of the head; the rest is the backbone


@dataclasses.dataclass(frozen=True)
class Rules:
    """What a step needs to know: the task (loss targets, predictions), the autocast dtype of
    training and prediction (None: fp32) and of embeddings (never bf16: the stackers split on
    them), gradient accumulation and clipping, the TTA flips, and the loss the task decodes
    regression outputs with."""

    task: Task
    amp: torch.dtype | None = None
    embed_amp: torch.dtype | None = None
    grad_accum: int = 1
    grad_clip: float = 0.0
    tta: tuple[str, ...] = ()
    loss_kind: str = ""


def rules_of(cfg: CFG, device: torch.device) -> Rules:
    """The step rules of cfg on this device (its precision from helpers.runtime)."""
    amp, _ = precision(cfg.amp_dtype, device)
    task = task_of(cfg)
    return Rules(task, amp, None if amp is torch.bfloat16 else amp, cfg.grad_accum, cfg.grad_clip, tuple(cfg.tta),
                 task.loss_kind(cfg))


class Diverged(RuntimeError):
    """A fold's loss, gradients, weights or validation predictions stopped being finite numbers."""


def epoch_updates(batches: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch of this many batches (the last partial accumulation counts)."""
    return max(-(-batches // grad_accum), 1)


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Progressive unfreezing: the backbone frozen (or not); the head always trains."""
    for name, p in model.named_parameters():
        if not name.startswith(HEAD_PREFIXES):
            p.requires_grad_(trainable)


def freeze_batchnorm(model: nn.Module) -> None:
    """The backbone's normalisation layers in eval mode: a frozen backbone keeps its running
    statistics too (model.train() would let them drift on the new data)."""
    for name, module in model.named_modules():
        if not name.startswith(HEAD_PREFIXES) and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def _ramp_backbone(optimizer, factor: float) -> None:
    """The backbone's groups at this share of the LR the schedule gave them, for the next update."""
    for g in optimizer.param_groups:
        if g.get("backbone"):
            g["lr"] *= factor


def train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, device, epoch: int, rules: Rules,
                    norm: InputNorm, scale: TargetScale | None = None, mixup: Mixup | None = None,
                    ema: ModelEmaV3 | None = None, step_model: nn.Module | None = None, frozen: bool = False,
                    warm_backbone: bool = False, health: dict | None = None, desc: str = "") -> float:
    """One pass over the training data; returns the mean loss. `step_model` is the module that
    runs the forward pass (the torch.compile'd model), `model` the one whose weights are clipped
    and averaged. `frozen`: the backbone's BatchNorm layers stay in eval mode; `warm_backbone`:
    its LR ramps up over this epoch (the first after unfreezing).

    A step whose gradients are not finite is skipped, as a GradScaler skips one, wherever that
    costs no wait: on a CPU (where the host is the device) and with fp16's GradScaler. On a
    GPU without one, the fold loop checks the loss and weights after the epoch (a wait per
    epoch, not per step). `health` gets the count of skipped steps ('skipped') and of steps."""
    step_model = step_model if step_model is not None else model
    model.train()
    if frozen:
        freeze_batchnorm(model)
    total = torch.zeros((), device=device)
    count, accum, skipped = 0, rules.grad_accum, 0
    steps = epoch_updates(len(loader), accum)
    updates = epoch * steps
    check_steps = device.type == "cpu" and not scaler.is_enabled()  # reading the norm back costs nothing there
    if warm_backbone:
        _ramp_backbone(optimizer, 1 / steps)  # the first update of the epoch too
    for step, (images, targets) in enumerate(tqdm(loader, desc=desc or f"epoch {epoch + 1}", leave=False, mininterval=1.0), 1):
        images = norm(images)
        targets = rules.task.loss_targets(targets.to(device, non_blocking=True), scale)
        if mixup is not None:  # timm's Mixup/CutMix; multi-hot targets are mixed as they are
            images, targets = mixup(images, rules.task.mixup_targets(targets))
        with amp_context(rules.amp, device):
            loss = criterion(step_model(images).float(), targets)
        if (step - 1) % accum == 0:  # first micro-batch of a step; here, not after the step, lets
            optimizer.zero_grad(set_to_none=True)  # backward reuse the old gradients' memory (10% on CPU)
        scaler.scale(loss / accum if accum > 1 else loss).backward()
        if step % accum == 0 or step == len(loader):
            finite = True
            if rules.grad_clip > 0 or check_steps:
                scaler.unscale_(optimizer)
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), rules.grad_clip if rules.grad_clip > 0 else float("inf"))
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


@torch.no_grad()
def predict_batch(model, images: torch.Tensor, device, rules: Rules, scale: TargetScale | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions averaged over the TTA flips, raw outputs of the unflipped images) of a
    batch already on the device (InputNorm)."""
    with amp_context(rules.amp, device):
        out = model(images)
        preds = rules.task.predictions(out, scale, rules.loss_kind)
        for flip in rules.tta:
            preds += rules.task.predictions(model(images.flip(3 if flip == "hflip" else 2)), scale, rules.loss_kind)
    return preds / (1 + len(rules.tta)), out


@torch.no_grad()
def predict(model, loader, device, rules: Rules, norm: InputNorm, criterion=None, features: bool = False,
            scale: TargetScale | None = None):
    """Predictions (probabilities / values, averaged over the TTA flips), or embeddings with
    features=True. With a criterion, also the mean loss and the raw outputs (logits) of the
    unflipped images: (preds, loss, logits). Results stay on the device until the end."""
    model.eval()
    outs, logits, total, count = [], [], torch.zeros((), device=device), 0
    for images, targets in tqdm(loader, desc="embed" if features else "predict", leave=False, mininterval=1.0):
        images = norm(images)
        if features:  # kept on the device (half precision: they are saved as float16), copied once at the end
            with amp_context(rules.embed_amp, device):
                outs.append(model.features(images).half())
            continue
        preds, out = predict_batch(model, images, device, rules, scale)
        if criterion is not None:
            total += criterion(out.float(), rules.task.loss_targets(targets.to(device, non_blocking=True), scale)) * len(images)
            count += len(images)
            logits.append(out.float())
        outs.append(preds.float())
    preds = torch.cat(outs).float().cpu().numpy()
    if criterion is None:
        return preds
    return preds, total.item() / max(count, 1), torch.cat(logits).cpu().numpy()


def load_model(ckpt: dict, device, runtime: CFG | None = None) -> nn.Module:
    """The model a checkpoint describes (its own config), with its weights, ready for inference;
    compiled when `runtime` (this run's config) says so."""
    model_cfg = artifacts.checkpoint_config(ckpt, runtime)
    no_download = dataclasses.replace(model_cfg, pretrained=False, pretrained_path="")  # the weights are in ckpt
    model = create_model(no_download, task_of(model_cfg).n_outputs(ckpt["classes"]))
    model.load_state_dict(ckpt["model"])
    if channels_last(model_cfg, device):
        model = model.to(memory_format=torch.channels_last)
    model = model.to(device).eval()
    return torch.compile(model) if model_cfg.compile else model  # as in training: every path that runs the model
