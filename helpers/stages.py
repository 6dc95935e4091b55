"""The stage graph, declared once, as data: each notebook stage and the outputs it makes; for
each output, the files that stand for it, the config keys, input files and upstream outputs it
is made from. The runner (what to run, in which order, and why), freshness (what an output
records and when it is stale), the time budget (the stages after training) and --dry-run all
read it; none keeps a list of its own.

An output is named by its kind and, for per-fold outputs, its part: ('train', 3) is fold 3's
model and OOF predictions, ('features', None) a frozen backbone's embeddings of every row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .artifacts import REFIT
from .config import CFG, FIELDS, to_dict

# --- the config keys outputs are made from ---------------------------------------------------------
# settings that never change a result: where things are (the data's digests stand for it), what
# to run now, and speed switches that keep the arithmetic
RUN_ONLY = frozenset({"competition_dir", "train_csv", "test_csv", "sample_submission", "solution_csv", "image_dir_train",
                      "image_dir_test", "experiment", "models_dir", "submissions_dir", "folds", "retrain", "num_workers",
                      "device", "cache", "cache_dir", "wandb", "wandb_project", "compile", "channels_last",
                      "submission_name", "keep_last", "ddp", "quality", "time_limit",
                      "members", "blend_others"})  # which experiments the ensemble blends: its upstream says
FOLD_KEYS = ("id_col", "target_col", "task", "n_folds", "seed", "group_col", "debug", "debug_rows")
FEATURE_KEYS = ("features_from",)
STACK_KEYS = ("metadata_cols", "stacker", "stack_on", "stack_pca", "stack_c", "lgbm_params")
ENSEMBLE_KEYS = ("metric", "ensemble_method", "ensemble_iters", "refit")
PRETRAINED_KEYS = ("arch", "model_name", "model_kwargs", "pretrained", "pretrained_path", "weights_dir", "img_size", "in_chans",
                   "min_feature_map", "image_ext")
EDA_KEYS = ("id_col", "target_col", "task", "metadata_cols", "seed", "debug", "debug_rows", "image_ext")
CHECK_KEYS = FOLD_KEYS + PRETRAINED_KEYS + ("n_bins", "metadata_cols")
# a task's own keys count only for that task (so they leave other tasks' outputs alone): the
# multi-label label matrix and weights, the regression bins (helpers.tasks, each task's `keys`)
TASK_KEYS = {"folds": {"regression": ("n_bins",), "multilabel": ("label_cols", "label_sep", "labels")},
             "train": {"multilabel": ("label_weights", "pos_weight", "label_pos_weight")},
             "stacking": {"multilabel": ("metric", "label_weights")},
             "ensemble": {"multilabel": ("allow_empty", "label_weights", "label_sep")}}
# everything else changes what a fold's CNN learns (the metric too: it picks the best epoch)
_NOT_TRAINING = {k for kind in ("folds", "train", "ensemble") for ks in TASK_KEYS[kind].values() for k in ks}
TRAIN_KEYS = tuple(k for k in FIELDS if k not in RUN_ONLY | _NOT_TRAINING | set(FOLD_KEYS + FEATURE_KEYS + STACK_KEYS)
                   | {"n_bins", "ensemble_method", "ensemble_iters", "refit", "stop_after"})  # the refit's stop: from its folds


def output_keys(cfg: CFG, kind: str) -> tuple:
    """The config keys an output of `kind` ('folds', 'train', 'stacking', 'ensemble') is made from."""
    base = {"folds": FOLD_KEYS, "train": TRAIN_KEYS, "stacking": STACK_KEYS, "ensemble": ENSEMBLE_KEYS}[kind]
    return base + TASK_KEYS[kind].get(cfg.task, ())


def values(cfg: CFG, names) -> dict:
    """{key: value} of these config keys."""
    settings = to_dict(cfg)
    return {k: settings[k] for k in names}


# --- outputs -------------------------------------------------------------------------------------
Part = int | str | None
Parts = list[tuple[str, Part]]


@dataclass(frozen=True)
class Output:
    """One kind of output: the files that must exist for it (in its folder: the experiment's,
    its stacker's or the ensemble's; {k} the fold, {f} 'all' or 'fold<k>', {each} every fold of
    cfg.fold_ids), the config keys it
    is made from, the input files it reads (freshness.INPUTS names them) and the outputs it is
    made from."""

    files: tuple[str, ...]
    keys: Callable[[CFG, Part], dict]
    inputs: Callable[[Part], tuple[str, ...]]
    upstream: Callable[[CFG, Part], Parts] = lambda cfg, part: []
    folder: str = "experiment"
    experiments: bool = False  # made from every experiment of the competition (the ensemble)
    needs: tuple[str, ...] = ()  # the upstream kinds that must be up to date before it is made (the others are recorded)


def _no_keys(cfg: CFG, part: Part) -> dict:
    return {}


def _feature_keys(cfg: CFG, part: Part) -> dict:
    if part is None:  # a frozen pretrained backbone: made from the images alone, rows in train.csv's order
        return values(cfg, FEATURE_KEYS + PRETRAINED_KEYS + (("debug", "debug_rows", "seed") if cfg.debug else ("debug",)))
    return values(cfg, FEATURE_KEYS)


def _feature_inputs(part: Part) -> tuple[str, ...]:
    return ("train_csv", "train_images", "test") if part is None else ("test",)  # a fold model's: the test set's


def stack_inputs(cfg: CFG) -> str:
    """What the stacker learns from: `stack_on`, but a frozen backbone's embeddings for
    features_from 'pretrained', and fold k's embeddings where one fold gives no other fold's
    OOF rows to learn from (`folds: [0]`, a time_limit holdout)."""
    return "embeddings" if cfg.features_from == "pretrained" or len(cfg.fold_ids) < 2 else cfg.stack_on


def _stacker_sources(cfg: CFG, part: Part) -> Parts:
    if cfg.features_from == "pretrained":
        return [("folds", None), ("features", None)]
    inputs = stack_inputs(cfg)
    return [("folds", None), *([("cv", None)] if inputs != "embeddings" else []),
            *([("features", k) for k in cfg.fold_ids] if inputs != "oof" else [])]


def reads(*names: str) -> Callable[[Part], tuple[str, ...]]:
    return lambda part: names


OUTPUTS: dict[str, Output] = {
    "check": Output((), lambda cfg, part: values(cfg, CHECK_KEYS), reads("train_csv", "train_images", "test", "sample_submission")),
    "eda": Output((), lambda cfg, part: values(cfg, EDA_KEYS), reads("train_csv", "train_images", "test")),
    "folds": Output(("folds.csv",), lambda cfg, part: values(cfg, output_keys(cfg, "folds")), reads("train_csv")),
    "train": Output(("fold{k}/best.pt", "oof_fold{k}.csv"), lambda cfg, part: {**values(cfg, output_keys(cfg, "train")), "fold": part},
                    reads("train_images"), lambda cfg, part: [("folds", None)]),
    "test": Output(("test_fold{k}.csv",), _no_keys, reads("test"), lambda cfg, part: [("train", part)], needs=("train",)),
    "refit": Output(("refit/best.pt",), lambda cfg, part: {**values(cfg, output_keys(cfg, "train")), "fold": REFIT}, reads("train_images"),
                    lambda cfg, part: [("folds", None), *[("train", k) for k in cfg.fold_ids]],  # the folds' epochs say how long
                    needs=("train",)),
    "refit_test": Output(("test_refit.csv",), _no_keys, reads("test"), lambda cfg, part: [("refit", None)], needs=("refit",)),
    "cv": Output(("oof.csv", "test.csv", "score.json"), _no_keys, reads(),
                 lambda cfg, part: [(s, k) for k in cfg.fold_ids for s in ("train", "test")], needs=("train", "test")),
    "features": Output(("features/train_{f}.npy", "features/test_{f}.npy"), _feature_keys, _feature_inputs,
                       lambda cfg, part: [] if part is None else [("train", part)], needs=("train",)),
    "stacking": Output(("oof.csv", "test.csv", "score.json", "stacker_fold{each}/meta.json"),
                       lambda cfg, part: {**values(cfg, output_keys(cfg, "stacking")), "folds": cfg.fold_ids},
                       reads("train_csv", "test_csv"), _stacker_sources, folder="stacker", needs=("features", "cv")),
    "ensemble": Output(("score.json",), lambda cfg, part: values(cfg, output_keys(cfg, "ensemble")),
                       reads("train_csv", "sample_submission", "solution"), folder="ensemble", experiments=True),
}


def output_name(kind: str, part: Part = None) -> str:
    """'folds', 'train_fold0', 'features_all', ...: the name of one output and of its stamp."""
    if kind == "features":
        return f"features_{'all' if part is None else f'fold{part}'}"
    return kind if part is None else f"{kind}_fold{part}"


def parse_name(name: str) -> tuple[str, Part]:
    """output_name's inverse."""
    if name in ("refit", "refit_test"):
        return name, None
    kind, _, part = name.partition("_")
    return kind, (int(part[4:]) if part.startswith("fold") else None)


# --- the notebooks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """A notebook: run once ('run'), per experiment, or per fold (and the refit); the outputs
    it makes for a part; whether its work comes after training (the time budget keeps time for
    it)."""

    name: str
    scope: str
    kinds: tuple[str, ...]  # the kinds of output it makes
    makes: Callable[[CFG, Part], Parts] = field(repr=False)
    after_training: bool = False


def _training(cfg: CFG, part: Part) -> Parts:
    return [("refit", None), ("refit_test", None)] if part == REFIT else [("train", part), ("test", part)]


def _features(cfg: CFG, part: Part) -> Parts:
    if cfg.features_from == "pretrained":
        return [("features", None)]
    return [("cv", None), *([("features", k) for k in cfg.fold_ids] if stack_inputs(cfg) != "oof" else [])]


STAGES: tuple[Stage, ...] = (
    Stage("00_eda", "run", ("eda",), lambda cfg, part: [("eda", None)]),
    Stage("01_folds", "experiment", ("folds",), lambda cfg, part: [("folds", None)]),
    Stage("02_train", "fold", ("train", "test", "refit", "refit_test"), _training),
    Stage("03_features", "experiment", ("cv", "features"), _features, after_training=True),
    Stage("04_stacking", "experiment", ("stacking",), lambda cfg, part: [("stacking", None)], after_training=True),
    Stage("05_ensemble", "run", ("ensemble",), lambda cfg, part: [("ensemble", None)], after_training=True),
)
BY_NAME = {s.name: s for s in STAGES}
TRAIN = next(s.name for s in STAGES if s.scope == "fold")  # folds side by side (GPUs, Ray), or several in one kernel
EMBED = next(s.name for s in STAGES if s.after_training)  # the first after training: it starts like a training kernel
FINAL = STAGES[-1].name  # made from every experiment: once, at the end
QUICK = ("01_folds",)  # little work beyond a notebook's start: the time budget measures that start on it
NAMES = [s.name for s in STAGES]
MAKER = {kind: s.name for s in STAGES for kind in s.kinds}  # the notebook that makes each kind of output
