"""Small utilities: library versions, reading CSVs with their ids as text, atomic writes (a
killed run never leaves half a file behind), a timer and an idempotent logger. The device,
precision and seeding rules are helpers.runtime's."""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

# --- library versions --------------------------------------------------------------------
# the oldest releases this code works with (Kaggle's image lags PyPI); older ones fail at
# start with the version they need, not in the middle of a run. `make test-oldest` runs the
# training, stacking, multi-label and end-to-end tests on them (requirements-oldest.txt: timm
# 1.0.3 is the oldest 1.0 on PyPI; albumentations 2.0.0 needs OpenCV 4.9 and numpy 1.24.4)
MIN_VERSIONS = {"torch": "2.3", "timm": "1.0.3", "albumentations": "2.0.0", "lightgbm": "4.0", "scikit-learn": "1.2",
                "pandas": "2.0", "numpy": "1.24.4", "opencv-python-headless|opencv-python|opencv-contrib-python": "4.9"}


def _version_tuple(text: str) -> tuple[int, ...]:
    """'2.14.1+cu130' -> (2, 14, 1); '1.0.0rc1' -> (1, 0, 0): the release numbers only."""
    parts = []
    for piece in text.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.end() < len(piece):
            break
    return tuple(parts)


def version_problems() -> list[str]:
    """Installed libraries older than MIN_VERSIONS, each with the command that fixes it."""
    problems = []
    for names, need in MIN_VERSIONS.items():
        for name in names.split("|"):
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue
            if _version_tuple(have) < _version_tuple(need):
                problems.append(f"{name} {have} is older than {need}, the oldest release helpers works with: "
                                f"pip install -U '{name}>={need}'")
            break
    return problems


def check_versions() -> None:
    problems = version_problems()
    if problems:
        raise ImportError("\n".join(problems))


class DataError(ValueError):
    """Problems of the competition's data, one per line, each naming its file, row or column."""


# --- reading CSVs ------------------------------------------------------------------------
# pandas' default missing-value markers, kept for every column but the id column
NA_VALUES = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
             "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]


def read_table(path: str | Path, id_col: str | None = None, text_cols: tuple | list = ()):
    """A CSV with its id column (and `text_cols`: a multi-label column, "0 3" or "None") read as
    text: '0007' stays '0007' (not 7), 'NA' stays 'NA' and a blank is ''. An unreadable file
    (not UTF-8, empty, malformed) raises naming it."""
    try:
        if id_col is None:
            return pd.read_csv(path, encoding="utf-8-sig")
        columns = pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns
        if id_col not in columns:
            return pd.read_csv(path, encoding="utf-8-sig")
        text = {id_col, *(c for c in text_cols if c in columns)}
        return pd.read_csv(path, encoding="utf-8-sig", dtype={c: str for c in text}, keep_default_na=False,
                           na_values={c: NA_VALUES for c in columns if c not in text})
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); "
                         f"save the file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: the file is empty (no header row)") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}: cannot be read as CSV ({str(e).strip()})") from None


def column_problems(df: pd.DataFrame, path: Path, columns: list[str]) -> list[str]:
    return [f"{path}: missing column '{c}' (it has {list(df.columns)})" for c in dict.fromkeys(columns) if c and c not in df.columns]


def read_csv(path: Path, required: list[str], what: str, id_col: str | None = None, text_cols: tuple | list = ()) -> pd.DataFrame:
    """Read a CSV (its id column and `text_cols` as text) and check it has the required columns
    (an error names file and column)."""
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    df = read_table(path, id_col, text_cols)
    missing = column_problems(df, path, required)
    if missing:
        raise KeyError("; ".join(missing))
    return df


# --- atomic writes ----------------------------------------------------------------------
@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it is renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix or ".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_to_csv(df, path: str | Path) -> None:
    """DataFrame.to_csv through a temp file and a rename."""
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def atomic_save(obj, path: str | Path, saver: Callable | None = None) -> None:
    """torch.save (or `saver(obj, tmp)`) through a temp file and a rename."""
    if saver is None:
        import torch  # here: the runner imports this module before it times its imports of torch

        saver = torch.save
    with atomic_path(path) as tmp:
        saver(obj, tmp)


def atomic_save_npy(array: np.ndarray, path: str | Path) -> None:
    """np.save through a temp file and a rename."""
    atomic_save(array, path, saver=lambda a, tmp: np.save(tmp, a))


def save_figure(fig, path: str | Path) -> None:
    """Save a matplotlib figure beside the results (atomically)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")


# --- timing ------------------------------------------------------------------------------
class Timer:
    """`with Timer() as t: ...; t.seconds`, or `Timer(logger, 'what')` to log the time."""

    def __init__(self, logger: logging.Logger | None = None, what: str = ""):
        self.logger, self.what, self.seconds = logger, what, 0.0

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        if self.logger and self.what:
            self.logger.info(f"{self.what}: {self.seconds:.1f}s")


# --- logging -----------------------------------------------------------------------------
def get_logger(name: str = "kaggle", log_file: str | Path | None = None) -> logging.Logger:
    """Console + file logger. Calling it again (a re-run cell) replaces, never adds, handlers."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger
