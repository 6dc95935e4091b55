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
import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .config import CFG, ROOT, cfg_from_dict, to_dict
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


def output_folder(cfg: CFG, kind: str) -> Path:
    """Where an output lives: its experiment's folder, its stacker's, or the ensemble's."""
    return {"experiment": exp_dir, "stacker": lambda c: exp_dir(stack_cfg(c)), "ensemble": ensemble_dir}[kind](cfg)


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
    import torch  # here, as in save_checkpoint: the runner reads this module without torch

    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (train the fold with 02_train first)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not loaded: it holds objects other than weights, numbers and text "
                         f"({str(e).strip().splitlines()[-1][:200]}), and loading those could run code (a checkpoint "
                         f"of an older version of helpers is trained again)") from None
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


def frame_predictions(ids: pd.Series, preds: np.ndarray, cfg: CFG, columns: list[str]) -> pd.DataFrame:
    """An OOF/test frame: the id column, then the prediction columns (the task's: one probability
    per class, or `pred`)."""
    out = pd.DataFrame(np.asarray(preds).reshape(len(ids), len(columns)), columns=columns)
    out.insert(0, cfg.id_col, ids.to_numpy())
    return out


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
