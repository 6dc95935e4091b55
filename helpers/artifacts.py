"""Where every output lives, how it is written, and the one rule that says whether it is fresh.

Layout (under models_dir; /kaggle/working when the repository is a read-only Kaggle dataset):

    <exp>/config.yaml                 the resolved config of the latest notebook run (a snapshot to read)
    <exp>/folds.csv                   01_folds: the training rows with their `fold`
    <exp>/fold{k}/best.pt             the best weights and the config they were trained with
    <exp>/fold{k}/last.pt             resumable state after every epoch (a killed run resumes)
    <exp>/fold{k}/metrics.jsonl       one line per epoch
    <exp>/oof_fold{k}.csv, oof_logits_fold{k}.npy, test_fold{k}.csv      fold k's predictions
    <exp>/oof.csv, oof_logits.npy, test.csv, score.json                  every fold together
    <exp>/refit/best.pt, metrics.jsonl; <exp>/test_refit.csv    `refit`: one model on all rows, test only
    <exp>/features/{train,test}_fold{k}.npy (or _all.npy), train_ids.csv, test_ids.csv
    <exp>/eda/, analysis/, notebooks/, train.log
    <exp>_<stacker>/oof.csv, test.csv, score.json, importance.csv       04_stacking
    ensemble/score.json, scores.png, correlation.png                     05_ensemble
    results.csv                       every experiment's CV and the ensemble's
    <exp>/stamps/<output>.json        what each output was made from (below)
  submissions_dir/submission.csv and a named copy per run

Freshness. Every output records a fingerprint of what it was made from: the config keys that
change it, digests of the input files it read (the CSVs' contents; the listed images' paths,
sizes and mtimes), and the build ids of the outputs it used. It is up to date only when that
record equals the fingerprint computed now. `stale()` says why not: the key with its old and
new values, the file, or the upstream output that was remade or must be remade first. Every
build gets a new id, so a rebuild (retrain, --force, a GPU run that is not bit-exact) redoes
what was made from it; an upstream output that is not up to date makes everything after it
wait ('pending'), and the stages refuse to build from it (`require`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .config import CFG, FIELDS, ROOT, cfg_from_dict, to_dict
from .utils import atomic_save, atomic_save_npy, atomic_to_csv, atomic_write_text, read_table


# --- roots ------------------------------------------------------------------------------------
KAGGLE_WORKING = Path("/kaggle/working")  # a Kaggle kernel's output folder
OUTPUT_ROOT_ENV = "HELPERS_OUTPUT_ROOT"  # set by the runner, so that its notebook kernels use its root


def output_root() -> Path:
    """Where relative output folders (models/, submissions/, .cache/) go: the runner's choice
    when it started this process, else the repository, or, when it is read-only (added to a
    Kaggle kernel as a dataset), /kaggle/working, else the working directory."""
    if os.environ.get(OUTPUT_ROOT_ENV):
        return Path(os.environ[OUTPUT_ROOT_ENV])
    if os.access(ROOT, os.W_OK):
        return ROOT
    return KAGGLE_WORKING if KAGGLE_WORKING.is_dir() else Path.cwd()


def under_root(p: str | Path) -> Path:
    """An output path: absolute as given, relative under output_root()."""
    path = Path(os.path.expanduser(str(p)))
    return path if path.is_absolute() else output_root() / path


def models_root(cfg: CFG) -> Path:
    return under_root(cfg.models_dir)


def exp_dir(cfg: CFG) -> Path:
    """models/<experiment>: everything this experiment produced."""
    return models_root(cfg) / cfg.experiment


KAGGLE_SCRATCH = Path("/kaggle/temp")  # a Kaggle kernel's scratch space: not kept, not counted in its output


def cache_dir(cfg: CFG) -> Path:
    """cfg.cache_dir; '' means Kaggle's scratch space in a kernel (made when missing: a cache in
    /kaggle/working would count against the 20 GB of output), else .cache/ under the output root."""
    if cfg.cache_dir:
        return under_root(cfg.cache_dir)
    if KAGGLE_WORKING.is_dir():
        try:
            KAGGLE_SCRATCH.mkdir(parents=True, exist_ok=True)
            return KAGGLE_SCRATCH / "cache"
        except OSError:
            pass
    return under_root(".cache")


def unwritable(cfg: CFG) -> list[str]:
    """The output folders (models_dir, submissions_dir, cache_dir) this process cannot write,
    each naming its key: found before any work, not after the first fold."""
    problems = []
    for key, folder in (("models_dir", models_root(cfg)), ("submissions_dir", under_root(cfg.submissions_dir)),
                        ("cache_dir", cache_dir(cfg))):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            problems.append(f"config key '{key}': cannot write to {folder} ({e.strerror or type(e).__name__}); "
                            f"point it at a writable folder")
    return problems


# --- layout -----------------------------------------------------------------------------------
REFIT = "refit"  # the "fold" of the model trained on all rows (`refit`): no validation rows, no OOF


def refit_on(cfg: CFG) -> bool:
    """Whether the experiment trains a refit: `refit` set, and its fold CNNs are ensemble members
    (features_from: folds)."""
    return bool(cfg.refit) and cfg.features_from == "folds"


def fold_name(fold: int | str) -> str:
    """'fold3', or 'refit' for the model on all rows."""
    return REFIT if fold == REFIT else f"fold{fold}"


def fold_dir(cfg: CFG, fold: int | str) -> Path:
    return exp_dir(cfg) / fold_name(fold)


def checkpoint_path(cfg: CFG, fold: int, which: str = "best") -> Path:
    return fold_dir(cfg, fold) / f"{which}.pt"


def metrics_path(cfg: CFG, fold: int) -> Path:
    return fold_dir(cfg, fold) / "metrics.jsonl"


def folds_path(cfg: CFG) -> Path:
    return exp_dir(cfg) / "folds.csv"


def predictions_path(cfg: CFG, kind: str, fold: int | None = None) -> Path:
    """oof.csv / test.csv of the experiment, or oof_fold{k}.csv / test_fold{k}.csv."""
    return exp_dir(cfg) / (f"{kind}.csv" if fold is None else f"{kind}_{fold_name(fold)}.csv")


def logits_path(cfg: CFG, fold: int | None = None) -> Path:
    """The OOF rows' raw outputs, rows as in the matching OOF file."""
    return exp_dir(cfg) / ("oof_logits.npy" if fold is None else f"oof_logits_fold{fold}.npy")


def score_path(cfg: CFG) -> Path:
    return exp_dir(cfg) / "score.json"


def feature_dir(cfg: CFG) -> Path:
    return exp_dir(cfg) / "features"


def feature_path(cfg: CFG, split: str, fold: int | None) -> Path:
    """Embeddings of 'train' or 'test' by fold k's CNN (fold None: the frozen backbone's)."""
    return feature_dir(cfg) / f"{split}_{'all' if fold is None else f'fold{fold}'}.npy"


def stack_cfg(cfg: CFG) -> CFG:
    """The stacker's own experiment: models/<experiment>_<stacker> (e.g. digits_resnet18_lgbm)."""
    return dataclasses.replace(cfg, experiment=f"{cfg.experiment}_{cfg.stacker}")


def ensemble_dir(cfg: CFG) -> Path:
    return models_root(cfg) / "ensemble"


def eda_dir(cfg: CFG) -> Path:
    return exp_dir(cfg) / "eda"


def analysis_dir(cfg: CFG) -> Path:
    return exp_dir(cfg) / "analysis"


def notebook_path(cfg: CFG, name: str, ensemble: bool = False) -> Path:
    """Where the runner saves an executed notebook."""
    return (ensemble_dir(cfg) if ensemble else exp_dir(cfg)) / "notebooks" / f"{name}.ipynb"


def log_path(cfg: CFG, name: str = "train.log") -> Path:
    return exp_dir(cfg) / name


def results_path(cfg: CFG) -> Path:
    return models_root(cfg) / "results.csv"


def predictions_dir(name: str) -> Path:
    """predictions/<name>: what the prediction CLI saves with --save."""
    return under_root("predictions") / name


# names the project writes under models_dir beside the experiments' folders
RESERVED = {"ensemble": "ensemble folder (05_ensemble's score, plots and time ledger)", "results.csv": "results table"}


def name_problems(cfgs: list[CFG]) -> list[str]:
    """Experiment names that collide with a folder or file the project writes under models_dir:
    05_ensemble's folder, the results table, another experiment's folder or stacker folder
    (<exp>_<stacker>), in any letter case (one folder on a case-insensitive disk); a submission
    name that is submission.csv's. Each names the experiments and what they collide on."""
    claims: dict[str, list[str]] = {k.casefold(): [f"the project's {v}"] for k, v in RESERVED.items()}
    for cfg in cfgs:
        claims.setdefault(cfg.experiment.casefold(), []).append(f"experiment '{cfg.experiment}'")
        claims.setdefault(stack_cfg(cfg).experiment.casefold(), []).append(f"experiment '{cfg.experiment}''s stacker")
    problems = [f"{' and '.join(dict.fromkeys(who))} would share the folder {cfgs[0].models_dir}/{name}: rename the experiment"
                for name, who in claims.items() if len(dict.fromkeys(who)) > 1]
    for cfg in cfgs:
        if cfg.submission_name and cfg.submission_name.casefold() in ("submission", "submission.csv"):
            problems.append(f"config key 'submission_name' {cfg.submission_name!r} is submission.csv's own name: give the "
                            f"named copy another (or leave it empty)")
    return list(dict.fromkeys(problems))


# --- formats ----------------------------------------------------------------------------------
def save_config(cfg: CFG, path: Path | None = None) -> Path:
    """The resolved config as YAML (models/<experiment>/config.yaml by default)."""
    path = path or exp_dir(cfg) / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def read_config(path: str | Path) -> CFG:
    """A config snapshot (config.yaml) or a folder holding one."""
    path = Path(path)
    path = path / "config.yaml" if path.is_dir() else path
    return cfg_from_dict(yaml.safe_load(path.read_text()) or {})


def write_folds(cfg: CFG, folds: pd.DataFrame) -> None:
    atomic_to_csv(folds, folds_path(cfg))


def read_folds(cfg: CFG) -> pd.DataFrame:
    return read_table(folds_path(cfg), cfg.id_col, cfg.label_text)


def _plain(value):
    """A checkpoint's payload in the types torch.load(weights_only=True) reads: numpy arrays as
    tensors, numpy numbers as Python's; nothing that unpickling would run."""
    import torch

    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_checkpoint(payload: dict, path: Path) -> None:
    """A checkpoint: a dict with 'model' (the state dict) and 'cfg' (the config as a dict), in
    types that load without running code (load_checkpoint). Weights that are not finite are
    refused: a NaN model is never kept as trained."""
    import torch

    bad = [k for k, t in payload.get("model", {}).items() if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"{path}: not saved: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {', '.join(bad[:3])})")
    atomic_save(_plain(payload), path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint saved by save_checkpoint, loaded with torch.load(weights_only=True): tensors,
    numbers, text, lists and dicts only. A file that holds anything else (an older version's
    checkpoint, or one crafted to run code) is refused, not loaded."""
    import pickle

    import torch

    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (train the fold with 02_train first)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not loaded: it holds objects other than weights, numbers and text "
                         f"({str(e).strip().splitlines()[-1][:200]}), and loading those could run code. A checkpoint "
                         f"of an older version of helpers: train the fold again (retrain: true)") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated, not a torch file
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).strip()[:200]}): train the "
                         f"fold again (retrain: true)") from None


# how to run a model, not what it is: taken from the machine that runs it, not from the checkpoint
# (a model compiled on an H100 is not compiled on a P100; bf16 training does not force bf16 on a T4)
RUNTIME_KEYS = ("amp_dtype", "compile", "device", "num_workers", "cache", "cache_dir")


def checkpoint_config(ckpt: dict, runtime: CFG | None = None) -> CFG:
    """The config a checkpoint's weights were trained with (its `pretrained` says which
    preprocessing they expect; helpers.train.load_model builds the model without download),
    with the RUNTIME_KEYS of `runtime` (the defaults when None)."""
    cfg = cfg_from_dict(ckpt["cfg"])
    return dataclasses.replace(cfg, **{k: getattr(runtime or CFG(), k) for k in RUNTIME_KEYS})


def write_metrics(cfg: CFG, fold: int, history: list[dict]) -> None:
    atomic_write_text(metrics_path(cfg, fold), "".join(json.dumps(r) + "\n" for r in history))


def read_metrics(cfg: CFG, fold: int) -> list[dict]:
    path = metrics_path(cfg, fold)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pred_columns(cfg: CFG, classes: list | None) -> list[str]:
    """Prediction columns of OOF/test files: one probability per class, or `pred`."""
    return ["pred"] if cfg.task == "regression" else [f"prob_{c}" for c in classes]


def frame_predictions(ids: pd.Series, preds: np.ndarray, cfg: CFG, classes: list | None) -> pd.DataFrame:
    """An OOF/test frame: the id column, then one column per class probability (or `pred`)."""
    cols = pred_columns(cfg, classes)
    out = pd.DataFrame(np.asarray(preds).reshape(len(ids), len(cols)), columns=cols)
    out.insert(0, cfg.id_col, ids.to_numpy())
    return out


def oof_targets(cfg: CFG, oof: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(y_true, y_pred) of an OOF frame: class indices + probabilities, 0/1 per label +
    probabilities (multi-label), or values."""
    if cfg.task == "regression":
        return oof[cfg.target_col].to_numpy(float), oof["pred"].to_numpy(float)
    cols = [c for c in oof.columns if c.startswith("prob_")]
    if cfg.task == "multilabel":
        from .data import label_matrix

        return label_matrix(oof[cfg.target_col], [c[len("prob_"):] for c in cols], cfg.label_sep), oof[cols].to_numpy(float)
    index = {c[len("prob_"):]: i for i, c in enumerate(cols)}
    return oof[cfg.target_col].astype(str).map(index).to_numpy(), oof[cols].to_numpy(float)


def nonfinite_rows(values) -> np.ndarray:
    """Rows of a prediction array (or frame of numbers) holding NaN or inf."""
    values = np.asarray(values, dtype=float)
    return np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(1))


def finite_or_raise(values, what: str) -> None:
    """Raise naming `what` and its rows when predictions hold NaN or inf: none is ever written,
    scored or blended."""
    bad = nonfinite_rows(values)
    if len(bad):
        raise ValueError(f"{what}: {len(bad)} row(s) of predictions are NaN or inf (rows {bad[:5].tolist()}"
                         f"{' ...' if len(bad) > 5 else ''}); predictions that are not numbers are never written, scored "
                         f"or blended: remake what made them")


def write_predictions(cfg: CFG, kind: str, frame: pd.DataFrame, fold: int | None = None) -> Path:
    """An OOF or test prediction file (its id, target and fold columns kept as they are); a NaN
    or inf prediction is refused."""
    path = predictions_path(cfg, kind, fold)
    finite_or_raise(frame[[c for c in frame.columns if c.startswith("prob_") or c == "pred"]], str(path))
    atomic_to_csv(frame, path)
    return path


def read_predictions(cfg: CFG, kind: str, fold: int | None = None) -> pd.DataFrame:
    return read_table(predictions_path(cfg, kind, fold), cfg.id_col, cfg.label_text)


def save_logits(cfg: CFG, logits: np.ndarray | None, fold: int | None = None) -> None:
    """Raw outputs of the OOF rows; None removes an earlier run's file (a run that kept none)."""
    if logits is None:
        logits_path(cfg, fold).unlink(missing_ok=True)
    else:
        atomic_save_npy(np.asarray(logits, dtype=np.float32), logits_path(cfg, fold))


def write_score(cfg: CFG, score: dict) -> None:
    atomic_write_text(score_path(cfg), json.dumps(score, indent=1))


def read_score(folder: Path, missing_ok: bool = False) -> dict | None:
    """score.json of an experiment folder (None when it has none and missing_ok)."""
    path = Path(folder) / "score.json"
    if missing_ok and not path.exists():
        return None
    return json.loads(path.read_text())


def score_thresholds(score: dict | None, classes: list | None) -> list[float] | None:
    """Multi-label: each label's decision threshold, in the classes' order, from a score.json
    (an experiment's or the ensemble's, tuned on its OOF predictions); None when none were tuned."""
    saved = (score or {}).get("thresholds")
    if not saved or classes is None:
        return None
    return [float(saved.get(str(c), 0.5)) for c in classes]


def read_experiment(folder: Path, cfg: CFG) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(OOF predictions, test predictions) of an experiment folder (experiment_dirs)."""
    return (read_table(Path(folder) / "oof.csv", cfg.id_col, cfg.label_text),
            read_table(Path(folder) / "test.csv", cfg.id_col))


def save_features(cfg: CFG, split: str, fold: int | None, array: np.ndarray) -> None:
    """Embeddings as float16; NaN or inf ones (or values float16 cannot hold) are refused."""
    path = feature_path(cfg, split, fold)
    array = np.asarray(array).astype(np.float16)
    finite_or_raise(array, f"{path} (embeddings)")
    atomic_save_npy(array, path)


def load_features(cfg: CFG, split: str, fold: int) -> np.ndarray:
    """The embeddings the fold-k stacker uses: fold k's CNN's, or the frozen backbone's."""
    path = feature_path(cfg, split, fold)
    if not path.exists() and feature_path(cfg, split, None).exists():
        path = feature_path(cfg, split, None)
    if not path.exists():
        raise FileNotFoundError(f"no embeddings for fold {fold}: {path} (run 03_features first)")
    return np.load(path)


def stacker_path(cfg: CFG, fold: int) -> Path:
    """A stacker experiment's fitted fold-k stacker: a folder (helpers.stacking.FoldStacker.save)."""
    return exp_dir(cfg) / f"stacker_fold{fold}"


def write_stacker_manifest(cfg: CFG, manifest: dict) -> None:
    """stacker.json of a stacker experiment: the CNN experiment whose embeddings it reads
    ('source'), features_from, its folds and metadata columns."""
    atomic_write_text(exp_dir(cfg) / "stacker.json", json.dumps(manifest, indent=1))


def read_stacker_manifest(folder: Path) -> dict | None:
    path = Path(folder) / "stacker.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_importance(cfg: CFG, importance: pd.DataFrame) -> None:
    atomic_to_csv(importance, exp_dir(cfg) / "importance.csv")


def read_importance(cfg: CFG) -> pd.DataFrame | None:
    path = exp_dir(cfg) / "importance.csv"
    return pd.read_csv(path) if path.exists() else None


def write_ensemble_score(cfg: CFG, score: dict) -> None:
    atomic_write_text(ensemble_dir(cfg) / "score.json", json.dumps(score, indent=1))


def read_ensemble_score(cfg: CFG) -> dict | None:
    path = ensemble_dir(cfg) / "score.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_results(cfg: CFG, table: pd.DataFrame) -> None:
    atomic_to_csv(table, results_path(cfg))


def write_submission_files(cfg: CFG, sub: pd.DataFrame, name: str) -> list[Path]:
    """submissions/submission.csv (the name Kaggle expects) and submissions/<name>.csv."""
    out = under_root(cfg.submissions_dir)
    paths = [out / "submission.csv", out / f"{name}.csv"]
    for p in paths:
        atomic_to_csv(sub, p)
    return paths


def trained_folds(folder: Path) -> list[int]:
    """The folds an experiment's OOF and test predictions were made from (its cv stamp), not
    every fold*/best.pt on disk: an earlier run's folds 1-4 stay beside a time_limit run's
    holdout fold. Without the stamp (an experiment from an older version), the checkpoints."""
    folder = Path(folder)
    stamp = folder / "stamps" / "cv.json"
    if stamp.exists():
        upstream = json.loads(stamp.read_text())["made_from"]["upstream"]
        return sorted({int(name.rsplit("fold", 1)[1]) for name in upstream if name.startswith("train_fold")})
    return sorted(int(p.parent.name[4:]) for p in folder.glob("fold*/best.pt") if p.parent.name[4:].isdigit())


def experiment_dirs(cfg: CFG) -> list[Path]:
    """Every experiment of this competition under models/ with its OOF and test predictions
    and score (CNNs and stackers), matched by the data they were made from."""
    root, data = models_root(cfg), competition_digest(cfg)
    if not root.is_dir():
        return []
    found = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        if all((d / f).exists() for f in ("oof.csv", "test.csv", "score.json")) and read_score(d).get("data") == data:
            found.append(d)
    return found


# --- digests ----------------------------------------------------------------------------------
_file_memo: dict[tuple, str] = {}


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """A file's content digest ('absent' when there is none); remembered per size and mtime."""
    if not path.is_file():
        return "absent"
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _file_memo:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _file_memo[key] = h.hexdigest()[:16]
    return _file_memo[key]


_depth = 0  # > 0 inside a decision(): digests of image lists are remembered until it ends


@contextmanager
def decision():
    """Within it, each split's images are listed and stat'ed once: wrap the freshness decisions
    of one step (a notebook cell, a runner job) that ask about many outputs."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth:
            _images_memo.clear()


def paths_digest(paths: list[str]) -> str:
    """These files' paths, sizes and mtimes (the decoded-image cache's key)."""
    rows = []
    for p in paths:
        st = os.stat(p)
        rows.append(f"{p}\0{st.st_size}\0{st.st_mtime_ns}")
    return _sha("\n".join(rows))


_images_memo: dict[tuple, str] = {}


def images_digest(cfg: CFG, split: str) -> str:
    """The images a split's CSV lists (train.csv, or test.csv / sample_submission): each one's
    path, size and mtime. Only those count: a folder shared by train and test images, or
    files the CSV does not name, change nothing."""
    from .data import locate_images  # late: data imports this module's neighbours

    if split == "train":
        csv, folder = cfg.path(cfg.train_csv), cfg.path(cfg.image_dir_train)
    else:
        csv, folder = cfg.path(cfg.test_csv), cfg.path(cfg.image_dir_test)
        csv = csv if csv.exists() else cfg.path(cfg.sample_submission)
    key = (str(csv), file_digest(csv), str(folder), cfg.image_ext, cfg.id_col)
    if _depth and key in _images_memo:
        return _images_memo[key]
    if not csv.is_file() or not folder.is_dir():
        return "absent"
    try:
        ids = read_table(csv, cfg.id_col)[cfg.id_col]
    except (ValueError, KeyError):
        return "unreadable"
    rows = []
    for value, (path, _) in zip(ids.astype(str), locate_images(ids, folder, cfg.image_ext)):
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        rows.append(f"{value}\0{os.path.relpath(path, folder) if path else '-'}\0{st.st_size if st else '-'}\0"
                    f"{st.st_mtime_ns if st else '-'}")
    value = _sha("\n".join(rows))
    if _depth:
        _images_memo[key] = value
    return value


def competition_digest(cfg: CFG) -> str:
    """Which data an experiment's predictions belong to: train.csv's content, target and task."""
    return _sha(f"{file_digest(cfg.path(cfg.train_csv))}\0{cfg.target_col}\0{cfg.task}")


# --- what each output is made from ------------------------------------------------------------
# settings that never change a result: where things are (the data's digests stand for it), what
# to run now, and speed switches that keep the arithmetic
RUN_ONLY = frozenset({"competition_dir", "train_csv", "test_csv", "sample_submission", "solution_csv", "image_dir_train",
                      "image_dir_test", "experiment", "models_dir", "submissions_dir", "folds", "retrain", "num_workers",
                      "device", "cache", "cache_dir", "wandb", "wandb_project", "compile", "channels_last",
                      "submission_name", "keep_last", "ddp", "quality", "time_limit"})
FOLD_KEYS = ("id_col", "target_col", "task", "n_folds", "seed", "group_col", "debug", "debug_rows")
# multi-label keys count only for a multi-label task (so they leave other tasks' outputs alone)
MULTILABEL_KEYS = ("label_cols", "label_sep", "labels")  # what the label matrix the folds stratify is read from
MULTILABEL_TRAIN_KEYS = ("label_weights", "pos_weight", "label_pos_weight")
MULTILABEL_STACK_KEYS = ("metric", "label_weights")  # the stacker's score and thresholds
MULTILABEL_ENSEMBLE_KEYS = ("allow_empty", "label_weights", "label_sep")  # the blend's score and the submission
FEATURE_KEYS = ("features_from",)
STACK_KEYS = ("metadata_cols", "stacker", "stack_pca", "stack_c", "lgbm_params")
ENSEMBLE_KEYS = ("metric", "ensemble_method", "ensemble_iters", "refit")
# everything else changes what a fold's CNN learns
TRAIN_KEYS = tuple(k for k in FIELDS if k not in RUN_ONLY | set(FOLD_KEYS + MULTILABEL_KEYS + MULTILABEL_TRAIN_KEYS + FEATURE_KEYS + STACK_KEYS
                                                              + MULTILABEL_ENSEMBLE_KEYS)
                   | {"n_bins", "ensemble_method", "ensemble_iters", "refit"})
PRETRAINED_KEYS = ("arch", "model_name", "model_kwargs", "pretrained", "pretrained_path", "img_size", "in_chans", "image_ext")
EDA_KEYS = ("id_col", "target_col", "task", "metadata_cols", "seed", "debug", "debug_rows", "image_ext")
CHECK_KEYS = FOLD_KEYS + PRETRAINED_KEYS + ("n_bins", "metadata_cols")

# the files each output is checked against
OUTPUTS = {"folds": ["folds.csv"], "train": ["fold{k}/best.pt", "oof_fold{k}.csv"], "test": ["test_fold{k}.csv"],
           "cv": ["oof.csv", "test.csv", "score.json"], "features": ["features/train_{f}.npy", "features/test_{f}.npy"],
           "stacking": ["oof.csv", "test.csv", "score.json"], "ensemble": ["score.json"], "eda": [], "check": [],
           "refit": ["refit/best.pt"], "refit_test": ["test_refit.csv"]}


def output_name(stage: str, fold: int | None = None) -> str:
    """'folds', 'train_fold0', 'features_all', ...: the name of one output and of its stamp."""
    if stage == "features":
        return f"features_{'all' if fold is None else f'fold{fold}'}"
    return stage if fold is None else f"{stage}_fold{fold}"


def require(cfg: CFG, stage: str, fold: int | None, then: str) -> None:
    """Raise, saying why and what to run, unless the output a stage is about to use is up to date."""
    why = stale(cfg, stage, fold)
    if why:
        raise RuntimeError(f"{output_name(stage, fold)} of {cfg.experiment} is not up to date ({why}): {then}")


def _parse(name: str) -> tuple[str, int | None]:
    if name in ("refit", "refit_test"):
        return name, None
    stage, _, part = name.partition("_")
    return stage, (int(part[4:]) if part.startswith("fold") else None)


def _folder(cfg: CFG, stage: str) -> Path:
    return exp_dir(stack_cfg(cfg)) if stage == "stacking" else ensemble_dir(cfg) if stage == "ensemble" else exp_dir(cfg)


def stamp_path(cfg: CFG, stage: str, fold: int | None = None) -> Path:
    return _folder(cfg, stage) / "stamps" / f"{output_name(stage, fold)}.json"


def stage_keys(cfg: CFG, stage: str) -> tuple:
    """The config keys an output of `stage` ('folds', 'train', 'stacking', 'ensemble') is made from."""
    multilabel = cfg.task == "multilabel"
    if stage == "folds":
        return FOLD_KEYS + {"regression": ("n_bins",), "multilabel": MULTILABEL_KEYS}.get(cfg.task, ())
    if stage == "train":
        return TRAIN_KEYS + (MULTILABEL_TRAIN_KEYS if multilabel else ())
    if stage == "stacking":
        return STACK_KEYS + (MULTILABEL_STACK_KEYS if multilabel else ())
    return ENSEMBLE_KEYS + (MULTILABEL_ENSEMBLE_KEYS if multilabel else ())


def _keys(cfg: CFG, names) -> dict:
    values = to_dict(cfg)
    return {k: values[k] for k in names}


def _test_files(cfg: CFG) -> dict:
    test_csv = cfg.path(cfg.test_csv)
    ids = test_csv if test_csv.exists() else cfg.path(cfg.sample_submission)
    return {ids.name: file_digest(ids), f"{cfg.image_dir_test}/": images_digest(cfg, "test")}


def upstream_id(cfg: CFG, stage: str, fold: int | None) -> str:
    """What an output made from this upstream one records of it: the id of the build on disk
    when it is up to date (a rebuild, even from the same inputs, gives a new id, so what was
    made from the old one is redone), else 'pending' (it must be remade first)."""
    if _stale(cfg, stage, fold) is None:
        return json.loads(stamp_path(cfg, stage, fold).read_text())["id"]
    return f"pending {digest(_fingerprint(cfg, stage, fold))}"


def fingerprint(cfg: CFG, stage: str, fold: int | None = None) -> dict:
    """What an output is made from: {'keys': {...}, 'files': {...}, 'upstream': {name: digest}}."""
    with decision():
        return _fingerprint(cfg, stage, fold)


def _fingerprint(cfg: CFG, stage: str, fold: int | None) -> dict:
    train_csv = {cfg.train_csv: file_digest(cfg.path(cfg.train_csv))}
    train_images = {f"{cfg.image_dir_train}/": images_digest(cfg, "train")}
    up = lambda *parts: {output_name(s, k): upstream_id(cfg, s, k) for s, k in parts}  # noqa: E731
    if stage == "folds":
        return {"keys": _keys(cfg, stage_keys(cfg, "folds")), "files": train_csv, "upstream": {}}
    if stage == "train":
        return {"keys": {**_keys(cfg, stage_keys(cfg, "train")), "fold": fold}, "files": train_images, "upstream": up(("folds", None))}
    if stage == "test":
        return {"keys": {}, "files": _test_files(cfg), "upstream": up(("train", fold))}
    if stage == "refit":  # the folds' best epochs say how long it trains
        return {"keys": {**_keys(cfg, stage_keys(cfg, "train")), "fold": REFIT}, "files": train_images,
                "upstream": up(("folds", None), *[("train", k) for k in cfg.fold_ids])}
    if stage == "refit_test":
        return {"keys": {}, "files": _test_files(cfg), "upstream": up(("refit", None))}
    if stage == "cv":
        return {"keys": {}, "files": {}, "upstream": up(*[(s, k) for k in cfg.fold_ids for s in ("train", "test")])}
    if stage == "features":
        if fold is None:  # a frozen pretrained backbone: made from the images alone, rows in train.csv's order
            rows = ("debug", "debug_rows", "seed") if cfg.debug else ("debug",)
            return {"keys": _keys(cfg, FEATURE_KEYS + PRETRAINED_KEYS + rows),
                    "files": {**train_csv, **train_images, **_test_files(cfg)}, "upstream": {}}
        return {"keys": _keys(cfg, FEATURE_KEYS), "files": _test_files(cfg), "upstream": up(("train", fold))}
    if stage == "stacking":
        test_csv = cfg.path(cfg.test_csv)
        sources = [("features", None)] if cfg.features_from == "pretrained" else [("features", k) for k in cfg.fold_ids]
        return {"keys": {**_keys(cfg, stage_keys(cfg, "stacking")), "folds": cfg.fold_ids},
                "files": {**train_csv, test_csv.name: file_digest(test_csv)}, "upstream": up(("folds", None), *sources)}
    if stage == "ensemble":
        upstream = {f"experiment {d.name}": recorded_id(d, refit=bool(cfg.refit)) for d in experiment_dirs(cfg)}
        files = {name: file_digest(cfg.path(name)) for name in (cfg.train_csv, cfg.sample_submission, cfg.solution_csv)}
        return {"keys": _keys(cfg, stage_keys(cfg, "ensemble")), "files": files, "upstream": upstream}
    if stage == "eda":
        return {"keys": _keys(cfg, EDA_KEYS), "files": {**train_csv, **train_images, **_test_files(cfg)}, "upstream": {}}
    if stage == "check":
        files = {**train_csv, **train_images, **_test_files(cfg),
                 cfg.sample_submission: file_digest(cfg.path(cfg.sample_submission))}
        return {"keys": _keys(cfg, CHECK_KEYS), "files": files, "upstream": {}}
    raise ValueError(f"unknown output stage '{stage}'")


def digest(made_from: dict) -> str:
    return _sha(json.dumps(made_from, sort_keys=True, default=str))


def recorded_id(folder: Path, refit: bool = False) -> str:
    """The build id recorded for an experiment folder's final output (a CNN's cv, a stacker's),
    with `refit`, followed by its refit's test predictions' id, when it has them."""
    for name in ("cv", "stacking"):
        path = folder / "stamps" / f"{name}.json"
        if path.exists():
            build = json.loads(path.read_text())["id"]
            refit_stamp = folder / "stamps" / "refit_test.json"
            return f"{build} {json.loads(refit_stamp.read_text())['id']}" if refit and refit_stamp.exists() else build
    return "unrecorded"


def record(cfg: CFG, stage: str, fold: int | None = None, made_from: dict | None = None) -> str:
    """Write an output's stamp, after the output itself: from now on it counts as up to date
    while nothing it was made from changes. Returns its digest."""
    made_from = made_from if made_from is not None else fingerprint(cfg, stage, fold)
    d = digest(made_from)
    build = _sha(f"{d}\0{time.time_ns()}\0{os.getpid()}\0{os.urandom(8).hex()}")  # this build, unlike any other
    atomic_write_text(stamp_path(cfg, stage, fold), json.dumps(
        {"output": output_name(stage, fold), "digest": d, "id": build, "made_from": made_from,
         "time": datetime.now().isoformat(timespec="seconds")}, indent=1, default=str))
    return d


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def stale(cfg: CFG, stage: str, fold: int | None = None) -> str | None:
    """None when the output is up to date; else why it must be (re)made."""
    with decision():
        return _stale(cfg, stage, fold)


def _stale(cfg: CFG, stage: str, fold: int | None) -> str | None:
    folder, name = _folder(cfg, stage), output_name(stage, fold)
    for pattern in OUTPUTS[stage]:
        path = folder / pattern.format(k=fold, f="all" if fold is None else f"fold{fold}")
        if not path.exists():
            return f"{path.relative_to(folder.parent)} not made yet"
    path = stamp_path(cfg, stage, fold)
    if not path.exists():
        return "not made yet" if not OUTPUTS[stage] else f"{name} has no record of what it was made from"
    old = json.loads(path.read_text())["made_from"]
    new = json.loads(json.dumps(fingerprint(cfg, stage, fold), default=str))
    if old == new:
        return None
    return explain(cfg, old, new) or f"{name} was made by another version of this code"


def explain(cfg: CFG, old: dict, new: dict) -> str:
    """The differences between two fingerprints, the root cause of an upstream change included."""
    changes = []
    for k in sorted(set(old.get("keys", {})) | set(new["keys"])):
        a, b = old.get("keys", {}).get(k, "(unset)"), new["keys"].get(k, "(unset)")
        if a != b:
            changes.append(f"{k} {_short(a)} -> {_short(b)}")
    for f in sorted(set(old.get("files", {})) | set(new["files"])):
        if old.get("files", {}).get(f) != new["files"].get(f):
            changes.append(f"{f} changed")
    for u in sorted(set(old.get("upstream", {})) | set(new["upstream"])):
        if old.get("upstream", {}).get(u) != new["upstream"].get(u):
            stage, fold = _parse(u)
            pending = str(new["upstream"].get(u, "")).startswith("pending")
            why = stale(cfg, stage, fold) if pending and stage in OUTPUTS else None
            changes.append(f"{u} must be remade first ({why})" if why else f"{u} was remade")
    return "; ".join(dict.fromkeys(changes))
