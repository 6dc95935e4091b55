"""Small utilities: seeding, an idempotent logger, a timer, the device, reading CSVs with their
ids as text, and atomic writes (a killed run never leaves half a file behind)."""
from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np


# --- library versions --------------------------------------------------------------------
# the oldest releases this code works with (Kaggle's image lags PyPI); older ones fail at
# start with the version they need, not in the middle of a run
MIN_VERSIONS = {"torch": "2.3", "timm": "1.0", "albumentations": "2.0.0", "lightgbm": "4.0", "scikit-learn": "1.2",
                "pandas": "2.0", "numpy": "1.24", "opencv-python-headless|opencv-python|opencv-contrib-python": "4.8"}


def _version_tuple(text: str) -> tuple[int, ...]:
    """'2.14.1+cu130' -> (2, 14, 1); '1.0.0rc1' -> (1, 0, 0): the release numbers only."""
    import re

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
    from importlib import metadata

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


# --- reading CSVs ------------------------------------------------------------------------
# pandas' default missing-value markers, kept for every column but the id column
NA_VALUES = ["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
             "NA", "NULL", "NaN", "None", "n/a", "nan", "null"]


def read_table(path: str | Path, id_col: str | None = None, text_cols: tuple | list = ()):
    """A CSV with its id column (and `text_cols`: a multi-label column, "0 3" or "None") read as
    text: '0007' stays '0007' (not 7), 'NA' stays 'NA' and a blank is ''. An unreadable file
    (not UTF-8, empty, malformed) raises naming it."""
    import pandas as pd

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
        import torch

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


# --- seeding, device, timing --------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    import torch

    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def cpu_bf16() -> bool:
    """Whether this CPU computes bf16 natively: AVX512-BF16 or AMX (Intel Cooper Lake and
    Sapphire Rapids on, AMD Zen 4 on). Older AVX-512 CPUs (the Xeons of Kaggle's CPU kernels)
    only emulate it, slower than fp32."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def precision(amp_dtype: str, device) -> tuple[object, bool]:
    """(autocast dtype or None for fp32, whether a GradScaler is needed): the one place that
    decides. On CUDA, 'auto' is bf16 where the card computes it natively (compute capability
    8.0+: A100, H100, RTX 30xx/40xx) and fp16 with a GradScaler elsewhere (T4, P100, V100:
    `torch.cuda.is_bf16_supported()` also counts emulation, which cuDNN convolutions lack).
    On a CPU, 'auto' is bf16 where it computes bf16 natively (cpu_bf16: resnet18 at 64 px
    trained at 270 img/s in fp32, 458 in bf16 + channels_last on the 2-core AMD EPYC with
    AVX512-BF16), else fp32; 'bf16' asks for it anyway. With 'fp32', or on MPS, no autocast.
    An explicit 'bf16' on an older card is an error."""
    import torch

    kind = getattr(device, "type", str(device))
    if amp_dtype == "fp32" or kind not in ("cuda", "cpu"):
        return None, False
    if kind == "cpu":
        return (torch.bfloat16 if amp_dtype == "bf16" or (amp_dtype == "auto" and cpu_bf16()) else None), False
    major, _ = torch.cuda.get_device_capability(device)
    if amp_dtype == "bf16" and major < 8:
        raise ValueError(f"config key 'amp_dtype': bf16 needs compute capability 8.0+ (this GPU, "
                         f"{torch.cuda.get_device_name(device)}, has {major}.x); use 'auto' or 'fp16'")
    if amp_dtype == "bf16" or (amp_dtype == "auto" and major >= 8):
        return torch.bfloat16, False
    return torch.float16, True


def channels_last(cfg, device) -> bool:
    """Whether the model and its batches are channels_last: as `channels_last` says, or, left
    unset, wherever autocast runs on a CUDA card with tensor cores (compute capability 7.0+:
    V100, T4, A100, H100; their convolutions want NHWC: on an H200, efficientnet_b0 at 224 px
    trains at 1,922 img/s in bf16 NCHW, below fp32's 2,051, and at 3,555 img/s in bf16
    channels_last). A P100 has none and stays NCHW."""
    import torch

    if cfg.channels_last is not None:
        return cfg.channels_last
    if precision(cfg.amp_dtype, device)[0] is None:
        return False
    if getattr(device, "type", str(device)) == "cpu":  # oneDNN's bf16 convolutions want NHWC too (1.5x -> 1.7x fp32's speed)
        return True
    return torch.cuda.get_device_capability(device)[0] >= 7


def setup_device(device) -> None:
    """Fast defaults for a CUDA card: cuDNN picks the fastest kernels for the fixed input
    size, and matmuls/convolutions use TF32 on Ampere and later (float32 ones only)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    if torch.cuda.get_device_capability(device)[0] >= 8:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def get_device(name: str = "auto"):
    """cuda if visible, else mps, else cpu (or the explicit name)."""
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


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
