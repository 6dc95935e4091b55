"""Pre-flight check: read the CSVs and every image header before any training and report
all problems at once, each naming the file, row, column or key.

    python -m helpers.check --config configs/X.yaml [--experiment NAME] [--set key=value ...]

Checks: unknown config keys and wrong types, missing id/target/metadata/group columns,
duplicate ids, NaN targets, classes with fewer rows than folds, an empty test set, test ids
missing from sample_submission (and the reverse), missing, zero-byte, unreadable or truncated
images, an unknown timm model name (close matches suggested), a missing pretrained_path.
02_train runs it first; a passing result is remembered until the data or config change.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import logging
import sys
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from .config import CFG, check_value, config_layers, parse_set, to_dict, validate
from .data import locate_images, no_test_metadata
from .utils import atomic_write_text


class DataError(ValueError):
    """The problems the pre-flight check found, one per line."""


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
        validate(cfg)
    except ValueError as e:
        problems.append(f"{path}: {e}")
    return cfg, problems


def _csv(path: Path, what: str, columns: list[str], problems: list[str]) -> pd.DataFrame | None:
    if not path.exists():
        problems.append(f"{what} not found: {path}")
        return None
    try:
        df = pd.read_csv(path)
    except Exception as e:  # noqa: BLE001 - any parse error is reported, not raised
        problems.append(f"{path}: cannot be read as CSV ({e})")
        return None
    for col in columns:
        if col and col not in df.columns:
            problems.append(f"{path}: missing column '{col}' (it has {list(df.columns)})")
    return df


def _rows(mask: pd.Series, limit: int = 8) -> str:
    rows = (mask[mask].index + 2).tolist()  # +2: the header is line 1, rows start at line 2
    return ", ".join(map(str, rows[:limit])) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def table_problems(cfg: CFG) -> tuple[list[str], list[tuple[str, pd.DataFrame, Path]]]:
    """Problems of the CSVs; also returns (split, frame, csv path) for the image check."""
    problems: list[str] = []
    frames = []
    train_path = cfg.path(cfg.train_csv)
    train = _csv(train_path, "train CSV", [cfg.id_col, cfg.target_col, *cfg.metadata_cols, cfg.group_col], problems)
    if train is not None:
        if len(train) == 0:
            problems.append(f"{train_path}: no rows")
        if cfg.id_col in train:
            dup = train[cfg.id_col].duplicated(keep=False)
            if dup.any():
                problems.append(f"{train_path}: {int(dup.sum())} rows share an id in '{cfg.id_col}' (rows {_rows(dup)})")
            frames.append(("train", train, train_path))
        if cfg.target_col in train:
            nan = train[cfg.target_col].isna()
            if nan.any():
                problems.append(f"{train_path}: NaN in target column '{cfg.target_col}' (rows {_rows(nan)})")
            if cfg.task == "classification":
                counts = train[cfg.target_col].dropna().value_counts()
                small = counts[counts < cfg.n_folds]
                for label, n in small.items():
                    problems.append(f"{train_path}: class {label!r} of '{cfg.target_col}' has {n} row(s), fewer than n_folds={cfg.n_folds}")
            elif not pd.api.types.is_numeric_dtype(train[cfg.target_col]):
                problems.append(f"{train_path}: regression target '{cfg.target_col}' is not numeric")
    sample_path, test_path = cfg.path(cfg.sample_submission), cfg.path(cfg.test_csv)
    sample = _csv(sample_path, "sample submission", [cfg.id_col], problems)
    test = _csv(test_path, "test CSV", [cfg.id_col, *cfg.metadata_cols], problems) if test_path.exists() else None
    if test is None and cfg.metadata_cols:
        problems.append(no_test_metadata(cfg))
    if test is None and sample is not None and cfg.id_col in sample:
        test, test_path = sample[[cfg.id_col]], sample_path
    if test is not None and cfg.id_col in test:
        if len(test) == 0:
            problems.append(f"{test_path}: the test set is empty")
        dup = test[cfg.id_col].duplicated(keep=False)
        if dup.any():
            problems.append(f"{test_path}: {int(dup.sum())} rows share an id in '{cfg.id_col}' (rows {_rows(dup)})")
        frames.append(("test", test, test_path))
        if sample is not None and cfg.id_col in sample and test_path != sample_path:
            test_ids, sample_ids = set(test[cfg.id_col].astype(str)), set(sample[cfg.id_col].astype(str))
            if test_ids - sample_ids:
                problems.append(f"{test_path}: {len(test_ids - sample_ids)} test id(s) missing from {sample_path.name}, "
                                f"e.g. {sorted(test_ids - sample_ids)[:3]}")
            if sample_ids - test_ids:
                problems.append(f"{sample_path}: {len(sample_ids - test_ids)} id(s) have no test row, e.g. {sorted(sample_ids - test_ids)[:3]}")
    return problems, frames


def model_problems(cfg: CFG) -> list[str]:
    import timm

    problems = []
    if cfg.arch == "timm" and not timm.is_model(cfg.model_name):
        close = difflib.get_close_matches(cfg.model_name, timm.list_models(), n=5, cutoff=0.6)
        problems.append(f"config key 'model_name': unknown timm model '{cfg.model_name}'"
                        + (f" (close: {', '.join(close)})" if close else ""))
    if cfg.pretrained and cfg.pretrained_path and not Path(cfg.pretrained_path).expanduser().is_file():
        problems.append(f"config key 'pretrained_path': weights file not found: {cfg.pretrained_path}")
    return problems


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
        for row, (value, (path, tried)) in enumerate(tqdm(list(zip(df[cfg.id_col].astype(str), located)),
                                                          desc=f"check {split} images", mininterval=1.0, leave=False)):
            if path is None:
                problems.append(f"{csv_path.name} row {row + 2} id={value}: image not found in {image_dir} (tried {', '.join(tried)})")
            elif (why := image_problem(path)) is not None:
                problems.append(f"{csv_path.name} row {row + 2} id={value}: {path}: {why}")
    return problems


def check(cfg: CFG, images: bool = True) -> list[str]:
    """Every problem of the data and model settings of cfg (an empty list: all good)."""
    problems, frames = table_problems(cfg)
    problems += model_problems(cfg)
    if images:
        problems += image_problems(cfg, frames)
    return problems


def _signature(cfg: CFG) -> str:
    """What a passing check depends on: the config and the CSVs' and image folders' stamps."""
    stamps = [to_dict(cfg)]
    for name in (cfg.train_csv, cfg.test_csv, cfg.sample_submission, cfg.image_dir_train, cfg.image_dir_test):
        p = cfg.path(name)
        stamps.append([str(p), p.stat().st_mtime_ns, p.stat().st_size] if p.exists() else [str(p)])
    return hashlib.sha1(json.dumps(stamps, sort_keys=True, default=str).encode()).hexdigest()


def run_check(cfg: CFG, logger: logging.Logger | None = None) -> None:
    """The check before training: raises DataError listing every problem. A passing result
    is remembered in models/<exp>/check.json until the config, CSVs or image folders change."""
    logger = logger or logging.getLogger("kaggle")
    stamp, sig = cfg.exp_dir / "check.json", _signature(cfg)
    if stamp.exists() and json.loads(stamp.read_text()).get("signature") == sig:
        logger.info("pre-flight check: passed before, data unchanged")
        return
    problems = check(cfg)
    if problems:
        raise DataError(f"pre-flight check found {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    atomic_write_text(stamp, json.dumps({"signature": sig}))
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
