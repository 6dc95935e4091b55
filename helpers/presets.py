"""Quality presets (AutoGluon-style): defaults under the user's own keys, picked by `quality`
('medium' when only time_limit is set)."""
from __future__ import annotations


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


def with_quality(values: dict) -> dict:
    """The settings with their quality preset's defaults under them ('medium' when only
    time_limit is set); label smoothing for classification only; with time_limit, the epochs
    are what fits (at most `epochs` when you set it) and no early stop."""
    quality = values.get("quality") or ("medium" if values.get("time_limit") else "")
    if quality not in QUALITY:
        return values
    import torch  # imported here: reading a config with no preset needs no torch (the runner times its imports)

    preset = {**QUALITY_COMMON, **QUALITY[quality], **({} if torch.cuda.is_available() else QUALITY_CPU[quality])}
    if values.get("task", "classification") == "classification":
        preset["label_smoothing"] = 0.1
    if values.get("time_limit"):  # the budget sets the epochs (your `epochs`, if any, is the most) and the
        preset.update(epochs=1000, patience=1000)  # cosine schedule runs to its planned end
    elif not torch.cuda.is_available():  # a CPU without a budget: timm's stem (SMALL_IMAGES)
        preset["min_feature_map"] = 0
    return {**preset, **values, "quality": quality}
