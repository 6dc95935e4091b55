"""The experiment config: one flat, typed dataclass with a default and a comment per field.

A YAML file in configs/ overrides the defaults; papermill parameters or `--set key=value`
override the YAML. Unknown keys and wrong types are errors that name the key. A YAML file
may hold several experiments (one per model) under `experiments:`, each a mapping of
overrides on top of the file's shared settings:

    competition_dir: inputs/digits
    experiments:
      digits_resnet: {model_name: resnet18}
      digits_hybrid: {arch: hybrid, model_kwargs: {patch_size: 16}}

This module knows settings only: where outputs go is helpers.artifacts' business, and the
model registry (helpers.models) checks its own `model_kwargs`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .configfile import ROOT, parse_duration, read_yaml
from .presets import with_quality

ARCHS = ("timm", "hybrid")  # the model registry's keys (helpers.models.MODELS checks it has exactly these)


@dataclass
class CFG:
    # --- data -------------------------------------------------------------------------
    competition_dir: str = ""  # folder of the competition's CSVs and images (required; the demo's is inputs/digits)
    train_csv: str = "train.csv"  # relative to competition_dir (or absolute)
    test_csv: str = "test.csv"  # test ids; if missing, ids come from sample_submission
    sample_submission: str = "sample_submission.csv"  # the submission's shape: ids, order, columns
    solution_csv: str = "solution.csv"  # held-back test labels, for a local LB (optional)
    image_dir_train: str = "train"  # folder of training images, relative to competition_dir
    image_dir_test: str = "test"  # folder of test images
    id_col: str = "id"  # image id column; the file is <id><image_ext> (an id may carry its extension)
    target_col: str = "label"  # target column in train.csv (strings allowed)
    image_ext: str = ""  # image file extension; '' tries the id as is, then .jpg .jpeg .png
    metadata_cols: list = field(default_factory=list)  # tabular columns fed to the stacker
    group_col: str = ""  # rows sharing a group stay in one fold ((Stratified)GroupKFold)
    task: str = "classification"  # 'classification' | 'regression' | 'multilabel' (several labels per image)
    metric: str = "accuracy"  # classification: 'accuracy' | 'f1_macro' | 'roc_auc'; regression: 'rmse'; multilabel: 'f1_micro' | 'f1_macro' | 'map' | 'roc_auc' | 'f2_ciw'
    label_cols: list = field(default_factory=list)  # multilabel: one 0/1 column per label (else target_col holds the labels, label_sep apart)
    label_sep: str = " "  # multilabel: what separates the labels in target_col ("cloudy primary water")
    labels: list = field(default_factory=list)  # multilabel: the label vocabulary ([]: every label the training data names); others are errors
    allow_empty: bool = True  # multilabel: a row may have no label
    label_weights: dict = field(default_factory=dict)  # multilabel f2_ciw: importance weight per label (Sewer-ML's CIW; 1 where not given)
    # --- cross-validation ---------------------------------------------------------------
    n_folds: int = 5  # number of CV folds
    folds: list = field(default_factory=list)  # which folds to train; [] = all
    n_bins: int = 10  # regression: quantile bins of the target to stratify on
    seed: int = 42  # seed for python, numpy, torch and the folds
    # --- experiment -------------------------------------------------------------------
    experiment: str = "exp"  # output folder name under models/
    models_dir: str = "models"  # where experiments live
    submissions_dir: str = "submissions"  # where submission CSVs go
    # --- model ------------------------------------------------------------------------
    arch: str = "timm"  # model registry key: 'timm' (any timm backbone) | 'hybrid'
    model_name: str = "resnet18"  # timm backbone name (arch 'timm')
    model_kwargs: dict = field(default_factory=dict)  # the architecture's own settings: timm.create_model kwargs, or the hybrid's patch_size, patch_channels, featured_patch_dim, emb_dim, num_heads
    pretrained: bool = True  # timm models start from pretrained weights (pretrained_path, weights_dir, the Hugging Face cache, then the hub: helpers.weights); false trains from scratch
    pretrained_path: str = ""  # local .safetensors/.pth/.bin weights for internet-off kernels
    weights_dir: str = ""  # a folder of weight files (a Kaggle dataset), searched by model name before the Hugging Face cache and the hub (helpers.weights)
    img_size: int = 224  # images are resized to img_size x img_size
    in_chans: int = 3  # 3 = RGB; 1 = grayscale
    min_feature_map: int = 0  # small images: a timm CNN's stem strides are reduced (max-pool removed, then the first conv at stride 1) until its last map is at least this side (4: CIFAR's ResNet at 32 px); 0 = timm's stem. The quality presets set 4 and time_limit gives strides back where epochs do not fit
    drop_rate: float = 0.1  # dropout before the classifier
    # --- training ---------------------------------------------------------------------
    batch_size: int = 32  # images per step
    epochs: int = 10  # maximum epochs per fold
    lr: float = 1e-3  # peak learning rate (AdamW)
    min_lr: float = 1e-6  # learning rate at the end of the cosine schedule
    weight_decay: float = 1e-2  # AdamW weight decay
    warmup_epochs: int = 1  # linear warm-up epochs before the cosine decay
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    patience: int = 5  # early stopping: epochs without improvement of the CV metric
    augment: str = "light"  # augmentation preset: 'none' | 'light' | 'medium' | 'heavy'
    augment_pipeline: dict = field(default_factory=dict)  # an albumentations pipeline (A.to_dict form); replaces the preset
    hflip: bool = False  # presets add horizontal flips (off for text and digits, on for photos)
    tta: list = field(default_factory=list)  # test-time flips averaged at validation and test: 'hflip', 'vflip'
    loss: str = "auto"  # 'auto' (ce / mse / bce) | 'ce' | 'focal' | regression: 'bce' (Pawpularity) | 'mse' | multilabel: 'bce' | 'focal' | 'asl' (timm's asymmetric loss)
    pos_weight: str = ""  # multilabel bce: '' | 'balanced' (each label's negatives / positives, at most 100)
    label_pos_weight: dict = field(default_factory=dict)  # multilabel bce: a positive's weight for the labels named ({'crack': 20}), over 'balanced'
    label_smoothing: float = 0.0  # classification label smoothing
    class_weights: str = ""  # '' | 'balanced' (inverse class frequency)
    focal_alpha: float = 1.0  # focal loss weight
    focal_gamma: float = 2.0  # focal loss focusing exponent
    optimizer: str = "adamw"  # any timm optimizer name (create_optimizer_v2)
    scheduler: str = "cosine"  # any timm scheduler name (create_scheduler_v2)
    layer_decay: float = 0.0  # layer-wise LR decay for timm backbones (e.g. 0.75); 0 = off
    grad_accum: int = 1  # optimizer step every grad_accum batches
    mixup_alpha: float = 0.0  # timm Mixup alpha; 0 = off
    cutmix_alpha: float = 0.0  # timm CutMix alpha; 0 = off
    mixup_prob: float = 1.0  # probability of mixing a batch
    mixup_off_epoch: float = 0  # epoch from which Mixup/CutMix stop (0 = never); under 1, that share of the epochs the schedule runs (0.8: the last fifth without; a time-limited run plans its epochs)
    ema: bool = False  # keep EMA weights (timm ModelEmaV3); validated and checkpointed
    ema_decay: float = 0.998  # EMA decay per optimizer step
    freeze_epochs: int = 0  # backbone frozen for this many epochs, then trained at backbone_lr_scale
    backbone_lr_scale: float = 1.0  # backbone LR relative to the head
    drop_path: float = 0.0  # stochastic depth rate (timm drop_path_rate)
    channels_last: bool | None = None  # channels_last memory format; unset: on wherever AMP runs on a CUDA card with tensor cores (7.0+) or on a CPU
    compile: bool = False  # torch.compile the model
    sampling_ratio: float = 1.0  # train on this share of each fold's training rows
    cache: bool = True  # decoded-image cache: images resized once to img_size, memory-mapped uint8
    cache_dir: str = ""  # where the cache lives; '' = /kaggle/temp in a Kaggle kernel (scratch, not in the 20 GB of output), else .cache/
    keep_last: bool = False  # keep a finished fold's last.pt (optimizer and EMA state); off: its best weights only
    wandb: bool = False  # log epochs to Weights & Biases (offline when there is no API key)
    wandb_project: str = "kaggle-images"  # W&B project name
    num_workers: int = 2  # DataLoader worker processes
    ddp: int = 1  # processes that train one fold together (DistributedDataParallel, one per GPU; gloo on CPU); batch_size stays the global batch
    sync_bn: bool = False  # with ddp: BatchNorm statistics over every process's batch (SyncBatchNorm, GPUs only)
    amp_dtype: str = "auto"  # mixed precision: 'auto' (CUDA: bf16 on compute capability >= 8.0, else fp16 + GradScaler; CPU: bf16 where it computes it natively, AVX512-BF16/AMX, else off) | 'bf16' | 'fp16' | 'fp32' (off)
    device: str = "auto"  # 'auto' (cuda, mps, cpu) or an explicit torch device
    retrain: bool = False  # train a fold again even if it finished with this config
    stop_after: int = 0  # stop after this many epochs of the schedule of `epochs` (0 = at its end): the refit stops where its folds' best epochs were
    time_limit: str = ""  # the whole run's time budget ('20min', '8h', '1h30m'): epochs per fold (at most `epochs`), and if need be fewer folds, one holdout fold + a refit on all rows, a smaller image size, are planned to fit (helpers.budget)
    refit: str = ""  # after the CV: one more model on all rows for the folds' mean best epoch, test predictions only (no CV score): 'blend' (half the experiment's test predictions, the folds' mean the other half) | 'alone' (it replaces the folds') | '' (off); the same for every experiment
    quality: str = ""  # a preset of defaults: 'fast' | 'medium' | 'best' (QUALITY in helpers/presets.py; '' = none, 'medium' when time_limit is set); your keys win
    debug: bool = False  # tiny data, 1 epoch: check the whole path quickly
    debug_rows: int = 64  # rows kept in debug mode
    # --- stacking ---------------------------------------------------------------------
    features_from: str = "folds"  # embeddings from 'folds' (each fold's CNN) | 'pretrained' (a frozen pretrained backbone)
    stack_on: str = "oof"  # what a stacker of features_from 'folds' learns from, with the metadata: 'oof' (its CNN's out-of-fold predictions: honest for every row) | 'embeddings' (fold k's CNN's embeddings, of rows that CNN trained on) | 'both'
    stacker: str = "lgbm"  # 'lgbm' | 'svr' (SVR/SVC) | 'logistic' (logistic/ridge regression)
    stack_pca: int = 0  # PCA components of the embeddings (fitted per fold on its training rows); 0 = off
    stack_c: float = 1.0  # regularisation C of the svr / logistic heads
    lgbm_params: dict = field(default_factory=dict)  # LightGBM parameters over helpers.stacking.LGBM_DEFAULTS (n_estimators 2000, learning_rate 0.05, num_leaves 15, colsample_bytree 0.5, early_stopping_round 50, ...)
    # --- ensemble -------------------------------------------------------------------
    ensemble_method: str = "hill"  # 'hill' (hill climbing on OOF) | 'mean' | 'rank' (rank averaging)
    ensemble_iters: int = 50  # hill-climbing steps (forward selection with replacement)
    submission_name: str = ""  # the named copy submissions/<name>.csv ('' = ensemble_<method>_<time>, one per run)
    blend_others: list = field(default_factory=list)  # other experiments under models_dir to blend with the config's own (by name, '*' = every one of this competition), each only where its test predictions are of today's test files and its OOF rows are the config's
    members: list = field(default_factory=list)  # set from the config file: its experiments, which the ensemble blends (with their stackers); [] (a CFG made in Python) = every experiment of the competition under models_dir

    # --- derived paths (not settings) ---------------------------------------------------
    def path(self, name: str) -> Path:
        """A data file or folder of the competition (absolute paths stay as they are)."""
        p = Path(os.path.expanduser(name))
        if p.is_absolute():
            return p
        comp = Path(os.path.expanduser(self.competition_dir))
        return (comp if comp.is_absolute() else ROOT / comp) / p

    @property
    def label_text(self) -> list[str]:
        """The columns every reader keeps as text: a class or multi-label target ('NA', 'None',
        'null' and '0007' are labels, not NaN or numbers; only an empty cell is missing)."""
        return [self.target_col] if TASKS.get(self.task, {}).get("text_target", True) else []

    @property
    def fold_ids(self) -> list[int]:
        """The folds to train."""
        return list(self.folds) if self.folds else list(range(self.n_folds))


FIELDS = {f.name: f for f in dataclasses.fields(CFG)}
_HINTS = typing.get_type_hints(CFG)


# names the Kaggle "CFG notebook" and other trainers use for our keys, for the hint of an unknown key
KNOWN_AS = {"learning_rate": "lr", "size": "img_size", "image_size": "img_size", "model": "model_name",
            "n_fold": "n_folds", "num_folds": "n_folds", "trn_fold": "folds", "epoch": "epochs", "apex": "amp_dtype",
            "max_grad_norm": "grad_clip", "gradient_accumulation_steps": "grad_accum", "target": "target_col",
            "num_epochs": "epochs", "bs": "batch_size", "wd": "weight_decay", "smoothing": "label_smoothing",
            "workers": "num_workers", "model_arch": "model_name", "train_bs": "batch_size"}


# keys that moved under a mapping: the old flat key is an error that names its new place
MOVED = {**{k: "model_kwargs" for k in ("patch_size", "patch_channels", "featured_patch_dim", "emb_dim", "num_heads")},
         "lgbm_n_estimators": "lgbm_params.n_estimators", "lgbm_learning_rate": "lgbm_params.learning_rate",
         "lgbm_num_leaves": "lgbm_params.num_leaves", "lgbm_feature_fraction": "lgbm_params.colsample_bytree",
         "lgbm_early_stopping": "lgbm_params.early_stopping_round"}


RENAMED = {"amp": "amp_dtype (auto | bf16 | fp16 | fp32; amp: false is amp_dtype: fp32)"}


def moved_message(key: str) -> str:
    place = MOVED[key]
    parent, _, name = place.partition(".")
    return (f"config key '{key}' has moved: set it under {parent} "
            f"(e.g. {parent}: {{{name or key}: ...}})")


# keys for the whole run, not one experiment (the ensemble treats every member alike)
RUN_LEVEL = {key: f"config key '{key}' applies to every experiment of the run: set it at the top level of the YAML "
                 f"(or --set {key}=...), not under experiments" for key in ("refit", "blend_others")}


EPOCH_OR_SHARE = ("mixup_off_epoch",)  # an epoch number, or under 1 a share of the schedule's epochs


def check_value(key: str, value: Any) -> Any:
    """Coerce a value to the field's type, or raise naming the key."""
    if key == "refit" and (isinstance(value, bool) or value is None):  # YAML: true/yes/on, false/no/off
        value = "blend" if value else ""
    if key in MOVED:
        raise KeyError(moved_message(key))
    if key in RENAMED:
        raise KeyError(f"config key '{key}' is now {RENAMED[key]}")
    if key not in FIELDS:
        close = ([KNOWN_AS[key.lower()]] if key.lower() in KNOWN_AS else []) + difflib.get_close_matches(key, FIELDS, n=3)
        close = list(dict.fromkeys(close))[:3]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise KeyError(f"unknown config key '{key}'{hint}")
    typ = _HINTS[key]
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):  # Optional[...]
        if value is None:
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:  # an epoch number stays the int it was (what outputs were made from records it so)
            return int(number) if key in EPOCH_OR_SHARE and number.is_integer() else number
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typ is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif typ is dict:
        if isinstance(value, dict):
            return dict(value)
    raise TypeError(f"config key '{key}' expects {typ.__name__}, got {type(value).__name__} {value!r}")


def experiment_names(path: str | Path) -> list[str]:
    """The experiments a config file defines (one when it has no `experiments:` mapping)."""
    data = read_yaml(path)
    exps = data.get("experiments")
    if exps:
        return list(exps)
    return [data.get("experiment", CFG.experiment)]


def config_layers(path: str | Path | None, experiment: str = "", overrides: dict | None = None) -> list[tuple[str, dict]]:
    """The settings in the order they apply, each with where it came from: the YAML's shared
    settings, the experiment's own (`experiment` picks one of `experiments:`, '' = the first),
    then the overrides."""
    data = read_yaml(path) if path else {}
    exps = data.pop("experiments", None) or {}
    layers = [(str(path), data)]
    if exps:
        if not isinstance(exps, dict):
            raise ValueError(f"{path}: 'experiments' must map names to settings")
        name = experiment or next(iter(exps))
        if name not in exps:
            raise KeyError(f"experiment '{name}' is not in {path}; it has {', '.join(exps)}")
        layers.append((f"{path} experiments.{name}", {"experiment": name, **(exps[name] or {})}))
    elif experiment:
        layers.append(("experiment", {"experiment": experiment}))
    layers.append(("overrides", dict(overrides or {})))
    return layers


def resolve(path: str | Path | None = None, experiment: str = "", overrides: dict | None = None) -> tuple[CFG, list[str]]:
    """The config (defaults <- YAML shared settings <- the experiment's own <- overrides) and
    every problem of its keys and values, each naming the key, as `experiments.<name>.<key>`
    when the experiment's own settings hold it. Bad keys are left at their defaults."""
    values, origin, problems = {}, {}, []
    for where, layer in config_layers(path, experiment, overrides):
        prefix = f"experiments.{where.rsplit('experiments.', 1)[1]}." if " experiments." in where else ""
        for key, value in layer.items():
            try:
                values[key] = _layer_value(key, value, prefix)
                origin[key] = prefix
            except (KeyError, TypeError) as e:
                problems.append(_qualify(str(e.args[0]), key, prefix))
    cfg = CFG(**with_quality(_with_members(values, path)))
    problems += [_qualify(p, key, origin.get(key, "")) for key, p in value_problems(cfg)]
    return cfg, problems


def _layer_value(key: str, value: Any, prefix: str) -> Any:
    """One key of a config layer, checked; a key the config file sets for itself is refused."""
    if key == "members":
        raise KeyError("config key 'members' is the config file's experiments (the ensemble blends them): "
                       "name others to blend in 'blend_others'")
    value = check_value(key, value)
    if prefix and key in RUN_LEVEL:
        raise KeyError(RUN_LEVEL[key])
    return value


def _with_members(values: dict, path: str | Path | None) -> dict:
    """The config file's experiments, which its ensemble blends (none without a file)."""
    return {**values, "members": experiment_names(path)} if path else values


def _qualify(message: str, key: str, prefix: str) -> str:
    return message.replace(f"'{key}'", f"'{prefix}{key}'", 1) if prefix else message


def load_cfg(path: str | Path | None = None, experiment: str = "", overrides: dict | None = None) -> CFG:
    """Defaults <- YAML shared settings <- the experiment's own settings <- overrides. An
    unknown key or a wrong type raises (KeyError, TypeError), bad values raise ValueError
    listing every one; each names its key."""
    values, origin = {}, {}
    for where, layer in config_layers(path, experiment, overrides):
        prefix = f"experiments.{where.rsplit('experiments.', 1)[1]}." if " experiments." in where else ""
        for key, value in layer.items():
            try:
                values[key] = _layer_value(key, value, prefix)
            except (KeyError, TypeError) as e:
                raise type(e)(_qualify(str(e.args[0]), key, prefix)) from None
            origin[key] = prefix
    cfg = CFG(**with_quality(_with_members(values, path)))
    problems = [_qualify(p, key, origin.get(key, "")) for key, p in value_problems(cfg)]
    if problems:
        raise ValueError("\n".join(problems))
    return cfg


def check_config(cfg: CFG) -> None:
    """Raise ValueError listing every bad value of cfg, each naming its key."""
    problems = [p for _, p in value_problems(cfg)]
    if problems:
        raise ValueError("\n".join(problems))


# what the config knows of each task (helpers.tasks owns the rest): the metrics it takes, whether its
# target is text (class or label names: 'NA' is a class), whether Mixup/CutMix and rank averaging apply
TASKS = {"classification": {"metrics": ("accuracy", "f1_macro", "roc_auc"), "text_target": True, "mixes": True, "ranks": True},
         "regression": {"metrics": ("rmse",), "text_target": False, "mixes": False, "ranks": False},
         "multilabel": {"metrics": ("f1_micro", "f1_macro", "map", "roc_auc", "f2_ciw"), "text_target": True, "mixes": True,
                        "ranks": True}}
CHOICES = {
    "task": tuple(TASKS),
    "metric": ("accuracy", "f1_macro", "rmse", "roc_auc", "f1_micro", "map", "f2_ciw"),
    "arch": ARCHS,
    "in_chans": (1, 3),
    "amp_dtype": ("auto", "bf16", "fp16", "fp32"),
    "augment": ("none", "light", "medium", "heavy"),
    "loss": ("auto", "ce", "focal", "bce", "mse", "asl"),
    "pos_weight": ("", "balanced"),
    "class_weights": ("", "balanced"),
    "features_from": ("folds", "pretrained"),
    "stacker": ("lgbm", "svr", "logistic"),
    "stack_on": ("oof", "embeddings", "both"),
    "ensemble_method": ("hill", "mean", "rank"),
    "quality": ("", "fast", "medium", "best"),
    "refit": ("", "blend", "alone"),
}
# every count, rate and size, as an interval: '[' and ']' include the end, '(' and ')' do not
RANGES = {
    "n_folds": "[2, inf)", "n_bins": "[2, inf)", "seed": "[0, 4294967295]", "img_size": "[8, inf)",
    "drop_rate": "[0, 1)", "batch_size": "[1, inf)", "epochs": "[1, inf)", "lr": "(0, inf)", "min_lr": "[0, inf)",
    "weight_decay": "[0, inf)", "warmup_epochs": "[0, inf)", "grad_clip": "[0, inf)", "patience": "[1, inf)",
    "label_smoothing": "[0, 1)", "focal_alpha": "(0, inf)", "focal_gamma": "[0, inf)", "layer_decay": "[0, 1]",
    "grad_accum": "[1, inf)", "mixup_alpha": "[0, inf)", "cutmix_alpha": "[0, inf)", "mixup_prob": "[0, 1]",
    "mixup_off_epoch": "[0, inf)", "ema_decay": "[0, 1)", "freeze_epochs": "[0, inf)", "backbone_lr_scale": "[0, inf)",
    "drop_path": "[0, 1)", "min_feature_map": "[0, inf)", "sampling_ratio": "(0, 1]", "num_workers": "[0, inf)", "debug_rows": "[1, inf)", "ddp": "[1, inf)",
    "stack_pca": "[0, inf)", "stack_c": "(0, inf)", "ensemble_iters": "[1, inf)",
}


def _outside(value: float, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    below = value < low if interval[0] == "[" else value <= low
    above = value > high if interval[-1] == "]" else value >= high
    return below or above


def value_problems(cfg: CFG) -> list[tuple[str, str]]:
    """(key, problem) for every value of cfg out of its choices or range, or inconsistent."""
    out = []
    if not cfg.competition_dir:
        out.append(("competition_dir", "config key 'competition_dir' is not set: point it at your competition's folder "
                                       "(its CSVs and images); the demo's config, configs/digits.yaml, uses inputs/digits"))
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            out.append((key, f"config key '{key}' must be one of {allowed}, got {getattr(cfg, key)!r}"))
    for key, interval in RANGES.items():
        if _outside(getattr(cfg, key), interval):
            out.append((key, f"config key '{key}' must be in {interval.replace('inf', '∞')}, got {getattr(cfg, key)!r}"))
    for key in EPOCH_OR_SHARE:
        if getattr(cfg, key) > 1 and not float(getattr(cfg, key)).is_integer():
            out.append((key, f"config key '{key}' is an epoch number (a whole one) or a share of the epochs under 1, "
                             f"got {getattr(cfg, key)!r}"))
    task = TASKS.get(cfg.task, {"metrics": CHOICES["metric"], "mixes": True, "ranks": True})
    if cfg.metric in CHOICES["metric"] and cfg.metric not in task["metrics"]:
        out.append(("metric", f"config key 'metric': {cfg.task} takes {task['metrics']}, got {cfg.metric!r}"))
    for key in ("label_weights", "label_pos_weight"):
        bad = {k: v for k, v in getattr(cfg, key).items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0}
        if bad:
            out.append((key, f"config key '{key}' takes a positive number per label, got {bad}"))
    try:
        if cfg.time_limit and parse_duration(cfg.time_limit) <= 0:
            out.append(("time_limit", f"config key 'time_limit' must be more than 0, got {cfg.time_limit!r}"))
    except ValueError as e:
        out.append(("time_limit", str(e)))
    bad_tta = [t for t in cfg.tta if t not in ("hflip", "vflip")]
    if bad_tta:
        out.append(("tta", f"config key 'tta' takes 'hflip' and 'vflip', got {bad_tta}"))
    if not task["mixes"] and (cfg.mixup_alpha or cfg.cutmix_alpha):
        out.append(("mixup_alpha", f"config keys 'mixup_alpha'/'cutmix_alpha': Mixup/CutMix mix classes; {cfg.task} has none"))
    if cfg.ensemble_method == "rank" and not task["ranks"]:
        out.append(("ensemble_method", f"config key 'ensemble_method': rank averaging loses a {cfg.task} target's scale; "
                                       "use 'hill' or 'mean'"))
    if cfg.min_lr > cfg.lr:
        out.append(("min_lr", f"config key 'min_lr' ({cfg.min_lr}) is above 'lr' ({cfg.lr})"))
    bad = [f for f in cfg.folds if not 0 <= f < cfg.n_folds]
    if bad:
        out.append(("folds", f"config key 'folds' has folds outside 0..{cfg.n_folds - 1}: {bad}"))
    if cfg.image_ext and (not cfg.image_ext.startswith(".") or any(c in cfg.image_ext for c in "/\\")):
        out.append(("image_ext", f"config key 'image_ext' is a file extension such as '.jpg' (or '' to try the usual "
                                 f"ones), got {cfg.image_ext!r}"))
    for key in ("experiment", "submission_name"):
        why = name_problem(getattr(cfg, key), empty_ok=key == "submission_name")
        if why:
            out.append((key, f"config key '{key}' {why}, got {getattr(cfg, key)!r}"))
    if cfg.batch_size % cfg.ddp:
        out.append(("batch_size", f"config key 'batch_size' ({cfg.batch_size}) must split evenly among the ddp={cfg.ddp} "
                                  f"processes (it is the global batch): use a multiple of {cfg.ddp}"))
    return out


def name_problem(name: str, empty_ok: bool = False) -> str | None:
    """Why a name that becomes a folder or file name (an experiment, a submission) is not a plain
    one, or None: no path separator, no '..', not hidden, nothing outside its folder."""
    if not name:
        return None if empty_ok else "is empty"
    if "/" in name or "\\" in name or "\0" in name:
        return "names a folder or file of its own: it may not hold '/' or '\\'"
    if name.startswith(".") or name.strip() != name:
        return "may not start with '.' or with or end in spaces"
    if len(name) > 100:
        return "is longer than 100 characters"
    return None


def to_dict(cfg: CFG) -> dict:
    return dataclasses.asdict(cfg)


def cfg_from_dict(data: dict) -> CFG:
    """A CFG from a saved mapping (a checkpoint's or a snapshot's config). Keys that have
    moved since it was saved are carried to their new place."""
    data = dict(data)
    data.setdefault("min_feature_map", 0)  # saved before the key: trained with timm's own stem
    if "amp" in data:
        data["amp_dtype"] = "auto" if data.pop("amp") else "fp32"
    for key in [k for k in data if k in MOVED]:
        parent, _, name = MOVED[key].partition(".")
        value = data.pop(key)
        if parent == "model_kwargs" and data.get("arch") != "hybrid":
            continue  # the hybrid's settings meant nothing to another architecture
        data[parent] = {**data.get(parent, {}), (name or key): value}
    return CFG(**{k: check_value(k, v) for k, v in data.items()})
