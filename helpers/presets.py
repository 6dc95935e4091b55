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
# the head at `lr`, the backbone at backbone_lr_scale of it, one warm-up epoch, stochastic depth 0.1,
# fewer epochs. A CNN's BatchNorm trains with the batch (it adapts to the new images; the presets'
# batches are 32-64). What the rates are from: tf_efficientnet_lite1 fine-tuned on the recipe
# benchmark's 64 px digits (docs/training.md, "Fine-tuning recipe"): one fold of 8 epochs scored
# 0.975 on the test set at 1e-2 for every weight, 0.970 at 1e-2 for the head and 3e-3 for the
# backbone, 0.973 at 3e-3 for every weight; the plain loop at one rate, 300 s: 0.530 at 1e-3, 0.793
# at 3e-3, 0.943 at 1e-2. Images unlike ImageNet's want rates near from-scratch ones (Li et al.,
# "Rethinking the hyperparameters for fine-tuning", 2020); the backbone's lower rate keeps what
# it knows where the images are like ImageNet's.
FINETUNE = {"lr": 1e-2, "backbone_lr_scale": 0.3, "warmup_epochs": 1, "drop_path": 0.1}
# the layer-decay models (ViT, Swin, ConvNeXt, below): AdamW at timm's fine-tuning rates, the decay
# lowering the backbone's (their rates at the head: 1e-3 and less in timm's and the papers' recipes)
FINETUNE_LAYER_DECAY = {"lr": 1e-3, "backbone_lr_scale": 1.0}
FINETUNE_EPOCHS = {"fast": 8, "medium": 12, "best": 20}  # without time_limit: fine-tuning converges in few epochs
# layer-wise LR decay (timm's param_groups_layer_decay) for the models whose recipes use it: ViT,
# DeiT, BEiT, EVA, Swin, ConvNeXt and their kin. The decay per layer is the one that takes the first
# layer to LAYER_DECAY_FLOOR of the last, whatever the depth: ConvNeXt's paper fine-tunes at 0.8 over
# 12 layer groups (0.8^11 = 0.086), but timm counts 30 layers in convnext_small (0.8^29 = 0.0016)
LAYER_DECAY_FLOOR, LAYER_DECAY_MODULES = 0.8 ** 11, ("vision_transformer", "vision_transformer_hybrid", "deit", "beit", "eva", "cait",
                                         "xcit", "swin_transformer", "swin_transformer_v2", "convnext", "hiera", "maxxvit",
                                         "davit", "focalnet", "efficientformer", "efficientformer_v2", "tiny_vit", "mvitv2")


def finetune_preset(values: dict, quality: str, model_name: str, gpu: bool) -> dict:
    """What a pretrained timm model's preset changes: FINETUNE, FINETUNE_EPOCHS[quality], layer
    decay for the families above, and on a GPU the model's own input size (timm's pretrained_cfg)
    where the model is yours and the size is not; {} for a model from scratch or the hybrid."""
    if values.get("arch", "timm") != "timm" or not values.get("pretrained", True):
        return {}
    import timm

    if not timm.is_model(model_name):  # models.model_problems names it
        return {}
    recipe = {**FINETUNE, "epochs": FINETUNE_EPOCHS[quality]}
    if timm.models.is_model_in_modules(model_name.split(".")[0], LAYER_DECAY_MODULES):  # the architecture, not its tag
        recipe.update(FINETUNE_LAYER_DECAY, layer_decay=layer_decay(model_name))
    if gpu and "model_name" in values:
        recipe["img_size"] = int(timm.models.get_pretrained_cfg(model_name).input_size[-1])
    return recipe


@functools.lru_cache(maxsize=16)
def layer_decay(model_name: str) -> float:
    """The decay per layer that gives timm's first layer group LAYER_DECAY_FLOOR of the last's LR
    (the layers counted by timm's own param_groups_layer_decay, on a model without memory)."""
    import math

    from .timmlib import bare_model, param_groups_layer_decay

    model = bare_model(model_name)
    lowest = min(g["lr_scale"] for g in param_groups_layer_decay(model, 0.0, layer_decay=0.5))
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
    preset.update(finetune_preset(values, quality, values.get("model_name", preset["model_name"]), gpu))
    if values.get("task", "classification") == "classification":
        preset["label_smoothing"] = 0.1
    if values.get("time_limit"):  # the budget sets the epochs (your `epochs`, if any, is the most) and the
        preset.update(epochs=1000, patience=1000)  # cosine schedule runs to its planned end
    elif not torch.cuda.is_available():  # a CPU without a budget: timm's stem (SMALL_IMAGES)
        preset["min_feature_map"] = 0
    return {**preset, **values, "quality": quality}
