"""Pre-flight check: read the CSVs and every image header before any training and report
all problems at once, each naming the file, row, column or key.

    python -m helpers.check --config configs/X.yaml [--experiment NAME] [--set key=value ...]

Checks: unknown config keys and wrong types, the data checks the loaders run (helpers.data:
missing id/target/metadata/group columns, duplicate ids, NaN targets, classes with fewer rows
than folds, an empty test set, test ids missing from sample_submission and the reverse, missing
images), plus zero-byte, unreadable or truncated image files, and the model settings
(helpers.models: an unknown timm name with close matches, a missing pretrained_path, unknown
model_kwargs). 02_train runs it first; a pass is remembered (helpers.artifacts) until the
data or the keys it reads change.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from . import artifacts
from .config import CFG, check_config, check_value, config_layers, parse_set
from .data import DataError, column_problems, locate_images, missing_images, no_test_metadata, test_problems, train_problems
from .models import model_problems


def config_problems(path: str, experiment: str = "", overrides: dict | None = None) -> tuple[CFG | None, list[str]]:
    """Load the config, collecting every bad key instead of stopping at the first; the CFG
    returned keeps the good keys so that the data can still be checked (None when the file
    itself cannot be read: there is no data to check then)."""
    try:
        layers = config_layers(path, experiment, overrides)
    except (KeyError, ValueError, FileNotFoundError) as e:
        return None, [str(e.args[0])]
    problems, values = [], {}
    for where, layer in layers:
        for key, value in layer.items():
            try:
                values[key] = check_value(key, value)
            except (KeyError, TypeError) as e:
                problems.append(f"{where}: {e.args[0]}")
    cfg = CFG(**values)
    try:
        check_config(cfg)
    except ValueError as e:
        problems.append(f"{path}: {e}")
    return cfg, problems


def _csv(path: Path, what: str, problems: list[str]) -> pd.DataFrame | None:
    if not path.exists():
        problems.append(f"{what} not found: {path}")
        return None
    try:
        return pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - any parse error is reported, not raised
        problems.append(f"{path}: cannot be read as CSV ({e})")
        return None


def table_problems(cfg: CFG) -> tuple[list[str], list[tuple[str, pd.DataFrame, Path]]]:
    """Problems of the CSVs (the loaders' own checks, all of them at once); also returns
    (split, frame, csv path) for the image check."""
    problems: list[str] = []
    frames = []
    train_path = cfg.path(cfg.train_csv)
    train = _csv(train_path, "train CSV", problems)
    if train is not None:
        problems += train_problems(cfg, train, train_path)
        if cfg.id_col in train:
            frames.append(("train", train, train_path))
    sample_path, test_path = cfg.path(cfg.sample_submission), cfg.path(cfg.test_csv)
    sample = _csv(sample_path, "sample submission", problems)
    if sample is not None:
        problems += column_problems(sample, sample_path, [cfg.id_col])
    test = _csv(test_path, "test CSV", problems) if test_path.exists() else None
    if test is not None:
        problems += column_problems(test, test_path, [cfg.id_col, *cfg.metadata_cols])
    elif cfg.metadata_cols:
        problems.append(no_test_metadata(cfg))
    if test is None and sample is not None and cfg.id_col in sample:
        test, test_path = sample[[cfg.id_col]], sample_path
    if test is not None and cfg.id_col in test:
        problems += test_problems(cfg, test, test_path, sample, sample_path)
        frames.append(("test", test, test_path))
    return problems, frames


def image_problem(path: str) -> str | None:
    """What is wrong with one image file, or None: zero bytes, unreadable header, truncated."""
    p = Path(path)
    size = p.stat().st_size
    if size == 0:
        return "zero-byte file"
    try:
        with Image.open(p) as im:
            im.size  # noqa: B018 - the header parse is the check
    except Exception as e:  # noqa: BLE001
        return f"unreadable image ({type(e).__name__})"
    with open(p, "rb") as f:
        f.seek(max(size - 1024, 0))
        tail = f.read()
    suffix = p.suffix.lower()
    if suffix in (".jpg", ".jpeg") and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)"
    if suffix == ".png" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)"
    return None


def image_problems(cfg: CFG, frames: list[tuple[str, pd.DataFrame, Path]]) -> list[str]:
    problems = []
    for split, df, csv_path in frames:
        image_dir = cfg.path(cfg.image_dir_train if split == "train" else cfg.image_dir_test)
        if not image_dir.is_dir():
            problems.append(f"image folder not found: {image_dir} (images for {csv_path.name})")
            continue
        located = locate_images(df[cfg.id_col], image_dir, cfg.image_ext)
        problems += [f"{csv_path.name} {line}: image not found in {image_dir}" for _, line in missing_images(df[cfg.id_col], located)]
        for row, (value, (path, _)) in enumerate(tqdm(list(zip(df[cfg.id_col].astype(str), located)),
                                                      desc=f"check {split} images", mininterval=1.0, leave=False)):
            if path is not None and (why := image_problem(path)) is not None:
                problems.append(f"{csv_path.name} row {row + 2} id={value}: {path}: {why}")
    return problems


def check(cfg: CFG, images: bool = True) -> list[str]:
    """Every problem of the data and model settings of cfg (an empty list: all good)."""
    problems, frames = table_problems(cfg)
    problems += model_problems(cfg)
    if images:
        problems += image_problems(cfg, frames)
    return problems


def run_check(cfg: CFG, logger: logging.Logger | None = None) -> None:
    """The check before training: raises DataError listing every problem. A pass is recorded
    (helpers.artifacts) and not repeated while the data and the keys it reads are unchanged."""
    logger = logger or logging.getLogger("kaggle")
    if artifacts.stale(cfg, "check") is None:
        logger.info("pre-flight check: passed before, data unchanged")
        return
    problems = check(cfg)
    if problems:
        raise DataError(f"pre-flight check found {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    artifacts.record(cfg, "check")
    logger.info("pre-flight check: CSVs, images and model settings look right")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--experiment", default="", help="experiment of the YAML (default: the first)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-images", action="store_true", help="skip reading the image headers")
    args = parser.parse_args(argv)
    cfg, problems = config_problems(args.config, args.experiment, parse_set(args.set))
    if cfg is not None:
        problems += check(cfg, images=not args.no_images)
    if problems:
        print(f"{len(problems)} problem(s):", *problems, sep="\n- ")
        return 1
    print(f"no problems found for {cfg.experiment} ({cfg.competition_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
