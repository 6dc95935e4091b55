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
    stackers/<exp>/fold{k}.joblib                     fitted stackers (PCA, categories, model)
    backbones/<exp>/fold0.safetensors + fold0.json    a frozen pretrained backbone (features_from pretrained)

`run_package` (what inference.ipynb calls) recomputes the blend from the test images and
test metadata alone: CNN predictions with TTA, embeddings into the stackers, the blend, the
submission in sample_submission's shape, checked before it is written. An unreadable or
missing image gets the fallback prediction (the class prior, or the training mean), a warning
naming its id, and is counted; a missing column or an empty test set is an error.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import artifacts
from .config import ROOT, CFG, cfg_from_dict, experiment_names, load_cfg, parse_set, to_dict
from .data import get_classes, label_sets, locate_images, read_csv, read_train
from .ensemble import blend, normalise_rows, rank_transform, with_refit
from .utils import atomic_to_csv, atomic_write_text, get_logger

TEMPLATE = ROOT / "notebooks" / "kaggle_inference.ipynb"


# --- packing ------------------------------------------------------------------------------------
def _save_weights(ckpt: dict, folder: Path, name: str, fp16: bool) -> None:
    """A checkpoint as safetensors weights + the JSON of the config they were trained with."""
    from safetensors.torch import save_file

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
    from safetensors.torch import load_file

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
    from .models import TimmModel

    model = TimmModel(source_cfg, 1)  # a one-output head: only its features are used
    classes = None if source_cfg.task == "regression" else ["_"]
    ckpt = {"model": model.state_dict(), "cfg": to_dict(source_cfg), "classes": classes, "target_range": None}
    _save_weights(ckpt, out / "backbones" / source_cfg.experiment, "fold0", fp16)


def package_ensemble(config: str, out: str | Path, fp16: bool = False, overrides: dict | None = None) -> Path:
    """Everything 05_ensemble blended for the competition of `config`: every member with a
    weight (CNN folds, stackers and the CNNs or backbones they read), the blend, the classes."""
    from .budget import apply_plan

    cfg = apply_plan(load_cfg(config, experiment_names(config)[0], overrides))
    score = artifacts.read_ensemble_score(cfg)
    why = artifacts.stale(cfg, "ensemble")
    if score is None or why:
        raise RuntimeError(f"the ensemble is not up to date ({why}): run 05_ensemble first, so that the "
                           f"package rebuilds the submission it wrote")
    out = _fresh(out)
    root = artifacts.models_root(cfg)
    members, cnn_folds, backbones = [], {}, set()
    for name, weight in score["weights"].items():
        if weight <= 0:
            continue
        folder = root / name
        manifest = artifacts.read_stacker_manifest(folder)
        if manifest is None:
            refit = score.get("refit", {}).get(name)  # blend / alone: the refit's test predictions were in its
            folds = [] if refit == "alone" else artifacts.trained_folds(folder)  # alone: the fold models are not run
            members.append({"name": name, "kind": "cnn", "weight": weight, "folds": folds, **({"refit": refit} if refit else {})})
            if folds:
                cnn_folds.setdefault(name, set()).update(folds)
            if refit:
                _pack_cnn(folder, out, [artifacts.REFIT], fp16)
            continue
        members.append({"name": name, "kind": "stacker", "weight": weight, **manifest})
        for k in manifest["folds"]:
            shutil.copy2(folder / f"fold{k}.joblib", _mkdir(out / "stackers" / name) / f"fold{k}.joblib")
        if manifest["features_from"] == "pretrained":
            if manifest["source"] not in backbones:
                _pack_backbone(artifacts.read_config(folder), out, fp16)
                backbones.add(manifest["source"])
        else:
            cnn_folds.setdefault(manifest["source"], set()).update(manifest["folds"])
    for name, folds in cnn_folds.items():
        _pack_cnn(root / name, out, sorted(folds), fp16)
    train = read_train(cfg)
    classes = None if cfg.task == "regression" else get_classes(train, cfg)
    spec = {"cfg": to_dict(cfg), "classes": classes, "fallback": _fallback(cfg, train, classes),
            "blend": {"method": score["method"], "members": members}, "cnn": {n: sorted(f) for n, f in cnn_folds.items()},
            "backbones": sorted(backbones), "cv": {"in_sample": score["in_sample"], "held_out": score["held_out"]},
            "thresholds": artifacts.score_thresholds(score, classes)}
    return _finish(out, spec)


def package_experiment(exp_dir: str | Path, out: str | Path, fp16: bool = False) -> Path:
    """One CNN experiment alone: its fold models, averaged."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_absolute() and not exp_dir.exists():
        exp_dir = artifacts.under_root(str(exp_dir))
    folds = artifacts.trained_folds(exp_dir)
    if not folds:
        raise FileNotFoundError(f"{exp_dir}: no fold*/best.pt (train the experiment first)")
    out = _fresh(out)
    _pack_cnn(exp_dir, out, folds, fp16)
    first = artifacts.load_checkpoint(exp_dir / f"fold{folds[0]}" / "best.pt")
    cfg, classes = artifacts.checkpoint_config(first), first["classes"]
    oof_path = exp_dir / "oof.csv"
    train = pd.read_csv(oof_path) if oof_path.exists() else None
    spec = {"cfg": to_dict(cfg), "classes": classes, "fallback": _fallback(cfg, train, classes),
            "blend": {"method": "mean", "members": [{"name": exp_dir.name, "kind": "cnn", "weight": 1.0, "folds": folds}]},
            "cnn": {exp_dir.name: folds}, "backbones": [], "cv": None,
            "thresholds": artifacts.score_thresholds(artifacts.read_score(exp_dir, missing_ok=True), classes)}
    return _finish(out, spec)


def _fallback(cfg: CFG, train: pd.DataFrame | None, classes: list | None) -> list[float]:
    """The prediction for an image that cannot be read: the training classes' shares, or the
    training target's mean."""
    if train is None:
        return [1.0 / len(classes)] * len(classes) if classes else [0.0]
    if cfg.task == "regression":
        return [float(train[cfg.target_col].mean())]
    if cfg.task == "multilabel":  # each label's share of the training rows
        sets = label_sets(train[cfg.target_col], cfg.label_sep)
        return [float(np.mean([str(c) in s for s in sets])) for c in classes]
    counts = train[cfg.target_col].astype(str).value_counts()
    return [float(counts.get(str(c), 0) / counts.sum()) for c in classes]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fresh(out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    return _mkdir(out)


def _finish(out: Path, spec: dict) -> Path:
    shutil.copytree(ROOT / "helpers", out / "helpers", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(TEMPLATE, out / "inference.ipynb")
    atomic_write_text(out / "package.json", json.dumps(spec, indent=1, default=str))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    members = ", ".join(f"{m['name']} ({m['weight']:.3f})" for m in spec["blend"]["members"])
    print(f"packaged {len(spec['blend']['members'])} blended model(s), {spec['blend']['method']}: {members}; "
          f"{sum(len(f) for f in spec['cnn'].values())} CNN fold model(s), "
          f"{sum(1 for m in spec['blend']['members'] if m.get('refit'))} refit(s), {len(spec['backbones'])} backbone(s); "
          f"{size:.1f} MiB in {out}. Upload it as a Kaggle dataset, add it and the competition to a notebook, "
          f"and run inference.ipynb")
    return out


# --- running it offline -----------------------------------------------------------------------------
def _predictor(folder: Path, folds: list[int | str], device: str):
    from .predict import Predictor

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
    test["path"] = [path for path, _ in locate_images(test[cfg.id_col], image_dir, cfg.image_ext)]
    return test, test_path


def run_package(package_dir: str | Path, competition_dir: str | Path, output_csv: str | Path | None = None,
                device: str = "auto", logger: logging.Logger | None = None) -> pd.DataFrame:
    """The blended submission of a package on the competition's current test set (see the
    module docstring), checked against sample_submission, written to output_csv when given.
    Returns it."""
    from .submission import check_submission, create_submission

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
    spec = json.loads((package_dir / "package.json").read_text())
    cfg = cfg_from_dict(spec["cfg"])
    cfg.competition_dir = str(competition_dir)
    classes, members = spec["classes"], spec["blend"]["members"]
    metadata_cols = sorted({c for m in members if m["kind"] == "stacker" for c in m["metadata_cols"]})
    test, test_path = read_test_rows(cfg, metadata_cols)
    items = [p if p is not None else f"{cfg.path(cfg.image_dir_test)}/{i} (not found)" for i, p in zip(test[cfg.id_col], test["path"])]
    logger.info(f"{len(test)} test images from {test_path}; {len(members)} blended model(s), {spec['blend']['method']}")
    start = time.perf_counter()
    outputs, failed = {}, set()
    needs_embeddings = {m["source"] for m in members if m["kind"] == "stacker"}
    for name, folds in spec["cnn"].items():
        out = _predictor(package_dir / "cnn" / name, folds, device).run(items, progress=True, embeddings=name in needs_embeddings, eta=logger)
        outputs[name] = {**out, "folds": folds}
        failed |= set(out["errors"])
    for name in spec["backbones"]:
        out = _predictor(package_dir / "backbones" / name, [0], device).run(items, progress=True, embeddings=True, eta=logger)
        outputs[name] = {**out, "folds": [None]}
        failed |= set(out["errors"])
    preds = []
    for m in members:
        if m["kind"] == "cnn":
            source = outputs.get(m["name"], {"folds": None})
            if not m["folds"]:  # refit alone
                pred = None
            elif m["folds"] == source["folds"]:
                pred = source["preds"]
            else:  # the CNN's own folds, not all those its stacker also read
                pred = _predictor(package_dir / "cnn" / m["name"], m["folds"], device).run(items)["preds"]
            if m.get("refit"):  # as 05_ensemble did: the refit on all rows with (or instead of) the folds
                refit = _predictor(package_dir / "cnn" / m["name"], [artifacts.REFIT], device).run(items, progress=True, eta=logger)
                failed |= set(refit["errors"])
                pred = refit["preds"] if pred is None else with_refit(pred, refit["preds"], m["refit"])
            preds.append(pred)
            continue
        source = outputs[m["source"]]
        fold_preds = []
        for k in m["folds"]:
            emb = source["embeddings"][source["folds"].index(None if m["features_from"] == "pretrained" else k)]
            stacker = artifacts.load_stacker(package_dir / "stackers" / m["name"] / f"fold{k}.joblib")
            fold_preds.append(np.asarray(stacker.predict(np.nan_to_num(emb.astype(np.float32)), test)).reshape(len(test), -1))
        preds.append(np.mean(fold_preds, axis=0))
    fallback = np.asarray(spec["fallback"], dtype=float)
    rows = sorted(failed)
    for p in preds:  # the blend never sees an unreadable image's NaN
        p[rows] = fallback
    weights = np.asarray([m["weight"] for m in members], dtype=float)
    if spec["blend"]["method"] == "rank":
        blended = blend([rank_transform(p) for p in preds], weights)
        blended = blended if cfg.task == "multilabel" else normalise_rows(blended)
    else:
        blended = blend(preds, weights)
    blended[rows] = fallback
    for i in rows[:20]:
        reason = next(o["errors"][i] for o in outputs.values() if i in o["errors"])
        logger.warning(f"test id {test[cfg.id_col].iloc[i]}: {reason}; it gets the fallback prediction")
    seconds = time.perf_counter() - start
    logger.info(f"{len(test)} test images in {seconds:.1f}s ({len(test) / max(seconds, 1e-9):.1f} images/s); "
                f"{len(rows)} could not be read and got the fallback prediction")
    return cfg, test, blended, classes, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="OUT (with --config), or models/<experiment> OUT")
    parser.add_argument("--config", help="package what 05_ensemble blended for this config's competition")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="the overrides the runner was given")
    parser.add_argument("--fp16", action="store_true", help="weights in float16 (half the size)")
    args = parser.parse_args(argv)
    if args.config:
        if len(args.paths) != 1:
            parser.error("with --config, give only OUT")
        package_ensemble(args.config, args.paths[0], args.fp16, parse_set(args.set))
    else:
        if len(args.paths) != 2:
            parser.error("give models/<experiment> OUT, or --config configs/<comp>.yaml OUT")
        package_experiment(args.paths[0], args.paths[1], args.fp16)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
