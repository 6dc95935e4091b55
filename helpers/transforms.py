"""Transforms: the augmentation presets (albumentations on the CPU, the affine warp on the
device), a pipeline from YAML (albumentations' own serialisation), each model's own input
statistics and resize, and the device-side normalisation of a batch."""
from __future__ import annotations

import inspect

import albumentations as A
from albumentations.pytorch import ToTensorV2  # not A.ToTensorV2: albumentations < 2.0.5 has it here only
import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .config import CFG
from .models import pretrained_data_config

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def augment_preset(cfg: CFG) -> list:
    """The CPU part of cfg.augment's training augmentations ('none' | 'light' | 'medium' |
    'heavy'); the affine warp of every preset runs on the device (device_augment).

    Chosen to feed a GPU: one CPU core gives several thousand images/s at 224 px from the
    cache for light and medium, over 1,000 for heavy (`python -m helpers.bench`). The costly
    transforms have cheaper equivalents: the affine warp on the device (a bilinear warp on
    the CPU takes a third of a millisecond), hue/saturation jitter as ColorJitter
    (HueSaturationValue costs 6x more), sharpening as Sharpen (UnsharpMask: 25x), the elastic
    field smoothed with a fixed kernel and one draw for both axes (7x), Gaussian noise drawn
    at half resolution (2x).
    """
    if cfg.augment == "none":
        return []
    flips = [A.HorizontalFlip(p=0.5)] if cfg.hflip else []
    if cfg.augment == "light":
        return flips + [A.RandomBrightnessContrast(0.2, 0.2, p=0.5)]
    medium = flips + [
        A.RandomBrightnessContrast(0.25, 0.25, p=0.6),
        # HueSaturationValue(10, 20, 10): hue +-10 of 180, saturation +-20 and value +-10 of 255
        A.ColorJitter(brightness=0.08, contrast=0.0, saturation=0.2, hue=0.055, p=0.3),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15), hole_width_range=(0.05, 0.15), p=0.4),
    ]
    if cfg.augment == "medium":
        return medium
    return medium + [  # heavy: the document-classifier write-up's hard augmentation
        A.OneOf([A.GridDistortion(p=1), A.ElasticTransform(approximate=True, same_dxdy=True, p=1),
                 A.OpticalDistortion(p=1)], p=0.4),
        A.OneOf([A.GaussianBlur(p=1), A.MotionBlur(p=1), A.Sharpen(p=1)], p=0.3),
        A.GaussNoise(noise_scale_factor=0.5, p=0.2),
        A.CoarseDropout(num_holes_range=(2, 8), hole_height_range=(0.05, 0.2), hole_width_range=(0.05, 0.2), p=0.5),
    ]


class DeviceAffine:
    """Random affine warps of a batch where it already is (the GPU), before normalisation: what
    A.Affine does to each image, moved off the CPU workers. Each image is warped with
    probability p, by x and y scales, a translation (share of the side), a rotation and x and
    y shears (degrees), each drawn uniformly as A.Affine draws them, and composed as it does
    (shear @ rotation @ scale); pixels from outside are black, as A.Affine's default fill.
    Random numbers come from the device's generator, seeded every epoch (a resumed run draws
    the same warps), and nothing waits for the device (the inverse is in closed form)."""

    def __init__(self, scale: tuple, translate: tuple, rotate: tuple, shear: tuple = (0.0, 0.0), p: float = 1.0):
        self.scale, self.translate, self.rotate, self.shear, self.p = scale, translate, rotate, shear, p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        one, zero = torch.ones(n, device=dev), torch.zeros(n, device=dev)

        def draw(bounds: tuple, default: torch.Tensor) -> torch.Tensor:
            return torch.where(on, torch.empty(n, device=dev).uniform_(*bounds), default)

        on = torch.rand(n, device=dev) < self.p
        sx, sy = draw(self.scale, one), draw(self.scale, one)
        angle = draw(self.rotate, zero).deg2rad()
        a, b = draw(self.shear, zero).deg2rad().tan(), draw(self.shear, zero).deg2rad().tan()
        tx, ty = draw(self.translate, zero) * 2, draw(self.translate, zero) * 2  # grid units: a side is 2
        warped = warp_affine(x, sx, sy, angle, a, b, tx, ty)
        return torch.where(on.view(n, 1, 1, 1), warped, x)  # the images not drawn stay exactly as they were


def warp_affine(x: torch.Tensor, sx, sy, angle, a, b, tx, ty) -> torch.Tensor:
    """Warp each image of x by shear [[1, -a], [-b, 1]] @ rotation (angle, radians,
    counter-clockwise) @ diag(sx, sy), then a shift (tx, ty) in grid units (a side is 2): the
    composition A.Affine uses. affine_grid wants the inverse, here in closed form:
    diag(1/sx, 1/sy) @ rotation.T @ shear^-1."""
    n = x.shape[0]
    cos, sin, det = torch.cos(angle), torch.sin(angle), 1 - a * b
    rt_sh = torch.stack([torch.stack([cos - sin * b, cos * a - sin], 1),
                         torch.stack([sin + cos * b, sin * a + cos], 1)], 1) / det.view(n, 1, 1)
    inverse = rt_sh / torch.stack([sx, sy], 1).view(n, 2, 1)
    shift = -(inverse @ torch.stack([tx, ty], 1).unsqueeze(2))
    theta = torch.cat([inverse, shift], 2).to(x.dtype)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), mode="bilinear",
                         padding_mode="zeros", align_corners=False)


def device_augment(cfg: CFG) -> DeviceAffine | None:
    """The affine warp of cfg.augment's preset, applied to training batches on the device
    (none for 'none' and for a custom augment_pipeline, which runs whole on the CPU)."""
    if cfg.augment_pipeline or cfg.augment == "none":
        return None
    if cfg.augment == "light":
        return DeviceAffine(scale=(0.9, 1.1), translate=(-0.06, 0.06), rotate=(-10, 10), p=0.7)
    return DeviceAffine(scale=(0.8, 1.2), translate=(-0.1, 0.1), rotate=(-20, 20), shear=(-5, 5), p=0.8)


def _with_default_p(node):
    """Fill a missing `p` with the transform class's own default (A.Resize: 1.0), as in Python;
    albumentations' from_dict would use 0.5 and skip a Resize half of the time."""
    if isinstance(node, list):
        return [_with_default_p(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _with_default_p(v) for k, v in node.items()}
    name = node.get("__class_fullname__", "")
    cls = getattr(A, name.rsplit(".", 1)[-1], None) if name else None
    if cls is not None and "p" not in node:
        param = inspect.signature(cls).parameters.get("p")
        if param is not None and param.default is not inspect.Parameter.empty:
            node["p"] = param.default
    return node


def _pipeline(cfg: CFG) -> list | None:
    """The transforms of cfg.augment_pipeline (albumentations' own serialisation), if any."""
    if not cfg.augment_pipeline:
        return None
    return list(A.from_dict(_with_default_p(cfg.augment_pipeline)).transforms)


def transform_problems(cfg: CFG) -> list[str]:
    """What is wrong with cfg.augment_pipeline (an unknown transform, a bad argument), found
    before training instead of at its first batch."""
    if not cfg.augment_pipeline:
        return []
    try:
        create_transforms(cfg, train=True)
    except Exception as e:  # noqa: BLE001 - albumentations raises many kinds; all are reported
        return [f"config key 'augment_pipeline' cannot be built: {type(e).__name__}: {e}"]
    return []


def input_stats(cfg: CFG) -> tuple[tuple, tuple, float]:
    """(mean, std, max_pixel_value) the model's input is normalised with: the pipeline's final
    Normalize when it has one; else, for a pretrained timm model, its own pretrained_cfg
    (a ViT-augreg, CLIP, EVA or TF-ported EfficientNet-Lite has other values than ImageNet);
    else ImageNet's (the documented default of the hybrid model and of pretrained: false)."""
    ops = _pipeline(cfg) or []
    if ops and isinstance(ops[-1], A.Normalize):
        n = ops[-1]
        return tuple(map(float, np.atleast_1d(n.mean))), tuple(map(float, np.atleast_1d(n.std))), float(n.max_pixel_value)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    data = pretrained_data_config(cfg)
    if data is not None:
        mean, std = tuple(map(float, data["mean"])), tuple(map(float, data["std"]))
    if cfg.in_chans == 1:  # one channel: the mean of the three
        return (float(np.mean(mean)),), (float(np.mean(std)),), 255.0
    return mean, std, 255.0


INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST,
                  "lanczos": cv2.INTER_LANCZOS4, "area": cv2.INTER_AREA}


def create_resize(cfg: CFG) -> A.Resize:
    """Images to img_size x img_size: shrunk with area interpolation (no aliasing), enlarged
    with the pretrained model's own interpolation (bilinear by default). The cache and the
    loaders use this same transform, so they see the same pixels."""
    data = pretrained_data_config(cfg)
    interpolation = INTERPOLATIONS.get(data["interpolation"], cv2.INTER_LINEAR) if data else cv2.INTER_LINEAR
    if "area_for_downscale" not in inspect.signature(A.Resize).parameters:  # albumentations < 2.0.7
        return A.Resize(cfg.img_size, cfg.img_size, interpolation=interpolation)
    return A.Resize(cfg.img_size, cfg.img_size, interpolation=interpolation, area_for_downscale="image")


def create_transforms(cfg: CFG, train: bool) -> A.Compose:
    """Training: cfg.augment_pipeline when given, else Resize + the augment preset.
    Validation/test: Resize. Both end with ToTensorV2 and yield uint8 tensors: normalisation
    (input_stats) happens on the device, in `InputNorm`, so workers send 4x fewer bytes.
    A pipeline whose Normalize is not last keeps it, and yields float tensors."""
    ops = _pipeline(cfg) if train else None
    if ops is None:
        ops = [create_resize(cfg), *(augment_preset(cfg) if train else [])]
    if ops and isinstance(ops[-1], A.Normalize):
        ops = ops[:-1]
    if not any(isinstance(t, ToTensorV2) for t in ops):
        ops.append(ToTensorV2())
    return A.Compose(ops)


class InputNorm:
    """A loader's batch -> the model's input on the device: moved without blocking (from pinned
    memory), uint8 normalised with constants built once on the device (no host-device copy
    per step), warped by the device-side augmentation of training batches, in the configured
    memory format. Float batches are only moved (and warped)."""

    def __init__(self, stats: tuple[tuple, tuple, float], device, channels_last: bool = False,
                 augment: DeviceAffine | None = None):
        self.augment = augment
        mean, std, max_pixel = stats
        self.device = torch.device(device)
        self.mean = (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * max_pixel).to(self.device)
        self.std = (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * max_pixel).to(self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float()
            if self.augment is not None:  # before normalising: outside pixels are black, as on the CPU
                images = self.augment(images)
            images = (images - self.mean) / self.std
        elif self.augment is not None:
            images = self.augment(images)
        return images.contiguous(memory_format=self.memory_format)
