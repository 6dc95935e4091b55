"""Losses and the regression target scale (each task picks its own: helpers.tasks).

Classification: cross-entropy (label smoothing, class weights) or focal loss (alpha, gamma);
both take hard class indices or the soft targets that timm's Mixup/CutMix produce.
Regression, the Pawpularity way: the target is scaled to [0, 1] with the training range and
trained with BCE-with-logits ('bce') or MSE ('mse'); predictions are scaled back, so RMSE is
reported on the original scale.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from .config import CFG


def class_weights(cfg: CFG, targets: np.ndarray, num_classes: int) -> torch.Tensor | None:
    """'balanced': n / (k * count_c) as in scikit-learn; a list: one weight per class; '' none."""
    if not cfg.class_weights:
        return None
    if cfg.class_weights == "balanced":
        counts = np.bincount(targets.astype(int), minlength=num_classes).astype(float)
        return torch.tensor(len(targets) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)
    raise ValueError(f"config key 'class_weights' must be '' or 'balanced', got {cfg.class_weights!r}")


class SoftCrossEntropy(nn.Module):
    """Cross-entropy for hard or soft targets, with label smoothing and class weights."""

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == 1:
            return F.cross_entropy(logits, target.long(), weight=self.weight, label_smoothing=self.label_smoothing)
        loss = -(target * F.log_softmax(logits, dim=1))  # soft targets already carry Mixup's smoothing
        if self.weight is not None:
            loss = loss * self.weight
        return loss.sum(1).mean()


class FocalLoss(nn.Module):
    """Focal loss (Lin et al.): alpha * (1 - p_t)^gamma * CE; hard or soft targets."""

    def __init__(self, alpha: float = 1.0, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.alpha, self.gamma, self.label_smoothing = alpha, gamma, label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n = logits.shape[1]
        if target.ndim == 1:
            target = F.one_hot(target.long(), n).float()
            if self.label_smoothing:
                target = target * (1 - self.label_smoothing) + self.label_smoothing / n
        log_p = F.log_softmax(logits, dim=1)
        loss = -self.alpha * (1 - log_p.exp()) ** self.gamma * target * log_p
        if self.weight is not None:
            loss = loss * self.weight
        return loss.sum(1).mean()


class RegressionLoss(nn.Module):
    """BCE-with-logits or MSE on the target scaled to [0, 1]."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, outputs: torch.Tensor, target01: torch.Tensor) -> torch.Tensor:
        outputs = outputs.reshape(-1)
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(outputs, target01.float())
        return F.mse_loss(outputs, target01.float())


class MultiLabelLoss(nn.Module):
    """Multi-label losses on logits [B, labels] and 0/1 (or mixed) targets: BCE with an
    optional per-label pos_weight, sigmoid focal loss (torchvision's), or timm's asymmetric
    loss (ASL)."""

    def __init__(self, kind: str, pos_weight: torch.Tensor | None = None, alpha: float = -1.0, gamma: float = 2.0):
        super().__init__()
        self.kind, self.alpha, self.gamma = kind, alpha, gamma
        self.register_buffer("pos_weight", pos_weight)
        if kind == "asl":
            from timm.loss import AsymmetricLossMultiLabel

            self.asl = AsymmetricLossMultiLabel(gamma_neg=4, gamma_pos=1, clip=0.05)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float()
        if self.kind == "bce":
            return F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)
        if self.kind == "focal":
            return sigmoid_focal_loss(logits, target, alpha=self.alpha, gamma=self.gamma, reduction="mean")
        return self.asl(logits, target) / len(logits)  # timm sums over the batch: a mean, like the others


class TargetScale:
    """Regression targets to [0, 1] and back, with the range of the training data."""

    def __init__(self, low: float, high: float):
        self.low, self.high = float(low), float(high) if high > low else float(low) + 1.0

    def to01(self, y: torch.Tensor | np.ndarray):
        return (y - self.low) / (self.high - self.low)

    def from_outputs(self, outputs: torch.Tensor, kind: str) -> torch.Tensor:
        """Raw model outputs -> predictions on the original scale."""
        scaled = outputs.float().reshape(-1)
        if kind == "bce":
            scaled = scaled.sigmoid()
        return scaled * (self.high - self.low) + self.low
