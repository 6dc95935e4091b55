"""Quality presets (AutoGluon-style): defaults under the user's own keys, picked by `quality`
('medium' when only time_limit is set)."""
from __future__ import annotations

import functools


# AutoGluon-style presets: defaults under the user's own keys. What each picks, and why:
# - fast: resnet18 at 128 px, 3 folds, 12 epochs: a strong, cheap CNN; 3 folds leave most of
#   the time to each model. Light augmentation suits few epochs.
# - medium: resnet50d at 224 px (timm's ImageNet size), 5 folds, 20 epochs, medium augmentation.
# - best: convnext_small at 288 px, 5 folds, 30 epochs, heavy augmentation with Mixup/CutMix
#   switched off for the last fifth (of the epochs each model runs: 24 of 30, or of what
#   time_limit plans), stochastic depth: long runs need the regularisation.
# All: AdamW with one warm-up epoch then cosine, EMA of the weights (timm's warm-up, so short
# runs are not averaged with their untrained start), label smoothing 0.1 for classification.
# Without a GPU (QUALITY_CPU), the models and sizes a CPU trains in minutes: resnet18 at 64 px
# (fast, medium) or resnet34 at 96 px (best). resnet18 from scratch learns at fast's 2e-3, not
# at the 1e-3 medium gives resnet50d: one model on the recipe benchmark's rows, 48 epochs, scored
# 0.983 on its test set at 2e-3 against 0.978 at 1e-3, ahead at every epoch of the way.
QUALITY = {
    "fast": {"model_name": "resnet18", "img_size": 128, "n_folds": 3, "epochs": 12, "lr": 2e-3, "augment": "light"},
    "medium": {"model_name": "resnet50d", "img_size": 224, "n_folds": 5, "epochs": 20, "lr": 1e-3, "augment": "medium"},
    "best": {"model_name": "convnext_small", "img_size": 288, "n_folds": 5, "epochs": 30, "lr": 4e-4, "augment": "heavy",
             "drop_path": 0.2, "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "mixup_prob": 0.5, "mixup_off_epoch": 0.8},
}
QUALITY_CPU = {"fast": {"img_size": 64, "batch_size": 64}, "medium": {"model_name": "resnet18", "img_size": 64, "batch_size": 64, "lr": 2e-3},
               "best": {"model_name": "resnet34", "img_size": 96, "drop_path": 0.1}}
QUALITY_COMMON = {"warmup_epochs": 1, "scheduler": "cosine", "optimizer": "adamw", "weight_decay": 0.05, "ema": True,
                  "ema_decay": 0.998, "min_feature_map": 4}
# SMALL_IMAGES: the presets give a timm CNN's stem its strides back where the images are small
# (min_feature_map 4: the max-pool removed, then the first convolution at stride 1, until the last
# map is 4x4; CIFAR's ResNet). It costs up to 16 times the compute of timm's stem at the same size,
# so a time_limit plan gives the strides back one at a time (before it halves any image) until
# the folds get the epochs a model wants, and a CPU without time_limit keeps timm's stem. On the
# 2-core CPU, 300 s of a plain loop's ResNet-18 on 28 px digits: timm's stem 0.905 (49 epochs),
# without the max-pool 0.853 (20), CIFAR's stem 0.541 (6) (docs/time_limit.md, "Small images")


# FINETUNE: a pretrained timm model (pretrained: true, the default) is fine-tuned under any preset:
# the head at `lr`, the backbone at backbone_lr_scale of it, one warm-up epoch, stochastic depth 0.1
# (where the model takes it), fewer epochs. A CNN's BatchNorm trains with the batch (it adapts to the
# new images; the presets' batches are 32-64). Without a GPU (FINETUNE_CPU: the presets' small images,
# far from ImageNet's) the rates are measured: tf_efficientnet_lite1 fine-tuned on the recipe
# benchmark's 64 px digits (docs/training.md, "Fine-tuning recipe"): one fold of 8 epochs scored
# 0.975 on the test set at 1e-2 for every weight, 0.970 at 1e-2 for the head and 3e-3 for the
# backbone, 0.973 at 3e-3 for every weight; the plain loop at one rate, 300 s: 0.530 at 1e-3, 0.793
# at 3e-3, 0.943 at 1e-2. Images unlike ImageNet's want rates near from-scratch ones (Li et al.,
# "Rethinking the hyperparameters for fine-tuning", 2020). On a GPU, at ImageNet's sizes and on
# photos like its own, the usual AdamW fine-tuning rates: 1e-3 for the new head, 3e-4 for the
# backbone (not measured here: no GPU was lent to the sessions that made this recipe).
FINETUNE = {"lr": 1e-3, "backbone_lr_scale": 0.3, "warmup_epochs": 1, "drop_path": 0.1}
FINETUNE_CPU = {"lr": 1e-2, "backbone_lr_scale": 0.3}
# the layer-decay models (ViT, Swin, ConvNeXt, below): AdamW at timm's and the papers' fine-tuning
# rates scaled to a Kaggle batch (MAE's ViT-B 2e-3 at 1024, ConvNeXt's 5e-5 at 512), the decay
# lowering the backbone's
FINETUNE_LAYER_DECAY = {"lr": 3e-4, "backbone_lr_scale": 1.0}
FINETUNE_EPOCHS = {"fast": 8, "medium": 12, "best": 20}  # without time_limit: fine-tuning converges in few epochs
# layer-wise LR decay (timm's param_groups_layer_decay) for the models whose recipes use it: ViT,
# DeiT, BEiT, EVA, Swin, ConvNeXt and their kin. The decay per layer is the one that takes the first
# layer to LAYER_DECAY_FLOOR of the last, whatever the depth: ConvNeXt's paper fine-tunes at 0.8 over
# 12 layer groups (0.8^11 = 0.086), but timm counts 38 layer groups in convnext_small (0.8^37 = 0.0003)
LAYER_DECAY_FLOOR, LAYER_DECAY_MODULES = 0.8 ** 11, (
    "vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos", "vision_transformer_sam", "deit", "beit",
    "eva", "cait", "xcit", "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr", "convnext", "hiera", "maxxvit",
    "davit", "focalnet", "efficientformer", "efficientformer_v2", "tiny_vit", "mvitv2", "metaformer", "pvt_v2", "twins",
    "levit", "gcvit", "nest", "edgenext", "inception_next", "mambaout", "hieradet_sam2", "fastvit", "naflexvit")
MAX_OWN_SIZE = 384  # a named model's own input size on a GPU, at most (dinov2's 518, tf_efficientnet_b7's 600: a T4 runs out)


def finetune_preset(values: dict, quality: str, model_name: str, gpu: bool) -> dict:
    """What a pretrained timm model's preset changes: FINETUNE (FINETUNE_CPU's rates without a
    GPU), FINETUNE_EPOCHS[quality], layer decay and lower rates for the families above,
    stochastic depth where the model takes it, and on a GPU the model's own input size (timm's
    pretrained_cfg, at most MAX_OWN_SIZE) where the model is yours and the size is not; {} for a
    model from scratch or the hybrid."""
    if values.get("arch", "timm") != "timm" or not values.get("pretrained", True):
        return {}
    facts = timm_facts(model_name)
    if facts is None:  # a name timm does not know: models.model_problems names it
        return {}
    recipe = {**FINETUNE, **({} if gpu else FINETUNE_CPU), "epochs": FINETUNE_EPOCHS[quality]}
    if not facts["drop_path"]:  # timm's constructor would refuse drop_path_rate (the `best` preset's too)
        recipe["drop_path"] = 0.0
    if facts["layer_decay"]:
        recipe.update(FINETUNE_LAYER_DECAY, layer_decay=values.get("layer_decay") or layer_decay(model_name))
    if gpu and "model_name" in values and facts["input_size"]:
        recipe["img_size"] = min(facts["input_size"], MAX_OWN_SIZE)
    return recipe


@functools.lru_cache(maxsize=16)
def timm_facts(model_name: str) -> dict | None:
    """What the recipe needs of a timm model, from a copy without weights: whether it is of a
    layer-decay family, takes drop_path_rate, and its pretrained input size (timm's renames of
    deprecated names followed); None for a name timm does not know."""
    import timm

    from .timmlib import bare_model

    if not timm.is_model(model_name):
        return None
    try:
        try:
            model, takes = bare_model(model_name, num_classes=0, drop_path_rate=0.1), True
        except TypeError:  # densenet, vgg, inception, xception, dla, dpn...: no stochastic depth
            model, takes = bare_model(model_name, num_classes=0), False
        size = int((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (0, 0, 0))[-1])
    except Exception:  # noqa: BLE001 - a model timm cannot build (a wrong tag): models.model_problems says why
        return None
    arch = model_name.split(".")[0]
    return {"layer_decay": timm.models.is_model_in_modules(arch, LAYER_DECAY_MODULES) or
            timm.models.is_model_in_modules(getattr(model, "default_cfg", {}).get("architecture", arch), LAYER_DECAY_MODULES),
            "drop_path": takes, "input_size": size}


@functools.lru_cache(maxsize=16)
def layer_decay(model_name: str) -> float:
    """The decay per layer that gives timm's first layer group LAYER_DECAY_FLOOR of the last's LR
    (the layers counted by timm's own param_groups_layer_decay, on a model without memory); 0.8
    where the model cannot be counted."""
    import math

    from .timmlib import bare_model, param_groups_layer_decay

    try:
        lowest = min(g["lr_scale"] for g in param_groups_layer_decay(bare_model(model_name), 0.0, layer_decay=0.5))
    except Exception:  # noqa: BLE001 - timm's grouping of an unusual model: the papers' usual value
        return 0.8
    layers = round(math.log(lowest, 0.5)) + 1
    return round(LAYER_DECAY_FLOOR ** (1 / max(layers - 1, 1)), 3)


def with_quality(values: dict) -> dict:
    """The settings with their quality preset's defaults under them ('medium' when only
    time_limit is set); label smoothing for classification only; with time_limit, the epochs
    are what fits (at most `epochs` when you set it) and no early stop."""
    quality = values.get("quality") or ("medium" if values.get("time_limit") else "")
    if quality not in QUALITY:
        return values
    import torch  # imported here: reading a config with no preset needs no torch (the runner times its imports)

    gpu = torch.cuda.is_available()
    preset = {**QUALITY_COMMON, **QUALITY[quality], **(QUALITY_CPU[quality] if not gpu else {})}
    tuned = finetune_preset(values, quality, values.get("model_name", preset["model_name"]), gpu)
    preset.update(tuned, **({"drop_path": max(tuned["drop_path"], preset.get("drop_path", 0.0))} if tuned.get("drop_path") else {}))
    if values.get("task", "classification") == "classification":
        preset["label_smoothing"] = 0.1
    if values.get("time_limit"):  # the budget sets the epochs (your `epochs`, if any, is the most) and the
        preset.update(epochs=1000, patience=1000)  # cosine schedule runs to its planned end
    elif not torch.cuda.is_available():  # a CPU without a budget: timm's stem (SMALL_IMAGES)
        preset["min_feature_map"] = 0
    return {**preset, **values, "quality": quality}
