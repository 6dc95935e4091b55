"""Competition data: read and check the CSVs, the targets and labels, the training rows with
their image files, the Dataset, the epoch sampler and the loaders. Image files are
helpers.images', transforms helpers.transforms'."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from .config import CFG
from .images import read_image, resolve_paths
from .tasks import task_of
from .tasks.base import rows_of
from .transforms import create_transforms
from .utils import DataError, column_problems, read_csv

if TYPE_CHECKING:
    import albumentations as A


# --- CSVs and their checks (the pre-flight report, helpers.check, runs the same ones) ---------
def id_problems(df: pd.DataFrame, id_col: str, path: Path) -> list[str]:
    """Blank ids, and ids that appear more than once (by value, with their rows)."""
    problems = []
    ids = df[id_col].astype(str)
    blank = ids.str.strip() == ""
    if blank.any():
        problems.append(f"{path}: {int(blank.sum())} blank id(s) in '{id_col}' (rows {rows_of(blank)})")
    dup = ids.duplicated(keep=False) & ~blank
    if dup.any():
        groups = [f"'{value}' on rows {rows_of(ids == value, 4)}" for value in list(dict.fromkeys(ids[dup]))[:5]]
        more = dup.groupby(ids).any().sum() - len(groups)
        problems.append(f"{path}: {int(dup.sum())} rows share an id in '{id_col}': " + "; ".join(groups)
                        + (f"; and {more} more ids" if more > 0 else ""))
    return problems


def train_problems(cfg: CFG, train: pd.DataFrame, path: Path) -> list[str]:
    """Every problem of train.csv's table: columns, rows, ids, the target (the task's checks), the groups."""
    task = task_of(cfg)
    target = task.target_columns(cfg)
    problems = column_problems(train, path, [cfg.id_col, *target, *cfg.metadata_cols, cfg.group_col])
    if len(train) == 0:
        return problems + [f"{path}: no rows"]
    if cfg.id_col in train:
        problems += id_problems(train, cfg.id_col, path)
    if all(c in train for c in target):
        problems += task.problems(cfg, train, path)
    if cfg.group_col and cfg.group_col in train:
        nan = train[cfg.group_col].isna() | (train[cfg.group_col].astype(str).str.strip() == "")
        if nan.any():
            problems.append(f"{path}: group column '{cfg.group_col}' is empty on {int(nan.sum())} row(s) (rows {rows_of(nan)}); "
                            f"every row needs its group")
        groups = train[cfg.group_col].dropna().nunique()
        if groups < cfg.n_folds:
            problems.append(f"{path}: group column '{cfg.group_col}' has {groups} group(s), fewer than n_folds={cfg.n_folds}")
    return problems


def test_problems(cfg: CFG, test: pd.DataFrame, test_path: Path, sample: pd.DataFrame | None, sample_path: Path) -> list[str]:
    """Problems of the test ids: none, blank or repeated ones, and ids that test.csv and
    sample_submission do not share."""
    problems = []
    if len(test) == 0:
        problems.append(f"{test_path}: the test set is empty")
    problems += id_problems(test, cfg.id_col, test_path)
    if sample is not None and cfg.id_col in sample and test_path != sample_path:
        test_ids, sample_ids = set(test[cfg.id_col].astype(str)), set(sample[cfg.id_col].astype(str))
        if test_ids - sample_ids:
            problems.append(f"{test_path}: {len(test_ids - sample_ids)} test id(s) missing from {sample_path.name}, "
                            f"e.g. {sorted(test_ids - sample_ids)[:3]}")
        if sample_ids - test_ids:
            problems.append(f"{sample_path}: {len(sample_ids - test_ids)} id(s) have no test row, e.g. {sorted(sample_ids - test_ids)[:3]}")
    return problems


def read_train(cfg: CFG) -> pd.DataFrame:
    """train.csv with `path` (resolved image file) and `target` (the task's encoding: a class
    index, a float, a 0/1 row of labels) added; debug: a few rows (every class kept)."""
    path = cfg.path(cfg.train_csv)
    task = task_of(cfg)
    required = [cfg.id_col, *task.target_columns(cfg), *cfg.metadata_cols] + ([cfg.group_col] if cfg.group_col else [])
    df = read_csv(path, required, "train CSV", cfg.id_col, cfg.label_text)
    problems = train_problems(cfg, df, path)
    if problems:
        raise DataError("\n".join(problems))
    df["path"] = resolve_paths(df[cfg.id_col], cfg.path(cfg.image_dir_train), cfg.image_ext, path)
    df = task.encode(cfg, df)
    if cfg.debug:  # tiny data: check the whole path quickly
        df = task.subsample(cfg, df)
    return df.reset_index(drop=True)


def read_test(cfg: CFG) -> pd.DataFrame:
    """Test ids (from test.csv, else from sample_submission) with their image `path`."""
    test_path = cfg.path(cfg.test_csv)
    if test_path.exists():
        df = read_csv(test_path, [cfg.id_col, *cfg.metadata_cols], "test CSV", cfg.id_col)
    elif cfg.metadata_cols:
        raise FileNotFoundError(no_test_metadata(cfg))
    else:
        test_path = cfg.path(cfg.sample_submission)
        df = read_csv(test_path, [cfg.id_col], "sample submission (no test CSV)", cfg.id_col)[[cfg.id_col]]
    problems = test_problems(cfg, df, test_path, None, test_path)
    if problems:
        raise DataError("\n".join(problems))
    df["path"] = resolve_paths(df[cfg.id_col], cfg.path(cfg.image_dir_test), cfg.image_ext, test_path)
    return df.reset_index(drop=True)


def no_test_metadata(cfg: CFG) -> str:
    """The problem of metadata columns without a test CSV: the stacker would lack them for test."""
    return (f"test CSV not found: {cfg.path(cfg.test_csv)}; config key 'metadata_cols' {cfg.metadata_cols} needs "
            f"the test rows' metadata from it (or set metadata_cols: [])")


def read_sample_submission(cfg: CFG) -> pd.DataFrame:
    return read_csv(cfg.path(cfg.sample_submission), [cfg.id_col], "sample submission", cfg.id_col)


class EpochSampler(torch.utils.data.Sampler):
    """The rows of an epoch, in an order drawn from the epoch's seed, each index paired with
    that seed and its batch's number (ImageDataset reseeds its augmentation at every batch).
    A loader built once per fold, with persistent workers, then gives every epoch the same
    batches and augmentations as a run resumed at that epoch, whatever the number of workers."""

    def __init__(self, n: int, shuffle: bool, batch_size: int = 1, rank: int = 0, world: int = 1):
        self.n, self.shuffle, self.batch_size, self.seed, self.rank, self.world = n, shuffle, batch_size, 0, rank, world

    def set_epoch(self, seed: int) -> None:
        self.seed = seed

    def _mine(self) -> np.ndarray:
        """This process's rows: every world-th of the epoch's order, from its rank; in training
        all processes get as many (the last few rows of the order wait for the next epoch)."""
        order = np.random.default_rng(self.seed).permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.shuffle:
            order = order[: self.n // self.world * self.world]
        return order[self.rank::self.world]

    def __len__(self) -> int:
        return len(self._mine())

    def __iter__(self):
        # a batch's number is global (rank included): each process's batches draw their own augmentations
        return iter([(int(i), self.seed, position // self.batch_size * self.world + self.rank)
                     for position, i in enumerate(self._mine())])


class ImageDataset(Dataset):
    """(image tensor, target) pairs; target is -1 where there is none (test). With a cache
    (helpers.cache), decoded images come from its memory map instead of the files. Indexed by
    (row, epoch seed, batch) from an EpochSampler, it reseeds its augmentation at each batch
    (whichever worker makes it); by a plain row, it keeps its stream."""

    def __init__(self, paths: list[str], targets: np.ndarray | None, transform: A.Compose, in_chans: int = 3, cache=None):
        self.paths, self.transform, self.in_chans, self.cache = list(paths), transform, in_chans, cache
        self.rows = cache.rows(self.paths) if cache is not None else None
        self.targets = np.full(len(self.paths), -1.0) if targets is None else np.asarray(targets)
        self.epoch_seed = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        i, *batch = item if isinstance(item, tuple) else (item,)
        if batch and tuple(batch) != self.epoch_seed:
            self.epoch_seed = tuple(batch)
            seed, number = batch
            self.transform.set_random_seed((seed * 1_000_003 + number) % 2**32)
        img = self.cache.image(self.rows[i]) if self.cache is not None else read_image(self.paths[i], self.in_chans)
        return self.transform(image=img)["image"], torch.as_tensor(self.targets[i])


def create_loader(cfg: CFG, df: pd.DataFrame, train: bool, seed: int = 0, cache=None, rank: int = 0,
                  world: int = 1) -> DataLoader:
    """A DataLoader over df's images (this process's share of them with several: `rank` of
    `world`), built once per fold (persistent workers). A training loader shuffles and augments
    from the seed of its EpochSampler: `loader.sampler.set_epoch` before each epoch gives that
    epoch's order and augmentations, the same in a resumed run."""
    targets = df["target"].to_numpy() if "target" in df else None
    dataset = ImageDataset(df["path"].tolist(), targets, create_transforms(cfg, train), cfg.in_chans, cache)
    sampler = EpochSampler(len(dataset), shuffle=train, batch_size=cfg.batch_size, rank=rank, world=world)
    sampler.set_epoch(seed)
    return DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=train and len(sampler) > cfg.batch_size,
                      num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=cfg.num_workers > 0)
