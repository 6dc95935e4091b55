"""The offline code-competition package: everything 05_ensemble blended, to rebuild the same
submission in an internet-off Kaggle kernel on a test set the training never saw.

    python -m helpers.package --config configs/<comp>.yaml OUT [--set k=v ...] [--fp16]   # the whole blended ensemble
    python -m helpers.package models/<exp> OUT [--fp16]                   # one CNN experiment alone

OUT/ is uploaded as a Kaggle dataset:
    inference.ipynb        parameters: competition_dir, package_dir, output_csv (nothing else)
    helpers/               this package
    package.json           the blend (method, members, weights), classes, the fallback prediction,
                           the competition's columns and files
    cnn/<exp>/fold{k}.safetensors + fold{k}.json      a CNN's weights and the config it was trained with
    cnn/<exp>/refit.safetensors + refit.json          its refit on all rows (`refit`), when the blend used it
    stackers/<exp>/stacker_fold{k}/                   fitted stackers: meta.json, LightGBM text models, skops files
    vendor/                                           skops (pure Python), when a scikit-learn stacker is blended
    backbones/<exp>/fold0.safetensors + fold0.json    a frozen pretrained backbone (features_from pretrained)

`run_package` (what inference.ipynb calls) recomputes the blend from the test images and
test metadata alone: CNN predictions with TTA, embeddings into the stackers, the blend, the
submission in sample_submission's shape, checked before it is written. An unreadable or
missing image gets the fallback prediction (the class prior, or the training mean), a warning
naming its id, and is counted; a missing column or an empty test set is an error.

What a package runs: the Python of its helpers/ (and vendor/) folders, which you can read, and
nothing else. Every file it loads is data that loading cannot turn into code: weights as
safetensors, settings as JSON, LightGBM's own text models, scikit-learn heads and PCA as skops
files (scikit-learn's secure format: only the types a stacker of helpers is made of load). No
pickle, no torch.load of a full object. Before predicting, every file package.json names is
checked (present, complete), and a problem is an error naming the file.

OUT is never a folder the package did not make: a new or empty folder, or an earlier package
(its entries are replaced, anything else in it is kept). A non-empty folder that is no package
is refused (with --force the package is written beside what is there, replacing none of it),
and a folder that holds the project, its models or the competition's data always is.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import artifacts, budget, freshness
from .config import CFG, ROOT, cfg_from_dict, experiment_names, load_cfg, to_dict
from .configfile import parse_set
from .data import read_csv, read_train
from .ensemble import blend, rank_transform
from .images import locate_images
from .models import TimmModel
from .predict import Predictor
from .results import with_refit
from .stacking import FoldStacker
from .submission import check_submission, create_submission
from .tasks import task_of
from .utils import atomic_to_csv, atomic_write_text, get_logger

TEMPLATE = ROOT / "notebooks" / "kaggle_inference.ipynb"


# --- packing ------------------------------------------------------------------------------------
def _save_weights(ckpt: dict, folder: Path, name: str, fp16: bool) -> None:
    """A checkpoint as safetensors weights + the JSON of the config they were trained with."""
    tensors = {}
    for key, value in ckpt["model"].items():
        value = value.detach().cpu().contiguous().clone()  # clone: no shared storage, as safetensors wants
        tensors[key] = value.half() if fp16 and value.is_floating_point() else value
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    meta = {"cfg": ckpt["cfg"], "classes": ckpt["classes"], "target_range": ckpt.get("target_range"),
            "epoch": ckpt.get("epoch"), "score": ckpt.get("score")}
    atomic_write_text(folder / f"{name}.json", json.dumps(meta, indent=1, default=str))


def _load_weights(folder: Path, name: str) -> dict:
    meta = json.loads((folder / f"{name}.json").read_text())
    return {**meta, "model": {k: v.float() if v.is_floating_point() else v
                              for k, v in load_file(str(folder / f"{name}.safetensors")).items()}}


def _pack_cnn(folder: Path, out: Path, folds: list[int | str], fp16: bool) -> None:
    """The fold models (and 'refit', the model on all rows) the ensemble used."""
    for name in map(artifacts.fold_name, folds):
        path = folder / name / "best.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the package needs every model the ensemble used")
        _save_weights(artifacts.load_checkpoint(path), out / "cnn" / folder.name, name, fp16)


def _pack_backbone(source_cfg: CFG, out: Path, fp16: bool) -> None:
    """A frozen pretrained backbone, weights included (the kernel has no hub)."""
    model = TimmModel(source_cfg, 1)  # a one-output head: only its features are used
    classes = ["_"] if task_of(source_cfg).named_outputs else None
    ckpt = {"model": model.state_dict(), "cfg": to_dict(source_cfg), "classes": classes, "target_range": None}
    _save_weights(ckpt, out / "backbones" / source_cfg.experiment, "fold0", fp16)


def package_ensemble(config: str, out: str | Path, fp16: bool = False, overrides: dict | None = None,
                     force: bool = False) -> Path:
    """Everything 05_ensemble blended for the competition of `config`: every member with a
    weight (CNN folds, stackers and the CNNs or backbones they read), the blend, the classes."""
    cfg = budget.apply_plan(load_cfg(config, experiment_names(config)[0], overrides))
    score = artifacts.read_ensemble_score(cfg)
    why = freshness.stale(cfg, "ensemble")
    if score is None or why:
        raise PackageError(f"the ensemble is not up to date ({why}): run 05_ensemble first (python -m helpers.pipeline "
                           f"--config {config}), so that the package rebuilds the submission it wrote")
    target, out = Path(out), _fresh(out, force, _protected(cfg))
    root = artifacts.models_root(cfg)
    members, cnn_folds, backbones = [], {}, set()
    for name, weight in score["weights"].items():
        if weight <= 0:
            continue
        folder = root / name
        manifest = artifacts.read_stacker_manifest(folder)
        if manifest is None:
            refit = score.get("refit", {}).get(name)  # blend / alone: the refit's test predictions were in its
            folds = [] if refit == "alone" else freshness.trained_folds(folder)  # alone: the fold models are not run
            members.append({"name": name, "kind": "cnn", "weight": weight, "folds": folds, **({"refit": refit} if refit else {})})
            if folds:
                cnn_folds.setdefault(name, set()).update(folds)
            if refit:
                _pack_cnn(folder, out, [artifacts.REFIT], fp16)
            continue
        members.append({"name": name, "kind": "stacker", "weight": weight, **manifest})
        for k in manifest["folds"]:
            stacker = artifacts.stacker_path(artifacts.stack_cfg(dataclasses.replace(cfg, experiment=manifest["source"])), k)
            stacker = folder / stacker.name
            if not (stacker / "meta.json").exists():
                raise PackageError(f"{stacker} is missing (a stacker of an older version of helpers?): run 04_stacking "
                                   f"for {manifest['source']} again (--force), then 05_ensemble")
            shutil.copytree(stacker, out / "stackers" / name / stacker.name)
        if manifest["features_from"] == "pretrained":
            if manifest["source"] not in backbones:
                _pack_backbone(artifacts.read_config(folder), out, fp16)
                backbones.add(manifest["source"])
        else:
            cnn_folds.setdefault(manifest["source"], set()).update(manifest["folds"])
    for name, folds in cnn_folds.items():
        _pack_cnn(root / name, out, sorted(folds), fp16)
    train = read_train(cfg)
    classes = task_of(cfg).classes(train, cfg)
    spec = {"cfg": to_dict(cfg), "classes": classes, "fallback": _fallback(cfg, train, classes),
            "blend": {"method": score["method"], "members": members}, "cnn": {n: sorted(f) for n, f in cnn_folds.items()},
            "backbones": sorted(backbones), "cv": {"in_sample": score["in_sample"], "held_out": score["held_out"]},
            "thresholds": artifacts.score_thresholds(score, classes)}
    return _finish(target, out, spec)


def package_experiment(exp_dir: str | Path, out: str | Path, fp16: bool = False, force: bool = False) -> Path:
    """One CNN experiment alone: its fold models, averaged."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_absolute() and not exp_dir.exists():
        exp_dir = artifacts.under_root(str(exp_dir))
    folds = freshness.trained_folds(exp_dir)
    if not folds:
        raise PackageError(f"{exp_dir}: no trained fold (fold*/best.pt): train the experiment first (02_train)")
    target, out = Path(out), _fresh(out, force, ([artifacts.output_root(), exp_dir.parent], []))
    _pack_cnn(exp_dir, out, folds, fp16)
    first = artifacts.load_checkpoint(exp_dir / f"fold{folds[0]}" / "best.pt")
    cfg, classes = artifacts.checkpoint_config(first), first["classes"]
    oof_path = exp_dir / "oof.csv"
    train = pd.read_csv(oof_path) if oof_path.exists() else None
    spec = {"cfg": to_dict(cfg), "classes": classes, "fallback": _fallback(cfg, train, classes),
            "blend": {"method": "mean", "members": [{"name": exp_dir.name, "kind": "cnn", "weight": 1.0, "folds": folds}]},
            "cnn": {exp_dir.name: folds}, "backbones": [], "cv": None,
            "thresholds": artifacts.score_thresholds(artifacts.read_score(exp_dir, missing_ok=True), classes)}
    return _finish(target, out, spec)


def _fallback(cfg: CFG, train: pd.DataFrame | None, classes: list | None) -> list[float]:
    """The prediction for an image that cannot be read (the task's: the training classes' shares,
    each label's, or the training target's mean)."""
    return task_of(cfg).fallback(cfg, train, classes)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


class PackageError(ValueError):
    """A package that cannot be made or run as asked: the message names the file or folder."""


ENTRIES = ("helpers", "vendor", "inference.ipynb", "package.json", "cnn", "stackers", "backbones")  # what a package writes
SKOPS_VENDOR = ("skops", "prettytable", "wcwidth")  # pure Python; Kaggle's image has none of them


def _protected(cfg: CFG) -> tuple[list[Path], list[Path]]:
    """(folders a package may neither be nor hold: the project's outputs and the competition;
    folders it may not be inside: the competition's data)."""
    return ([artifacts.output_root(), artifacts.models_root(cfg), artifacts.under_root(cfg.submissions_dir), cfg.path("")],
            [cfg.path("")])


def is_package(folder: Path) -> bool:
    """Whether a folder is a package helpers made (its package.json holds a blend, beside an
    inference.ipynb)."""
    try:
        spec = json.loads((Path(folder) / "package.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(spec, dict) and "blend" in spec and (Path(folder) / "inference.ipynb").exists()


def _fresh(out: str | Path, force: bool, protected: tuple[list[Path], list[Path]]) -> Path:
    """An empty folder beside OUT to build the package in (_finish moves it into OUT). OUT must be
    new, empty, an earlier package, or (with force) a folder whose other files are kept; never
    the project, its models or the competition's data, nor a folder holding them."""
    out = Path(out).expanduser().absolute()
    real = Path(os.path.realpath(out))
    holds, inside = protected

    def resolved(p: Path) -> Path:
        return Path(os.path.realpath(Path(p).expanduser().absolute()))

    for p in map(resolved, [ROOT, Path.home(), *holds]):
        if p.is_relative_to(real):
            raise PackageError(f"{out}: not a place for a package: it is or holds {p} (the project, its outputs or the "
                               f"competition's data), and nothing there may be replaced. Give a new folder, e.g. "
                               f"{ROOT.parent / 'my-package'}")
    for p in map(resolved, inside):
        if real.is_relative_to(p):
            raise PackageError(f"{out}: not a place for a package: it is inside the competition's data ({p}); give a "
                               f"folder elsewhere")
    if out.exists() and not out.is_dir():
        raise PackageError(f"{out} is a file, not a folder: give a new folder for the package")
    if out.is_dir() and any(out.iterdir()) and not is_package(out):
        ours = [name for name in ENTRIES if (out / name).exists()]
        if not force:
            raise PackageError(f"{out} is not empty and is not a package ({len(list(out.iterdir()))} entries, e.g. "
                               f"{sorted(p.name for p in out.iterdir())[:3]}): nothing is deleted. Give a new or empty "
                               f"folder, or --force to write the package beside what is there")
        if ours:
            raise PackageError(f"{out}: --force writes beside what is there, but {ours} would be replaced and are not "
                               f"from a package: give a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))


def _finish(target: Path, out: Path, spec: dict) -> Path:
    """The package built in `out` moved into `target`, replacing an earlier package's entries
    only."""
    try:
        shutil.copytree(ROOT / "helpers", out / "helpers", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        if any(m["kind"] == "stacker" and m.get("stacker") in ("svr", "logistic") for m in spec["blend"]["members"]):
            for name in SKOPS_VENDOR:  # the offline kernel reads the scikit-learn heads' skops files with it
                module = importlib.import_module(name)
                source = Path(module.__file__)
                if source.name == "__init__.py":
                    shutil.copytree(source.parent, out / "vendor" / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    _mkdir(out / "vendor")
                    shutil.copy2(source, out / "vendor" / source.name)
        shutil.copy2(TEMPLATE, out / "inference.ipynb")
        atomic_write_text(out / "package.json", json.dumps(spec, indent=1, default=str))
        target = Path(target).expanduser().absolute()
        target.mkdir(parents=True, exist_ok=True)
        for name in ENTRIES:  # an earlier package's entries go; whatever else is there stays
            old = target / name
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            elif old.exists() or old.is_symlink():
                old.unlink()
            if (out / name).exists():
                os.replace(out / name, old)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the build folder: ours, made by _fresh
    size = sum(p.stat().st_size for name in ENTRIES for p in ([target / name] if (target / name).is_file() else
                                                                 (target / name).rglob("*")) if p.is_file()) / 2**20
    members = ", ".join(f"{m['name']} ({m['weight']:.3f})" for m in spec["blend"]["members"])
    print(f"packaged {len(spec['blend']['members'])} blended model(s), {spec['blend']['method']}: {members}; "
          f"{sum(len(f) for f in spec['cnn'].values())} CNN fold model(s), "
          f"{sum(1 for m in spec['blend']['members'] if m.get('refit'))} refit(s), {len(spec['backbones'])} backbone(s); "
          f"{size:.1f} MiB in {target}. Upload it as a Kaggle dataset, add it and the competition to a notebook, "
          f"and run inference.ipynb")
    return target


def package_problems(package_dir: Path) -> list[str]:
    """Every file the package's package.json names that is missing or incomplete (a weights file
    cut short, a stacker without its model), each named: checked before any prediction."""
    package_dir = Path(package_dir)
    try:
        spec = json.loads((package_dir / "package.json").read_text())
        members, cnn, backbones = spec["blend"]["members"], spec["cnn"], spec["backbones"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{package_dir / 'package.json'}: not a package's ({type(e).__name__}: {e}); make it with "
                f"python -m helpers.package"]
    weights = [("cnn", name, artifacts.fold_name(k)) for name, folds in cnn.items() for k in folds]
    weights += [("cnn", m["name"], artifacts.REFIT) for m in members if m["kind"] == "cnn" and m.get("refit")]
    weights += [("backbones", name, "fold0") for name in backbones]
    problems = []
    for kind, name, part in weights:
        for suffix in (".safetensors", ".json"):
            path = package_dir / kind / name / f"{part}{suffix}"
            try:
                if suffix == ".json":
                    json.loads(path.read_text())
                else:
                    with safe_open(str(path), "pt") as f:
                        f.keys()
            except FileNotFoundError:
                problems.append(f"{path}: missing (the package lists it)")
            except Exception as e:  # noqa: BLE001 - truncated or not this format: named, with the reason
                problems.append(f"{path}: unreadable or incomplete ({type(e).__name__}: {str(e)[:120]})")
    for m in members:
        for k in m.get("folds", []) if m["kind"] == "stacker" else []:
            folder = package_dir / "stackers" / m["name"] / f"stacker_fold{k}"
            try:
                meta = json.loads((folder / "meta.json").read_text())
                files = [h.get("lgbm") or h.get("skops") for h in meta["heads"]] + (["pca.skops"] if meta["pca"] else [])
                problems += [f"{folder / f}: missing (the stacker lists it)" for f in files if f and not (folder / f).is_file()]
            except (OSError, ValueError, KeyError, TypeError) as e:
                problems.append(f"{folder / 'meta.json'}: missing or unreadable ({type(e).__name__})")
    return problems


# --- running it offline -----------------------------------------------------------------------------
def _predictor(folder: Path, folds: list[int | str], device: str):
    names = [artifacts.fold_name(k) for k in folds]
    ckpts = [_load_weights(folder, name) for name in names]
    return Predictor.from_checkpoints(ckpts, device, [str(folder / name) for name in names])


def read_test_rows(cfg: CFG, metadata_cols: list[str]) -> tuple[pd.DataFrame, Path]:
    """The test ids (test.csv, else sample_submission) with the metadata the stackers read, and
    each id's image file (None when it is missing: that id gets the fallback)."""
    test_path = cfg.path(cfg.test_csv)
    if test_path.exists():
        test = read_csv(test_path, [cfg.id_col, *metadata_cols], "test CSV", cfg.id_col)
    elif metadata_cols:
        raise FileNotFoundError(f"test CSV not found: {test_path}; the stackers read its columns {metadata_cols}")
    else:
        test_path = cfg.path(cfg.sample_submission)
        test = read_csv(test_path, [cfg.id_col], "sample submission (no test CSV)", cfg.id_col)[[cfg.id_col]]
    if len(test) == 0:
        raise ValueError(f"{test_path}: the test set is empty")
    image_dir = cfg.path(cfg.image_dir_test)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir} (images for {test_path.name})")
    test = test.reset_index(drop=True)
    located = locate_images(test[cfg.id_col], image_dir, cfg.image_ext)
    test["path"] = pd.Series([path for path, _ in located], dtype=object)
    test["why"] = [f"tried {', '.join(tried)}" if tried else "it leaves the image folder" for _, tried in located]
    return test, test_path


def run_package(package_dir: str | Path, competition_dir: str | Path, output_csv: str | Path | None = None,
                device: str = "auto", logger: logging.Logger | None = None) -> pd.DataFrame:
    """The blended submission of a package on the competition's current test set (see the
    module docstring), checked against sample_submission, written to output_csv when given.
    Returns it."""
    logger = logger or get_logger("kaggle.package")
    cfg, test, blended, classes, seconds = predict_package(package_dir, competition_dir, device, logger)
    spec = json.loads((Path(package_dir) / "package.json").read_text())
    submission = create_submission(cfg, test[cfg.id_col], blended, classes, spec.get("thresholds"))
    check_submission(cfg, submission, classes)
    if output_csv is not None:
        atomic_to_csv(submission, output_csv)
        logger.info(f"wrote {output_csv}")
    return submission


def predict_package(package_dir: str | Path, competition_dir: str | Path, device: str = "auto",
                    logger: logging.Logger | None = None) -> tuple[CFG, pd.DataFrame, np.ndarray, list | None, float]:
    """(config, test rows, blended predictions [n, classes] or [n, 1], classes, seconds) of a
    package on the competition's current test set."""
    logger = logger or get_logger("kaggle.package")
    package_dir = Path(package_dir)
    problems = package_problems(package_dir)
    if problems:
        raise PackageError(f"the package in {package_dir} is incomplete ({len(problems)} problem(s)); make it again "
                           f"(python -m helpers.package) and upload the whole folder:\n  " + "\n  ".join(problems[:20]))
    spec = json.loads((package_dir / "package.json").read_text())
    cfg = cfg_from_dict(spec["cfg"])
    cfg.competition_dir = str(competition_dir)
    members = spec["blend"]["members"]
    test, test_path = read_test_rows(cfg, sorted({c for m in members if m["kind"] == "stacker" for c in m["metadata_cols"]}))
    items = [p if isinstance(p, str) else f"{cfg.path(cfg.image_dir_test)}/{i} (no image file for this id: {why})"
             for i, p, why in zip(test[cfg.id_col], test["path"], test["why"])]
    logger.info(f"{len(test)} test images from {test_path}; {len(members)} blended model(s), {spec['blend']['method']}")
    start = time.perf_counter()
    kernel = _Kernel(package_dir, spec, items, device, logger)
    preds = [kernel.member(m, test) for m in members]
    rows = sorted(kernel.errors)
    blended = _blend(cfg, spec, preds, rows)
    for i in rows[:20]:
        logger.warning(f"test id {test[cfg.id_col].iloc[i]}: {kernel.errors[i]}; it gets the fallback prediction")
    seconds = time.perf_counter() - start
    logger.info(f"{len(test)} test images in {seconds:.1f}s ({len(test) / max(seconds, 1e-9):.1f} images/s); "
                f"{len(rows)} could not be read and got the fallback prediction")
    return cfg, test, blended, spec["classes"], seconds


class _Kernel:
    """The package's models run on the test items: each CNN's folds (with the embeddings its
    stacker reads) and each frozen backbone once; then each blend member's prediction."""

    def __init__(self, package_dir: Path, spec: dict, items: list, device: str, logger: logging.Logger):
        self.package_dir, self.items, self.device, self.logger = package_dir, items, device, logger
        self.outputs, self.errors = {}, {}
        stackers = [m for m in spec["blend"]["members"] if m["kind"] == "stacker"]
        needs_embeddings = {m["source"] for m in stackers if m.get("stack_on", "embeddings") != "oof"}
        needs_each = {m["source"] for m in stackers if m.get("stack_on", "embeddings") != "embeddings"}
        for name, folds in spec["cnn"].items():
            self.outputs[name] = {**self.run("cnn", name, folds, embeddings=name in needs_embeddings, each=name in needs_each),
                                  "folds": folds}
        for name in spec["backbones"]:
            self.outputs[name] = {**self.run("backbones", name, [0], embeddings=True), "folds": [None]}

    def run(self, kind: str, name: str, folds: list, embeddings: bool = False, progress: bool = True, each: bool = False) -> dict:
        out = _predictor(self.package_dir / kind / name, folds, self.device).run(self.items, progress=progress,
                                                                                embeddings=embeddings, eta=self.logger, each=each)
        self.errors.update(out["errors"])
        return out

    def member(self, m: dict, test: pd.DataFrame) -> np.ndarray:
        """A blend member's test predictions: a CNN's folds (and its refit, as 05_ensemble blended
        it), or a stacker's folds on the embeddings of the CNN or backbone it reads."""
        if m["kind"] == "cnn":
            source = self.outputs.get(m["name"], {"folds": None})
            if not m["folds"]:  # refit alone
                pred = None
            elif m["folds"] == source["folds"]:
                pred = source["preds"]
            else:  # the CNN's own folds, not all those its stacker also read
                pred = self.run("cnn", m["name"], m["folds"], progress=False)["preds"]
            if m.get("refit"):  # as 05_ensemble did: the refit on all rows with (or instead of) the folds
                refit = self.run("cnn", m["name"], [artifacts.REFIT])["preds"]
                pred = refit if pred is None else with_refit(pred, refit, m["refit"])
            return pred
        source = self.outputs[m["source"]]
        stack_on, fold_preds = m.get("stack_on", "embeddings"), []
        for k in m["folds"]:
            i = source["folds"].index(None if m["features_from"] == "pretrained" else k)
            inputs = ([source["each"][i]] if stack_on != "embeddings" else []) + ([source["embeddings"][i]] if stack_on != "oof" else [])
            stacker = FoldStacker.load(self.package_dir / "stackers" / m["name"] / f"stacker_fold{k}")
            x = np.nan_to_num(np.hstack([a.astype(np.float32) for a in inputs]))  # unreadable images' rows: the fallback, later
            fold_preds.append(np.asarray(stacker.predict(x, test)).reshape(len(test), -1))
        return np.mean(fold_preds, axis=0)


def _blend(cfg: CFG, spec: dict, preds: list[np.ndarray], rows: list[int]) -> np.ndarray:
    """The members blended as 05_ensemble did; unreadable images' rows get the fallback (the
    blend never sees their NaN)."""
    fallback = np.asarray(spec["fallback"], dtype=float)
    for p in preds:
        p[rows] = fallback
    weights = np.asarray([m["weight"] for m in spec["blend"]["members"]], dtype=float)
    if spec["blend"]["method"] == "rank":
        blended = task_of(cfg).rank_rows(blend([rank_transform(p) for p in preds], weights))
    else:
        blended = blend(preds, weights)
    blended[rows] = fallback
    return blended


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="OUT (with --config), or models/<experiment> OUT")
    parser.add_argument("--config", help="package what 05_ensemble blended for this config's competition")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="the overrides the runner was given")
    parser.add_argument("--fp16", action="store_true", help="weights in float16 (half the size)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty OUT that is not a package, beside what is there (nothing is deleted)")
    args = parser.parse_args(argv)
    if args.config and len(args.paths) != 1:
        parser.error("with --config, give only OUT")
    if not args.config and len(args.paths) != 2:
        parser.error("give models/<experiment> OUT, or --config configs/<comp>.yaml OUT")
    try:
        if args.config:
            package_ensemble(args.config, args.paths[0], args.fp16, parse_set(args.set), args.force)
        else:
            package_experiment(args.paths[0], args.paths[1], args.fp16, args.force)
    except (PackageError, ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        print(f"package: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
