"""The decoded-image cache: images decoded and resized to img_size once, kept on disk as a
memory-mapped uint8 array [N, img_size, img_size, C], so later epochs and folds skip decoding.

A cache is keyed by its source files (path, size, mtime) and the image size and channels; a
change of any makes a new one. It is filled through a temp file and a rename, so a killed
fill never leaves a cache that looks complete, and the next build removes what it left. It is skipped (with a log line) when it would
not fit on disk.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import albumentations as A
import numpy as np
from tqdm import tqdm

from . import artifacts, freshness
from .config import CFG
from .images import read_image
from .transforms import create_resize
from .utils import atomic_write_text


class ImageCache:
    """Rows of a memory-mapped uint8 image array; picklable for DataLoader workers (each opens
    the map itself)."""

    def __init__(self, file: Path, paths: list[str], shape: tuple[int, ...]):
        self.file, self.shape = Path(file), tuple(shape)
        self.index = {p: i for i, p in enumerate(paths)}
        self._array = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.memmap(self.file, dtype=np.uint8, mode="r", shape=self.shape)
        return self._array

    def rows(self, paths: list[str]) -> np.ndarray:
        """Cache rows of these image files (each must be in the cache)."""
        return np.array([self.index[p] for p in paths], dtype=np.int64)

    def image(self, row: int) -> np.ndarray:
        return np.array(self.array[row])  # a writable copy: transforms may work in place


def resize_image(path: str, resize: A.Resize, in_chans: int) -> np.ndarray:
    """Decoded and resized by the loaders' own Resize (helpers.data.create_resize): cached and
    uncached batches, and so training and inference, see the same pixels."""
    out = resize(image=read_image(path, in_chans))["image"]
    return out.reshape(resize.height, resize.width, in_chans)


def remove_orphans(root: Path, logger: logging.Logger) -> None:
    """Delete the half-built caches of processes that died building them (a SIGKILL leaves a
    full-size file no one would ever remove)."""
    for tmp in root.glob(".images_*.tmp"):
        try:
            pid = int(tmp.suffixes[-2].lstrip("."))
            os.kill(pid, 0)  # raises when no such process is alive
        except ProcessLookupError:
            size = tmp.stat().st_size
            tmp.unlink(missing_ok=True)
            logger.info(f"image cache: removed {tmp.name} ({size / 2**20:.0f} MiB) left by a killed build")
        except (ValueError, IndexError, PermissionError, FileNotFoundError):
            continue  # not ours, or a live process of another user


def create_cache(cfg: CFG, paths: list[str], logger: logging.Logger | None = None, workers: int | None = None) -> ImageCache | None:
    """The cache of these images at cfg.img_size (built on first use); None when cfg.cache is
    off or the cache would not fit on disk."""
    if not cfg.cache:
        return None
    logger = logger or logging.getLogger("kaggle")
    paths = list(dict.fromkeys(paths))  # unique, order kept
    shape = (len(paths), cfg.img_size, cfg.img_size, cfg.in_chans)
    root = artifacts.cache_dir(cfg)
    root.mkdir(parents=True, exist_ok=True)
    resize = create_resize(cfg)
    key = f"{freshness.paths_digest(paths)}_{cfg.img_size}_{cfg.in_chans}_{resize.interpolation}"
    file, meta = root / f"images_{key}.u8", root / f"images_{key}.json"
    if file.exists() and meta.exists():
        return ImageCache(file, paths, shape)
    remove_orphans(root, logger)
    need = int(np.prod(shape))
    free = shutil.disk_usage(root).free
    if need * 1.1 + 2**30 > free:
        logger.info(f"image cache off: it needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free in {root}")
        return None
    tmp = root / f".images_{key}.{os.getpid()}.tmp"  # the builder's pid: a later build knows a dead one's file
    try:
        out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
        with ThreadPoolExecutor(max_workers=workers or max(os.cpu_count() or 1, 1)) as pool:
            images = pool.map(lambda p: resize_image(p, resize, cfg.in_chans), paths)
            for i, img in enumerate(tqdm(images, total=len(paths), desc=f"caching images at {cfg.img_size}px", mininterval=1.0)):
                out[i] = img
        out.flush()
        del out
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(meta, json.dumps({"shape": shape, "source": str(Path(paths[0]).parent) if paths else ""}))
    logger.info(f"image cache: {len(paths)} images at {cfg.img_size}px in {file} ({need / 2**20:.0f} MiB)")
    return ImageCache(file, paths, shape)
