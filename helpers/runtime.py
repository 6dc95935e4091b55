"""How this machine runs a model: the device and its fast defaults, the precision (the one rule
for training, validation, prediction, embeddings, the Predictor and the bench), autocast,
the GradScaler, channels_last, fused optimizers, and seeding."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random

import numpy as np
import torch
from torch import nn

from .config import CFG
from .models import one_pixel_strided_convs


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively: AVX512-BF16 or AMX (Intel Cooper Lake and
    Sapphire Rapids on, AMD Zen 4 on). Older AVX-512 CPUs (the Xeons of Kaggle's CPU kernels)
    only emulate it, slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def precision(amp_dtype: str, device) -> tuple[object, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed): the one place that
    decides. On CUDA, 'auto' is bf16 where the card computes it natively (compute capability
    8.0+: A100, H100, RTX 30xx/40xx) and fp16 with a GradScaler elsewhere (T4, P100, V100:
    `torch.cuda.is_bf16_supported()` also counts emulation, which cuDNN convolutions lack).
    On a CPU, 'auto' is bf16 where it computes bf16 natively (cpu_bf16: resnet18 at 64 px
    trained at 270 img/s in fp32, 458 in bf16 + channels_last on the 2-core AMD EPYC with
    AVX512-BF16), else fp32; 'bf16' asks for it anyway. With 'fp32', or on MPS, no autocast.
    An explicit 'bf16' on an older card is an error."""
    kind = getattr(device, "type", str(device))
    if amp_dtype == "fp32" or kind not in ("cuda", "cpu"):
        return None, False
    if kind == "cpu":
        return (torch.bfloat16 if amp_dtype == "bf16" or (amp_dtype == "auto" and cpu_bf16()) else None), False
    major, _ = torch.cuda.get_device_capability(device)
    if amp_dtype == "bf16" and major < 8:
        raise ValueError(f"config key 'amp_dtype': bf16 needs compute capability 8.0+ (this GPU, "
                         f"{torch.cuda.get_device_name(device)}, has {major}.x); use 'auto' or 'fp16'")
    if amp_dtype == "bf16" or (amp_dtype == "auto" and major >= 8):
        return torch.bfloat16, False
    return torch.float16, True


def channels_last(cfg, device) -> bool:
    """Whether the model and its batches are channels_last: as `channels_last` says, or, left
    unset, wherever autocast runs on a CUDA card with tensor cores (compute capability 7.0+:
    V100, T4, A100, H100; their convolutions want NHWC: on an H200, efficientnet_b0 at 224 px
    trains at 1,922 img/s in bf16 NCHW, below fp32's 2,051, and at 3,555 img/s in bf16
    channels_last). A P100 has none and stays NCHW."""
    if cfg.channels_last is not None:
        return cfg.channels_last
    if precision(cfg.amp_dtype, device)[0] is None:
        return False
    if getattr(device, "type", str(device)) == "cpu":  # oneDNN's bf16 convolutions want NHWC too (1.5x -> 1.7x fp32's speed)
        return True
    return torch.cuda.get_device_capability(device)[0] >= 7


def setup_device(device) -> None:
    """Fast defaults for a CUDA card: cuDNN picks the fastest kernels for the fixed input
    size, and matmuls/convolutions use TF32 on Ampere and later (float32 ones only)."""
    if getattr(device, "type", str(device)) != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def get_device(name: str = "auto"):
    """cuda if visible, else mps, else cpu (or the explicit name)."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_context(dtype: torch.dtype | None, device: torch.device):
    """Autocast in `dtype`, or nothing (fp32) when it is None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def autocast(cfg: CFG, device: torch.device, bf16: bool = True):
    """Autocast in the dtype precision() decides (none on MPS or with fp32). bf16=False, for
    embeddings (the stackers' inputs): fp32 where that dtype is bf16, which keeps 8 bits of
    mantissa where the float16 they are stored in keeps 11 (LightGBM splits on them: the demo's
    resnet18 stacker scored 0.976 on bf16 embeddings, 0.980 on fp32 ones of the same models);
    fp16 autocast (a T4) stays. 03_features and the Predictor both embed so (engine.Rules)."""
    dtype, _ = precision(cfg.amp_dtype, device)
    return amp_context(None if dtype is torch.bfloat16 and not bf16 else dtype, device)


def optimizer_kwargs(cfg: CFG, device: torch.device) -> dict:
    """Fused Adam/AdamW on CUDA: one kernel for the update, and a GradScaler that needs not read
    its inf check back to the host every step (the fused optimizers take it on the device)."""
    return {"fused": True} if device.type == "cuda" and cfg.optimizer.lower() in ("adam", "adamw") else {}


def create_scaler(cfg: CFG, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only where helpers.runtime.precision says fp16 needs one."""
    return torch.amp.GradScaler(device.type, enabled=precision(cfg.amp_dtype, device)[1])


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


