"""Inference API and CLI: every fold's best model of an experiment, averaged, with the TTA of
its config.

    from helpers.predict import Predictor
    predictor = Predictor.from_experiment("models/digits_resnet18")
    results = predictor.predict(["a.png", "b.jpg", image_array])

One result per item, in order: id (the path, or the item's index for an array), label,
confidence and the class probabilities (or the regression value). Multi-label: `labels`, the
labels whose probability reaches the threshold tuned on the experiment's OOF predictions
(score.json; 0.5 without one), `label` those labels joined by cfg.label_sep, `confidence`
the lowest probability among them, and every label's probability. An item that cannot be
read gets label "ERROR" and the reason; the others are unaffected. It logs the count, the
time per image, successes/failures and the predicted class distribution, and writes no files.

    python -m helpers.predict models/<exp> --image a.jpg [--image b.jpg ...]
    python -m helpers.predict models/<exp> --csv items.csv --out preds.csv
    python -m helpers.predict models/<exp> --csv items.csv --save      # predictions/<exp>_<time>/
    python -m helpers.predict models/<exp> --bench                     # latency and throughput

With a refit (`refit` in the config: one more model on all rows), the predictions use it as
the ensemble did (blend: half the prediction; alone: the refit only); --refit chooses.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import artifacts, freshness
from .config import CFG
from .engine import load_model, predict_batch, rules_of
from .images import locate_images, read_image
from .losses import TargetScale
from .results import REFIT_SHARE
from .runtime import amp_context, channels_last, get_device
from .tasks import task_of
from .transforms import InputNorm, create_transforms, input_stats
from .utils import atomic_to_csv, atomic_write_text, get_logger, read_table


def _as_image(item, in_chans: int) -> np.ndarray:
    """A path or an array -> uint8 HxWxC (RGB, or gray with in_chans 1)."""
    if isinstance(item, (str, Path)):
        return read_image(str(item), in_chans)
    img = np.asarray(item)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"array of shape {img.shape} is not an image (H x W, H x W x 1/3/4)")
    if img.dtype != np.uint8:
        img = np.clip(img / 256 if img.max() > 255 else img, 0, 255).astype(np.uint8)
    if in_chans == 1:
        return img[:, :, :1] if img.shape[2] == 1 else cv2.cvtColor(img[:, :, :3], cv2.COLOR_RGB2GRAY)[:, :, None]
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[:, :, :3]


def used_refit(exp_dir: Path) -> str:
    """How the ensemble beside an experiment folder used its refit: 'blend', 'alone', or ''
    (no refit, or no ensemble run yet)."""
    score = artifacts.read_score(exp_dir.parent / "ensemble", missing_ok=True) or {}
    return (score.get("refit") or {}).get(exp_dir.name, "")


class Predictor:
    """Every fold's best model of one experiment; `predict(items)` averages them."""

    def __init__(self, cfg: CFG, models: list[torch.nn.Module], classes: list | None, scale: TargetScale | None,
                 device: torch.device, logger: logging.Logger | None = None, thresholds: list[float] | None = None,
                 weights: list[float] | None = None):
        self.cfg, self.models, self.classes, self.scale, self.device = cfg, models, classes, scale, device
        self.task = task_of(cfg)
        self.weights = weights or [1 / len(models)] * len(models)  # each model's share of the prediction
        self.thresholds = thresholds  # multilabel: one per class (None: 0.5)
        self.transform = create_transforms(cfg, train=False)  # the model's own preprocessing, from its checkpoint's config
        self.norm = InputNorm(input_stats(cfg), device, channels_last(cfg, device))
        self.rules = rules_of(cfg, device)
        self.logger = logger or get_logger("kaggle.predict")

    @classmethod
    def from_experiment(cls, exp_dir: str | Path, device: str = "auto", folds: list[int] | None = None,
                        refit: str | None = None) -> "Predictor":
        """The fold models of an experiment folder (those its OOF and test predictions were made
        from: freshness.trained_folds), each rebuilt from the config stored in its checkpoint
        (no download: the weights are in the checkpoints), with its
        refit (refit/best.pt, the model on all rows) as the ensemble used it: `refit` None
        reads that from the ensemble's score.json beside the experiment (blend: half the
        prediction, the folds' mean the other half; alone: the refit only); 'blend', 'alone'
        or '' (the folds only) choose. `folds`: these folds only, and no refit."""
        exp_dir = Path(exp_dir)
        if not exp_dir.is_absolute() and not exp_dir.exists():
            exp_dir = artifacts.under_root(str(exp_dir))
        if not exp_dir.is_dir():
            raise FileNotFoundError(f"{exp_dir}: no such experiment folder (give models/<experiment>, e.g. "
                                    f"{artifacts.under_root('models')}/<experiment>)")
        # the folds the experiment's predictions were made from, not every fold*/best.pt on disk
        paths = [exp_dir / f"fold{k}" / "best.pt" for k in (freshness.trained_folds(exp_dir) if folds is None else folds)]
        paths = [p for p in paths if p.exists()]
        if not paths:
            raise FileNotFoundError(f"no fold*/best.pt under {exp_dir}: train the experiment first (02_train)")
        mode = "" if folds is not None else refit if refit is not None else used_refit(exp_dir)
        refit_path = exp_dir / artifacts.REFIT / "best.pt"
        if mode not in ("", "blend", "alone"):
            raise ValueError(f"refit must be 'blend', 'alone' or '' (the folds only), got {mode!r}")
        if mode and not refit_path.exists():
            raise FileNotFoundError(f"{refit_path} not found: the experiment has no refit (train it with refit set)")
        weights = None
        if mode == "alone":
            paths, weights = [refit_path], [1.0]
        elif mode == "blend":
            weights = [(1 - REFIT_SHARE) / len(paths)] * len(paths) + [REFIT_SHARE]
            paths = paths + [refit_path]
        predictor = cls.from_checkpoints([artifacts.load_checkpoint(p) for p in paths], device, [str(p) for p in paths], weights)
        if mode:
            predictor.logger.info(f"{exp_dir.name}: the refit on all rows " + (
                "alone" if mode == "alone" else f"with the {len(paths) - 1} fold model(s), {REFIT_SHARE:.0%} of the prediction"))
        if predictor.task.uses_thresholds:
            predictor.thresholds = artifacts.score_thresholds(artifacts.read_score(exp_dir, missing_ok=True), predictor.classes)
            if predictor.thresholds is None:
                predictor.logger.warning(f"{exp_dir} has no tuned thresholds (score.json): labels are those at 0.5 or above")
        return predictor

    @classmethod
    def from_checkpoints(cls, ckpts: list[dict], device: str = "auto", names: list[str] | None = None,
                         weights: list[float] | None = None) -> "Predictor":
        """Fold models from checkpoint dicts ({'model', 'cfg', 'classes', 'target_range'}), all
        made for the same inputs and classes; `weights`: each one's share (equal by default)."""
        names = names or [f"fold model {i}" for i in range(len(ckpts))]
        cfg = artifacts.checkpoint_config(ckpts[0])
        for name, ckpt in zip(names, ckpts):
            other = artifacts.checkpoint_config(ckpt)
            if (other.img_size, other.in_chans, other.task, ckpt["classes"]) != (cfg.img_size, cfg.in_chans, cfg.task, ckpts[0]["classes"]):
                raise ValueError(f"{name} was trained for other inputs or classes than the first fold's: "
                                 f"its folds cannot be averaged (train them again together)")
        dev = get_device(device if device != "auto" else cfg.device)
        scale = TargetScale(*ckpts[0]["target_range"]) if ckpts[0].get("target_range") else None
        return cls(cfg, [load_model(ckpt, dev) for ckpt in ckpts], ckpts[0]["classes"], scale, dev, weights=weights)

    def predict_array(self, items: list, progress: bool = False) -> tuple[np.ndarray, dict[int, str]]:
        """Fold-averaged predictions [n, classes] (or [n, 1]) for the readable items; NaN rows
        and an error message for the others. Items are decoded in batches (by cfg.num_workers
        DataLoader workers), so a test set of any size streams through in bounded memory."""
        out = self.run(items, progress)
        return out["preds"], out["errors"]

    def run(self, items: list, progress: bool = False, embeddings: bool = False,
            eta: logging.Logger | None = None, each: bool = False) -> dict:
        """predictions: fold-averaged [n, classes] (or [n, 1]), NaN for unreadable items;
        embeddings (with embeddings=True): each fold model's [n, width] float16, NaN rows for
        unreadable items; each (with each=True): each fold model's predictions (a stacker of its
        out-of-fold predictions reads fold k's); errors: {index: reason}. With `eta`, logs an
        estimate of the whole run's time after its first batches."""
        width = self.task.n_outputs(self.classes)
        preds = np.full((len(items), width), np.nan)
        per_model = [np.full((len(items), width), np.nan) for _ in self.models] if each else None
        embs = [np.full((len(items), m.num_features), np.nan, dtype=np.float16) for m in self.models] if embeddings else None
        errors: dict[int, str] = {}
        dataset = _Items(list(items), self.transform, self.cfg.in_chans)
        workers = self.cfg.num_workers if len(items) > 4 * self.cfg.batch_size else 0
        loader = DataLoader(dataset, batch_size=self.cfg.batch_size, shuffle=False, num_workers=workers,
                            collate_fn=_collate, pin_memory=self.device.type == "cuda")
        start, done = time.perf_counter(), 0
        for batch, (images, index, failed) in enumerate(tqdm(loader, desc="predict", disable=not progress, mininterval=1.0), 1):
            errors.update(failed)
            done += len(index) + len(failed)
            if len(index):
                images = self.norm(images)
                total = 0
                for k, (model, weight) in enumerate(zip(self.models, self.weights)):
                    one = predict_batch(model, images, self.device, self.rules, self.scale)[0].float()
                    total = total + weight * one
                    if each:
                        per_model[k][index] = one.cpu().numpy().reshape(len(index), width)
                    if embeddings:
                        with torch.no_grad(), amp_context(self.rules.embed_amp, self.device):
                            embs[k][index] = model.features(images).float().cpu().numpy().astype(np.float16)
                preds[index] = total.cpu().numpy().reshape(len(index), width)
                artifacts.finite_or_raise(preds[index], f"{self.cfg.experiment}: the model's predictions of items "
                                                        f"{index[:3]} ...")
            if eta is not None and batch == max(1, min(5, len(loader) - 1)) and done < len(items):  # after the first batches
                seconds = (time.perf_counter() - start) / done * len(items)
                eta.info(f"about {seconds / 60:.1f} min for {len(items)} images with {len(self.models)} model(s) "
                         f"on {self.device} (Kaggle re-runs stop at 9 h)")
        return {"preds": preds, "embeddings": embs, "each": per_model, "errors": errors, "seconds": time.perf_counter() - start}

    def predict(self, items: list, progress: bool = False) -> list[dict]:
        """One result per item, in order (see the module docstring)."""
        start = time.perf_counter()
        preds, errors = self.predict_array(list(items), progress)
        hits = self.task.decisions(self.cfg, preds, self.thresholds)  # multi-label: the labels each row has
        results = []
        for i, item in enumerate(items):
            rid = str(item) if isinstance(item, (str, Path)) else i
            if i in errors:
                results.append({"id": rid, "label": "ERROR", "confidence": None, "error": errors[i]})
            else:
                results.append({"id": rid, **self.task.result(self.cfg, preds[i], None if hits is None else hits[i], self.classes)})
        seconds = time.perf_counter() - start
        ok = len(items) - len(errors)
        dist = self.task.tally([r for r in results if r["label"] != "ERROR"])
        self.logger.info(f"predicted {len(items)} item(s) with {len(self.models)} model(s) in {seconds:.2f}s "
                         f"({1000 * seconds / max(len(items), 1):.1f} ms/image): {ok} ok, {len(errors)} failed"
                         + (f"; {self.task.label_plural} {dict(dist.most_common())}" if dist else ""))
        return results


class _Items(Dataset):
    """Paths or arrays -> (uint8 tensor, index, error): a bad item yields its error, not an exception."""

    def __init__(self, items: list, transform, in_chans: int):
        self.items, self.transform, self.in_chans = items, transform, in_chans

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        try:
            return self.transform(image=_as_image(self.items[i], self.in_chans))["image"], i, None
        except Exception as e:  # noqa: BLE001 - one bad item must not stop the others
            return None, i, f"{type(e).__name__}: {e}"


def _collate(rows: list) -> tuple[torch.Tensor | None, list[int], dict[int, str]]:
    good = [(t, i) for t, i, err in rows if err is None]
    images = torch.stack([t for t, _ in good]) if good else None
    return images, [i for _, i in good], {i: err for _, i, err in rows if err is not None}


def results_frame(results: list[dict]) -> pd.DataFrame:
    """Results as a table: id, label, confidence, error, then prob_<class> (or value)."""
    rows = []
    for r in results:
        row = {"id": r["id"], "label": r["label"], "confidence": r.get("confidence"), "error": r.get("error", "")}
        row.update({f"prob_{c}": p for c, p in r.get("probs", {}).items()})
        if "value" in r:
            row["value"] = r["value"]
        rows.append(row)
    return pd.DataFrame(rows)


def latency(predictor: Predictor, n: int = 64, size: int | None = None) -> dict:
    """Single-image latency (ms) and batched throughput (images/s) on the predictor's device."""
    size = size or predictor.cfg.img_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    predictor.predict_array(images[:2])  # warm-up
    start = time.perf_counter()
    for img in images[:16]:
        predictor.predict_array([img])
    single_ms = 1000 * (time.perf_counter() - start) / 16
    start = time.perf_counter()
    predictor.predict_array(images)
    batched = n / (time.perf_counter() - start)
    return {"single_image_ms": single_ms, "batched_img_per_s": batched, "device": str(predictor.device),
            "folds": len(predictor.models), "batch_size": predictor.cfg.batch_size, "tta": len(predictor.cfg.tta)}


def csv_items(csv: str, image_dir: str | None, image_ext: str) -> list[str]:
    """The items of a CSV: its 'path' column (or its first), each an image file (absolute, or
    relative to the working folder or to the CSV's); with `image_dir`, ids found in that folder
    as training finds them (helpers.images.locate_images). Values that name no file at all are an
    error before any model is loaded, naming the column and what was tried."""
    path = Path(csv)
    try:
        df = read_table(path, None)
    except (OSError, ValueError) as e:
        raise ValueError(f"--csv {csv}: {e}") from None
    if df.empty or not len(df.columns):
        raise ValueError(f"--csv {csv}: no rows")
    col = "path" if "path" in df.columns else df.columns[0]
    values = df[col].astype(str).tolist()
    if image_dir:
        folder = Path(image_dir)
        if not folder.is_dir():
            raise ValueError(f"--image-dir {image_dir}: not a folder")
        located = locate_images(pd.Series(values), folder, image_ext)
        return [p if p else f"{folder / v} (not found: {', '.join(t) if t else 'it leaves the image folder'})"
                for v, (p, t) in zip(values, located)]
    items = [v if Path(v).is_absolute() or Path(v).exists() else str(path.parent / v) for v in values]
    if not any(Path(i).is_file() for i in items):
        raise ValueError(f"--csv {csv}: column '{col}' names no image file (e.g. {values[0]!r}: neither {Path(values[0])} nor "
                         f"{path.parent / values[0]} exists). Give a 'path' column of image files, or add --image-dir "
                         f"FOLDER to find these ids there as training does (their extension may be left out)")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="models/<experiment> folder")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    parser.add_argument("--csv", help="a CSV of items: a 'path' column (or the first column)")
    parser.add_argument("--image-dir", help="with --csv: the column holds ids, found in this folder as training finds them")
    parser.add_argument("--out", help="write the results to this CSV")
    parser.add_argument("--save", action="store_true", help="save results in predictions/<exp>_<timestamp>/")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bench", action="store_true", help="measure single-image latency and batched throughput")
    parser.add_argument("--refit", choices=["blend", "alone", "off"],
                        help="the refit on all rows with the folds, alone, or not (default: as the ensemble used it)")
    args = parser.parse_args(argv)
    if not args.bench and not args.image and not args.csv:
        parser.error("give --image and/or --csv")
    refit = None if args.refit is None else "" if args.refit == "off" else args.refit
    try:
        predictor = Predictor.from_experiment(args.experiment, device=args.device, refit=refit)
        if args.bench:
            print(json.dumps(latency(predictor), indent=1))
            return 0
        items = list(args.image) + (csv_items(args.csv, args.image_dir, predictor.cfg.image_ext) if args.csv else [])
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"predict: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    table = results_frame(predictor.predict(items, progress=len(items) > 256))
    if args.out:
        atomic_to_csv(table, args.out)
    if args.save:
        folder = artifacts.predictions_dir(f"{predictor.cfg.experiment}_{datetime.now():%Y%m%d_%H%M%S}")
        atomic_to_csv(table, folder / "predictions.csv")
        atomic_write_text(folder / "summary.json", json.dumps({"experiment": predictor.cfg.experiment, "items": len(table),
                                                              "failed": int((table["label"] == "ERROR").sum())}, indent=1))
        print(f"saved to {folder}")
    with pd.option_context("display.max_rows", 50, "display.width", 200):
        print(table.drop(columns=[c for c in table.columns if c.startswith("prob_")]).to_string(index=False))
    failed = int((table["label"] == "ERROR").sum())
    if failed:
        print(f"predict: {failed} of {len(table)} item(s) could not be read (label ERROR, the reason in 'error')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
