"""Models. Every model has the same contract: `features(x)` -> pooled embedding
[B, num_features] (width from the model, never hard-coded) and `forward(x)` -> outputs.

MODELS is the registry (a plain dict): 'timm' wraps any timm backbone; 'hybrid' is the
sewer-defect CNN-transformer (PatchConvEncoder -> CatsDecoder -> Classifier). Each reads its
own settings from cfg.model_kwargs (timm.create_model's keyword arguments, or HYBRID_DEFAULTS'
keys); `model_problems` checks them before anything trains.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .config import ARCHS, CFG


def _timm():
    """timm, imported when a model is built or checked: importing it takes 1 s on the 2-core CPU
    and 4.5 s on an H100 machine (torchvision's models, torch._dynamo), which the notebooks that
    build no model (00_eda, 01_folds, 04_stacking, 05_ensemble) need not pay at every start."""
    import timm

    return timm


class TimmModel(nn.Module):
    """A timm backbone (global pooled, no head) + dropout + linear head."""

    def __init__(self, cfg: CFG, num_outputs: int):
        super().__init__()
        kwargs = dict(cfg.model_kwargs, pretrained=cfg.pretrained, num_classes=0, in_chans=cfg.in_chans)
        if _timm().is_model(cfg.model_name) and takes_img_size(cfg.model_name):
            kwargs.setdefault("img_size", cfg.img_size)  # timm resizes the position embeddings to it
        if cfg.drop_path:
            kwargs["drop_path_rate"] = cfg.drop_path
        self.weights = ""  # where the weights came from (helpers.weights): said by the fold's log and score.json
        if cfg.pretrained and cfg.pretrained_path and not _local(cfg.pretrained_path).is_file():
            raise FileNotFoundError(f"config key 'pretrained_path': weights file not found: {_local(cfg.pretrained_path)}")
        if cfg.pretrained and _timm().is_model(cfg.model_name):
            from .weights import find_weights, weights_problem

            found = find_weights(cfg)
            if not found.source:  # never a silent run from scratch
                raise RuntimeError(weights_problem(cfg, online=False))
            self.weights = str(found)
            if found.path:  # a local file: timm loads it through its own pretrained mechanism
                kwargs["pretrained_cfg_overlay"] = dict(file=found.path)
        try:
            self.backbone = _timm().create_model(cfg.model_name, **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(unknown_model(cfg.model_name)) from e
            if kwargs.get("pretrained_cfg_overlay"):  # e.g. weights of another architecture
                first = str(e).strip().splitlines()[0][:300]
                raise ValueError(f"config key '{'pretrained_path' if cfg.pretrained_path else 'weights_dir'}': "
                                 f"{kwargs['pretrained_cfg_overlay']['file']} does not fit model '{cfg.model_name}': {first}") from e
            raise
        except OSError as e:  # the hub cannot be reached (a Kaggle kernel with internet off) or has no such file
            if not cfg.pretrained or kwargs.get("pretrained_cfg_overlay"):
                raise
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise RuntimeError(f"config key 'pretrained': could not fetch the weights of '{cfg.model_name}' from the "
                               f"Hugging Face hub ({first}). Without internet, add the weights to the kernel as a "
                               f"dataset and set pretrained_path to the file (.safetensors/.pth/.bin)") from e
        if kwargs.get("pretrained_cfg_overlay"):
            _check_weights_file(Path(kwargs["pretrained_cfg_overlay"]["file"]), self.backbone, cfg.model_name)
        self.stem_changes = small_image_stem(self.backbone, cfg.img_size, cfg.min_feature_map)
        self.num_features = self.backbone.num_features
        self.head = nn.Sequential(nn.Dropout(cfg.drop_rate), nn.Linear(self.num_features, num_outputs))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# Small images: a timm CNN's stem (a stride-2 convolution, then a ResNet's max-pool) divides the
# side by 4 before the first block, so a 32 px image reaches the last stage at 1x1. The stem's
# strides are reduced (the max-pool removed first, then the first convolution's stride 2 made 1)
# until the last stage's map is at least cfg.min_feature_map on a side; the weights keep their
# shapes, so pretrained weights load as they are. 0 keeps timm's stem.
def small_image_stem(backbone: nn.Module, img_size: int, min_map: int) -> list[str]:
    """Reduce a timm backbone's stem strides for img_size (in place); what was changed."""
    info = getattr(backbone, "feature_info", None)
    reduction = int(info[-1]["reduction"]) if info and isinstance(info[-1], dict) and info[-1].get("reduction") else 0
    changed: list[str] = []
    if not min_map or not reduction:
        return changed
    def side() -> int:  # the last map's side (each stride-2 step rounds up: 28 px -> 14, 7, 4, 2, 1)
        return -(-img_size // reduction)

    if side() < min_map and isinstance(getattr(backbone, "maxpool", None), nn.MaxPool2d):
        backbone.maxpool, reduction = nn.Identity(), reduction // 2
        changed.append("maxpool removed")
    name = backbone.pretrained_cfg.get("first_conv") if hasattr(backbone, "pretrained_cfg") else None
    try:
        conv = backbone.get_submodule(name) if isinstance(name, str) else None
    except AttributeError:  # a stem model_kwargs changed (resnet50d with stem_type ''): no such module
        conv = None
    if side() < min_map and isinstance(conv, nn.Conv2d) and tuple(conv.stride) == (2, 2):
        conv.stride, reduction = (1, 1), reduction // 2
        changed.append(f"{name} stride 2 -> 1")
    return changed


@functools.lru_cache(maxsize=64)
def _stem_changes(name: str, img_size: int, min_map: int, in_chans: int, kwargs: str) -> tuple[str, ...]:
    import json

    from .timmlib import bare_model

    backbone = bare_model(name, **dict(json.loads(kwargs), num_classes=0, in_chans=in_chans))
    return tuple(small_image_stem(backbone, img_size, min_map))


def stem_changes(cfg: CFG) -> tuple[str, ...]:
    """What small_image_stem changes in cfg's model at its image size (from a copy on the meta
    device: no weights); () for the hybrid and where timm's stem stays."""
    if cfg.arch != "timm" or not cfg.min_feature_map or not _timm().is_model(cfg.model_name):
        return ()
    import json

    return _stem_changes(cfg.model_name, cfg.img_size, cfg.min_feature_map, cfg.in_chans, json.dumps(cfg.model_kwargs, sort_keys=True))


def _local(path: str) -> Path:
    from .weights import local_path

    return local_path(path)


def _check_weights_file(path: Path, backbone: nn.Module, name: str) -> None:
    """timm loads a headless backbone non-strictly, so weights of another architecture (resnet18
    into resnet34) would load in part, silently. When the file uses the model's key names, every
    backbone key must be in it."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
    else:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else {}
        keys = {k.removeprefix("module.") for k in state}
    wanted = [k for k in backbone.state_dict() if not k.endswith("num_batches_tracked")]
    missing = [k for k in wanted if k not in keys]
    if len(missing) == len(wanted):  # timm would load none of them (non-strictly) and train from scratch
        raise ValueError(f"the weights file {path} names none of model '{name}''s {len(wanted)} weights (e.g. {wanted[:2]}; "
                         f"the file has e.g. {sorted(keys)[:2]}): a file of another layout; if its tensors follow timm's "
                         f"in order, convert it: python -m helpers.weights convert {path} {name} <out>.safetensors")
    if missing:  # same naming, but parts absent: another architecture
        raise ValueError(f"config key 'pretrained_path': {path} does not fit model '{name}': "
                         f"{len(missing)} of its {len(wanted)} weights are not in the file (e.g. {missing[:3]})")


# --- the hybrid CNN-transformer -----------------------------------------------------------
class PatchConvEncoder(nn.Module):
    """Cut the image into patch_size patches (unfold), run one shared CNN over all patches
    as one batch, AdaptiveAvgPool + Flatten + LayerNorm -> [B, num_patches, featured_patch_dim]."""

    def __init__(self, in_chans: int, patch_size: int, channels: list[int], featured_patch_dim: int):
        super().__init__()
        self.patch_size = patch_size
        layers, c_in = [], in_chans
        for c_out in [*channels, featured_patch_dim]:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
            c_in = c_out
        self.cnn = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(featured_patch_dim))

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B * num_patches, C, p, p], patches in row-major order."""
        b, c, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {p}")
        cols = F.unfold(x, kernel_size=p, stride=p)  # [B, C*p*p, L]
        return cols.transpose(1, 2).reshape(-1, c, p, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        feats = self.pool(self.cnn(self.patches(x)))  # [B*L, D]
        return feats.view(b, -1, feats.shape[-1])


class CatsDecoder(nn.Module):
    """Learnable queries (kept in featured_patch_dim space) cross-attend to the patch features.
    Both are projected to emb_dim by the same W_feat2emb; patches get positional embeddings."""

    def __init__(self, num_patches: int, num_labels: int, featured_patch_dim: int, emb_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_queries = math.ceil(num_labels / featured_patch_dim)
        self.W_feat2emb = nn.Linear(featured_patch_dim, emb_dim)
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_patches, emb_dim))
        self.queries = nn.Parameter(torch.randn(1, self.num_queries, featured_patch_dim) * 0.02)
        nn.init.trunc_normal_(self.pos_embedding, std=0.02)
        self.attn = nn.MultiheadAttention(emb_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(emb_dim)
        self.ffn = nn.Sequential(nn.Linear(emb_dim, 4 * emb_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * emb_dim, emb_dim))
        self.norm2 = nn.LayerNorm(emb_dim)

    def kv(self, patch_feats: torch.Tensor) -> torch.Tensor:
        return self.W_feat2emb(patch_feats) + self.pos_embedding  # [B, L, emb]

    def q(self, batch: int) -> torch.Tensor:
        return self.W_feat2emb(self.queries).expand(batch, -1, -1)  # [B, nq, emb]

    def forward(self, patch_feats: torch.Tensor) -> torch.Tensor:
        kv, q = self.kv(patch_feats), self.q(patch_feats.shape[0])
        x = self.norm1(q + self.attn(q, kv, kv, need_weights=False)[0])
        return self.norm2(x + self.ffn(x))  # [B, nq, emb]


class Decoder2Classifier(nn.Module):
    """[B, nq, emb_dim] -> [B, nq, featured_patch_dim] -> flattened [B, nq * featured_patch_dim]."""

    def __init__(self, emb_dim: int, featured_patch_dim: int):
        super().__init__()
        self.proj = nn.Linear(emb_dim, featured_patch_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(1)


class Classifier(nn.Module):
    """Dropout + a linear projection to num_labels."""

    def __init__(self, in_features: int, num_labels: int, dropout: float):
        super().__init__()
        self.drop, self.fc = nn.Dropout(dropout), nn.Linear(in_features, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


class HybridModel(nn.Module):
    """PatchConvEncoder -> CatsDecoder -> Decoder2Classifier -> Classifier."""

    def __init__(self, cfg: CFG, num_outputs: int):
        super().__init__()
        problems = hybrid_problems(cfg)
        if problems:
            raise ValueError("; ".join(problems))
        k = {**HYBRID_DEFAULTS, **cfg.model_kwargs}
        num_patches = (cfg.img_size // k["patch_size"]) ** 2
        self.encoder = PatchConvEncoder(cfg.in_chans, k["patch_size"], k["patch_channels"], k["featured_patch_dim"])
        self.decoder = CatsDecoder(num_patches, num_outputs, k["featured_patch_dim"], k["emb_dim"], k["num_heads"], cfg.drop_rate)
        self.to_classifier = Decoder2Classifier(k["emb_dim"], k["featured_patch_dim"])
        self.num_features = self.decoder.num_queries * k["featured_patch_dim"]
        self.classifier = Classifier(self.num_features, num_outputs, cfg.drop_rate)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_classifier(self.decoder(self.encoder(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


HYBRID_DEFAULTS = {
    "patch_size": 16,  # side of the square patches the image is cut into
    "patch_channels": [32, 64],  # widths of the shared patch CNN
    "featured_patch_dim": 32,  # width of a patch feature (the patch CNN's output)
    "emb_dim": 24,  # attention width of the decoder
    "num_heads": 4,  # attention heads (must divide emb_dim)
}


def hybrid_problems(cfg: CFG) -> list[str]:
    """What is wrong with the hybrid's model_kwargs, each naming its key."""
    unknown = [k for k in cfg.model_kwargs if k not in HYBRID_DEFAULTS]
    if unknown:
        return [f"config key 'model_kwargs': the hybrid model has no setting {unknown}; it takes {list(HYBRID_DEFAULTS)}"]
    k = {**HYBRID_DEFAULTS, **cfg.model_kwargs}
    problems = [f"config key 'model_kwargs.{name}' must be a positive whole number, got {k[name]!r}"
                for name in ("patch_size", "featured_patch_dim", "emb_dim", "num_heads")
                if not isinstance(k[name], int) or isinstance(k[name], bool) or k[name] < 1]
    if problems:
        return problems
    if k["emb_dim"] % k["num_heads"]:
        problems.append(f"config key 'model_kwargs.num_heads' ({k['num_heads']}) must divide emb_dim ({k['emb_dim']})")
    if cfg.img_size % k["patch_size"]:
        problems.append(f"config key 'img_size' ({cfg.img_size}) must be a multiple of 'model_kwargs.patch_size' ({k['patch_size']})")
    return problems


MODELS: dict[str, type[nn.Module]] = {"timm": TimmModel, "hybrid": HybridModel}
assert tuple(MODELS) == ARCHS, "helpers.config.ARCHS must list the registry's keys"


def create_model(cfg: CFG, num_outputs: int) -> nn.Module:
    """The model cfg.arch names, with num_outputs outputs (classes, or 1 for regression)."""
    return MODELS[cfg.arch](cfg, num_outputs)


def one_pixel_strided_convs(model: nn.Module, img_size: int, in_chans: int) -> list[str]:
    """The convolutions of stride 2 or more that receive a 1x1 map at this image size (one
    forward pass of one blank image finds them): a ResNet's layer4 at 16 px, a hybrid whose
    patch CNN halves a 4 px patch three times. oneDNN's bf16 weight gradient of such a
    convolution reads memory it never wrote: on the 2-core AMD EPYC it was NaN in 3 of 600
    steps of one 3x3 convolution, and in 58 of 200 with other processes running."""
    found: list[str] = []
    hooks = [module.register_forward_pre_hook(lambda _, args, name=name: found.append(name) if min(args[0].shape[-2:]) == 1 else None)
             for name, module in model.named_modules() if isinstance(module, nn.Conv2d) and max(module.stride) > 1]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_chans, img_size, img_size, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(training)
    return list(dict.fromkeys(found))


@functools.lru_cache(maxsize=32)
def _timm_pretrained_cfg(name: str) -> dict:
    """A timm model's pretrained_cfg (mean, std, interpolation, input size), from a copy built
    on the meta device: no weights, no download, deprecated names resolved as timm does (on the
    CPU where an older timm reads a tensor's values while it builds: ConvNeXt's drop-path rates
    in timm 1.0.3)."""
    from .timmlib import bare_model

    return dict(bare_model(name, num_classes=0).pretrained_cfg)


def pretrained_data_config(cfg: CFG) -> dict | None:
    """The preprocessing a pretrained timm model was trained with (timm.data.resolve_data_config
    of its pretrained_cfg: mean, std, interpolation), or None for the hybrid model and for
    pretrained: false (those use the documented default, ImageNet's statistics, bilinear)."""
    if cfg.arch != "timm" or not cfg.pretrained or not _timm().is_model(cfg.model_name):
        return None
    from timm.data import resolve_data_config

    return resolve_data_config(pretrained_cfg=_timm_pretrained_cfg(cfg.model_name))


def takes_img_size(name: str) -> bool:
    """Models whose input size is built in (ViT, Swin, EVA, ...): they are given img_size."""
    return bool(_timm_pretrained_cfg(name).get("fixed_input_size"))


def unknown_model(name: str) -> str:
    """The error for a timm model name timm does not have, with the closest names it has."""
    close = difflib.get_close_matches(name, _timm().list_models(), n=5, cutoff=0.6)
    return f"config key 'model_name': unknown timm model '{name}'" + (f" (close: {', '.join(close)})" if close else "")


def model_problems(cfg: CFG) -> list[str]:
    """The model settings' problems, each naming its key: an unknown timm name, a missing
    pretrained_path, the hybrid's model_kwargs."""
    problems = []
    if cfg.arch == "timm" and not _timm().is_model(cfg.model_name):
        problems.append(unknown_model(cfg.model_name))
    if cfg.pretrained and cfg.pretrained_path and not _local(cfg.pretrained_path).is_file():
        problems.append(f"config key 'pretrained_path': weights file not found: {cfg.pretrained_path}")
    if cfg.arch == "hybrid":
        problems += hybrid_problems(cfg)
    from .tasks import task_of  # the task objects (scikit-learn): imported once a model is checked

    if (cfg.mixup_alpha or cfg.cutmix_alpha) and task_of(cfg).mixup_multi_label and not _mixes_multi_hot():
        problems.append(f"config keys 'mixup_alpha'/'cutmix_alpha': Mixup/CutMix of multi-label targets needs timm's "
                        f"Mixup(multi_label=...), which timm {_timm().__version__} lacks: pip install -U 'timm>=1.0.31' "
                        f"(on Kaggle, as a dataset of its wheel when the internet is off), or set both to 0")
    return problems


def _mixes_multi_hot() -> bool:
    """Whether this timm's Mixup takes multi-hot targets (its `multi_label`, in timm 1.0.31)."""
    from timm.data import Mixup

    return "multi_label" in inspect.signature(Mixup).parameters
