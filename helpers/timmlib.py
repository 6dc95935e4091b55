"""timm across the versions Kaggle's and Colab's images carry (timm 1.0.3 and later): its
param-group helpers' home, and a model built without memory. Imports nothing of helpers, so the
config's presets can use it."""
from __future__ import annotations

import warnings

import timm
import torch
from torch import nn

try:
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay
except ImportError:  # timm < 1.0.10 keeps them in optim_factory
    from timm.optim.optim_factory import param_groups_layer_decay, param_groups_weight_decay

__all__ = ["bare_model", "param_groups_layer_decay", "param_groups_weight_decay"]


def bare_model(name: str, **kwargs) -> nn.Module:
    """timm's model `name`, no weights loaded: on the meta device (no memory, no download), on the
    CPU where an older timm reads a tensor's values while it builds (ConvNeXt's drop-path rates in
    timm 1.0.3)."""
    kwargs = {"pretrained": False, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return timm.create_model(name, **kwargs)
        except (NotImplementedError, RuntimeError):
            return timm.create_model(name, **kwargs)
