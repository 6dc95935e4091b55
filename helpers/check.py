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
import contextlib
import logging
import os
import sys
from pathlib import Path

import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from . import artifacts, freshness
from .config import CFG, experiment_names, resolve
from .configfile import parse_set
from .data import DataError, column_problems, no_test_metadata, test_problems, train_problems
from .images import locate_images, missing_images, read_image
from .models import model_problems
from .weights import weights_problem
from .submission import submission_format
from .tasks import task_of
from .transforms import transform_problems
from .utils import read_table


def config_problems(path: str, experiment: str = "", overrides: dict | None = None) -> tuple[CFG | None, list[str]]:
    """Load the config, collecting every bad key instead of stopping at the first; the CFG
    returned keeps the good keys so that the data can still be checked (None when the file
    itself cannot be read: there is no data to check then)."""
    try:
        cfg, problems = resolve(path, experiment, overrides)
    except (KeyError, ValueError, FileNotFoundError) as e:
        return None, [str(e.args[0])]
    return cfg, [f"{path}: {p}" for p in problems]


def _csv(path: Path, what: str, id_col: str, problems: list[str], text_cols: list[str] = ()) -> pd.DataFrame | None:
    if not path.exists():
        problems.append(f"{what} not found: {path}")
        return None
    try:
        return read_table(path, id_col, text_cols)
    except ValueError as e:  # not UTF-8, empty, malformed: reported with the others
        problems.append(str(e))
        return None


def table_problems(cfg: CFG) -> tuple[list[str], list[tuple[str, pd.DataFrame, Path]]]:
    """Problems of the CSVs (the loaders' own checks, all of them at once); also returns
    (split, frame, csv path) for the image check."""
    problems: list[str] = []
    frames = []
    train_path = cfg.path(cfg.train_csv)
    train = _csv(train_path, "train CSV", cfg.id_col, problems, cfg.label_text)
    if train is not None:
        problems += train_problems(cfg, train, train_path)
        if cfg.id_col in train:
            frames.append(("train", train, train_path))
    sample_path, test_path = cfg.path(cfg.sample_submission), cfg.path(cfg.test_csv)
    sample = _csv(sample_path, "sample submission", cfg.id_col, problems)
    if sample is not None:
        problems += column_problems(sample, sample_path, [cfg.id_col])
    test = _csv(test_path, "test CSV", cfg.id_col, problems) if test_path.exists() else None
    if test is not None:
        problems += column_problems(test, test_path, [cfg.id_col, *cfg.metadata_cols])
    elif cfg.metadata_cols:
        problems.append(no_test_metadata(cfg))
    if test is None and sample is not None and cfg.id_col in sample:
        test, test_path = sample[[cfg.id_col]], sample_path
    if test is not None and cfg.id_col in test:
        problems += test_problems(cfg, test, test_path, sample, sample_path)
        frames.append(("test", test, test_path))
    target_known = all(c in train for c in (cfg.label_cols or [cfg.target_col])) if train is not None else False
    if sample is not None and target_known and cfg.id_col in sample and len(train):
        try:
            submission_format(cfg, sample, task_of(cfg).classes(train, cfg))
        except ValueError as e:
            problems.append(str(e))
    return problems, frames


def image_problem(path: str) -> tuple[str | None, tuple]:
    """(what is wrong with one image file or None, its (format, mode)): a broken link, zero
    bytes, an unreadable header, a truncated file."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:  # a link to nowhere, a file without read access
        return f"cannot be opened ({'broken link' if p.is_symlink() else type(e).__name__})", ()
    if size == 0:
        return "zero-byte file", ()
    try:
        with Image.open(p) as im:
            kind = (im.format, im.mode)
    except Exception as e:  # noqa: BLE001
        return f"unreadable image ({type(e).__name__})", ()
    with open(p, "rb") as f:
        f.seek(max(size - 1024, 0))
        tail = f.read()
    suffix = p.suffix.lower()
    if suffix in (".jpg", ".jpeg") and b"\xff\xd9" not in tail:
        return "truncated JPEG (no end-of-image marker)", kind
    if suffix == ".png" and b"IEND" not in tail:
        return "truncated PNG (no IEND chunk)", kind
    return None, kind


def image_problems(cfg: CFG, frames: list[tuple[str, pd.DataFrame, Path]]) -> list[str]:
    """Missing and broken image files (headers read), and one image of every format and mode
    decoded by the reader training uses (helpers.images.read_image)."""
    problems = []
    for split, df, csv_path in frames:
        image_dir = cfg.path(cfg.image_dir_train if split == "train" else cfg.image_dir_test)
        if not image_dir.is_dir():
            problems.append(f"image folder not found: {image_dir} (images for {csv_path.name})")
            continue
        located = locate_images(df[cfg.id_col], image_dir, cfg.image_ext)
        problems += [f"{csv_path.name} {line}: image not found in {image_dir}" for _, line in missing_images(df[cfg.id_col], located)]
        kinds: dict[tuple, tuple[int, str, str]] = {}
        for row, (value, (path, _)) in enumerate(tqdm(list(zip(df[cfg.id_col].astype(str), located)),
                                                      desc=f"check {split} images", mininterval=1.0, leave=False)):
            if path is None:
                continue
            why, kind = image_problem(path)
            if why is not None:
                problems.append(f"{csv_path.name} row {row + 2} id={value}: {path}: {why}")
            elif kind not in kinds:
                kinds[kind] = (row, value, path)
        for (fmt, mode), (row, value, path) in kinds.items():
            try:
                read_image(path, cfg.in_chans)
            except Exception as e:  # noqa: BLE001 - reported, with the format and mode it stands for
                problems.append(f"{csv_path.name} row {row + 2} id={value}: {path}: a {fmt} image in mode {mode} "
                                f"that training cannot decode ({e})")
    return problems


def check(cfg: CFG, images: bool = True) -> list[str]:
    """Every problem of the data and model settings of cfg (an empty list: all good)."""
    problems, frames = table_problems(cfg)
    problems += model_problems(cfg) + transform_problems(cfg)
    if images:
        problems += image_problems(cfg, frames)
    return problems


def check_all(cfgs: list[CFG], images: bool = True) -> list[str]:
    """Every problem of every experiment: the data of experiments that share it checked once;
    a model problem names its experiment when there are several."""
    problems, seen = [], set()
    for cfg in cfgs:
        table, frames = table_problems(cfg)
        problems += table
        if images:
            where = (cfg.id_col, cfg.image_ext, cfg.in_chans, *(str(cfg.path(x)) for x in (
                cfg.train_csv, cfg.test_csv, cfg.sample_submission, cfg.image_dir_train, cfg.image_dir_test)))
            if where not in seen:
                seen.add(where)
                problems += image_problems(cfg, frames)
        prefix = f"experiments.{cfg.experiment}: " if len(cfgs) > 1 else ""
        problems += [prefix + p for p in model_problems(cfg) + transform_problems(cfg) + runtime_problems(cfg)]
        if (weights := weights_problem(cfg)) is not None:
            problems.append(weights)
    return list(dict.fromkeys(problems + artifacts.name_problems(cfgs)))


def runtime_problems(cfg: CFG) -> list[str]:
    """What this machine cannot run as set: more ddp processes than it has GPUs (or, without a
    GPU, CPU cores)."""
    if cfg.ddp <= 1:
        return []
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        return [f"config key 'ddp' ({cfg.ddp}) asks for more processes than the {gpus} GPU(s) this machine has"] if cfg.ddp > gpus else []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cfg.ddp > cores:
        return [f"config key 'ddp' ({cfg.ddp}) asks for more processes than the {cores} CPU core(s) this machine gives "
                f"(no GPU here): each would get less than a core; use ddp: {max(1, cores)} or less"]
    return []


def run_check(cfgs: CFG | list[CFG], logger: logging.Logger | None = None) -> None:
    """The check before any work: raises DataError listing every problem of every experiment.
    A pass is recorded (helpers.freshness) and not repeated while the data and the keys it
    reads are unchanged."""
    logger = logger or logging.getLogger("kaggle")
    cfgs = [cfgs] if isinstance(cfgs, CFG) else cfgs
    todo = [cfg for cfg in cfgs if freshness.stale(cfg, "check")]
    if not todo:
        logger.info("pre-flight check: passed before, data unchanged")
        return
    with contextlib.ExitStack() as passed:  # a pass is recorded as made from what the check read
        for cfg in todo:
            passed.enter_context(freshness.build(cfg, "check"))
        problems = check_all(todo)
        if problems:
            raise DataError(f"pre-flight check found {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    logger.info("pre-flight check: CSVs, images and model settings look right")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--experiment", default="", help="one experiment of the YAML (default: every one)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-images", action="store_true", help="skip reading the image headers")
    args = parser.parse_args(argv)
    try:
        names = [args.experiment] if args.experiment else experiment_names(args.config)
        overrides = parse_set(args.set)
    except (ValueError, FileNotFoundError) as e:
        print(f"1 problem(s):\n- {e}")
        return 1
    cfgs, problems = [], []
    for name in names:
        cfg, found = config_problems(args.config, name, overrides)
        problems += found
        if cfg is not None:
            cfgs.append(cfg)
    problems = list(dict.fromkeys(problems + check_all(cfgs, images=not args.no_images)))
    if problems:
        print(f"{len(problems)} problem(s):", *problems, sep="\n- ")
        return 1
    print(f"no problems found for {', '.join(c.experiment for c in cfgs)} ({cfgs[0].competition_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
