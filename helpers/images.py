"""Image files: where an id's image is (inside its folder, never outside), and reading any
image as 8-bit RGB or gray (16-bit, float TIFFs, palette, RGBA, CMYK, EXIF-rotated, GIF),
thumbnails for looking at, and headers for the EDA. No torch here: the runner's freshness
checks list images without it."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image, ImageOps

IMG_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")  # tried in this order, any letter case

cv2.setNumThreads(0)  # DataLoader workers parallelise; OpenCV's own threads only contend
if hasattr(cv2, "setLogLevel"):
    cv2.setLogLevel(2)  # errors only: a 32-bit TIFF that OpenCV refuses is read another way, without its warning


def outside_folder(value: str) -> bool:
    """Whether an id, read as a path, leaves its image folder: an absolute path ('/etc/x',
    'C:\\x'), a '..' part ('../secret/x', 'a/../../x'), or a NUL byte. Ids name files inside
    the folder (a sub-folder is fine); a link the user put there is followed."""
    parts = value.replace("\\", "/").split("/")
    return (value.startswith(("/", "\\", "~")) or (len(value) > 1 and value[1] == ":" and value[0].isalpha())
            or ".." in parts or "\0" in value)


def locate_images(ids: pd.Series, image_dir: Path, image_ext: str) -> list[tuple[str | None, list[str]]]:
    """For every id: (the image file found, or None; the names tried). The id may name its file
    whole, with any extension ('x.gif') or a sub-folder ('n01440764/x.JPEG'); else
    <id><image_ext>, or <id> with each of IMG_EXTS when image_ext is ''. An extension matches in
    any letter case (a.JPG). An id that leaves the folder (outside_folder) finds nothing and
    tries nothing: no file outside image_dir is ever read."""
    def ext_folded(name: str) -> str:  # 'a.JPG' -> 'a.jpg': only the extension loses its case
        stem, ext = os.path.splitext(name)
        return stem + ext.lower()

    names = os.listdir(image_dir)
    exact, folded = set(names), {}
    for name in names:
        folded.setdefault(ext_folded(name), name)

    def find(name: str) -> str | None:
        if outside_folder(name):
            return None
        if "/" in name:
            return name if (image_dir / name).is_file() else None
        found = name if name in exact else folded.get(ext_folded(name))
        return found if found and (found != name or (image_dir / found).is_file() or os.path.islink(image_dir / found)) else None

    out = []
    for value in ids.astype(str):
        if outside_folder(value):
            out.append((None, []))
            continue
        if image_ext:
            candidates = [value if value.lower().endswith(image_ext.lower()) else value + image_ext]
        else:
            candidates = [value] + [value + e for e in IMG_EXTS]
        found = next((f for f in map(find, candidates) if f), None)
        out.append((str(image_dir / found) if found else None, candidates))
    return out


def resolve_paths(ids: pd.Series, image_dir: Path, image_ext: str, csv_path: Path) -> list[str]:
    """Image file of every id (see locate_images); all missing files are reported at once,
    each with its CSV row and id."""
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir} (images for {csv_path.name})")
    located = locate_images(ids, image_dir, image_ext)
    missing = [line for _, line in missing_images(ids, located)]
    if missing:
        shown = "\n  ".join(missing[:10]) + (f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise FileNotFoundError(f"{csv_path}: {len(missing)} image(s) not found in {image_dir}:\n  {shown}")
    return [path for path, _ in located]


def missing_images(ids: pd.Series, located: list[tuple[str | None, list[str]]]) -> list[tuple[int, str]]:
    """(row index, 'row R id=V (tried ...)') of every id whose image was not found, or that
    leaves the image folder."""
    return [(row, f"row {row + 2} id={value} " + (f"(tried {', '.join(tried)})" if tried else
                                                   "leaves the image folder ('..' or an absolute path): an id names a file "
                                                   "inside it, and nothing outside is read"))
            for row, (value, (path, tried)) in enumerate(zip(ids.astype(str), located)) if path is None]


def read_image(path: str, in_chans: int = 3) -> np.ndarray:
    """An image as uint8 HxWx3 RGB (or HxWx1 gray), whatever its mode: gray, RGBA, palette,
    16-bit, CMYK, 32-bit float (values in [0, 1] are scaled by 255, others clipped to
    [0, 255]); EXIF rotation applied. An unreadable file raises naming it."""
    flag = cv2.IMREAD_GRAYSCALE if in_chans == 1 else cv2.IMREAD_COLOR
    img = cv2.imread(str(path), flag)
    if img is None:  # what OpenCV's 8-bit readers refuse (32-bit samples): read as stored, then convert
        img = _as_uint8(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), in_chans)
    if img is None:  # formats OpenCV does not read (GIF, ICO, ...): PIL
        img = _pil_read(path, in_chans)
    if img is None:
        reason = "file not found" if not os.path.exists(path) else "empty file" if os.path.getsize(path) == 0 else "not a readable image"
        raise ValueError(f"cannot read image {path}: {reason}")
    if in_chans == 1:
        return img[:, :, None]
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _pil_read(path: str, in_chans: int) -> np.ndarray | None:
    """An image through PIL (EXIF rotation applied) as 8-bit gray or BGR, or None."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return _as_uint8(np.asarray(im), in_chans)
            return np.asarray(im.convert("L")) if in_chans == 1 else cv2.cvtColor(np.asarray(im.convert("RGB")), cv2.COLOR_RGB2BGR)
    except Exception:  # noqa: BLE001 - the caller says the file is not a readable image
        return None


def _as_uint8(img: np.ndarray | None, in_chans: int) -> np.ndarray | None:
    """An image OpenCV read as stored (any depth, 1-4 channels, BGR order) as 8-bit gray or BGR."""
    if img is None or img.ndim not in (2, 3):
        return None
    if img.dtype.kind == "f":
        img = np.nan_to_num(img.astype(np.float32))
        img = np.clip(img * 255.0 if img.max() <= 1.0 else img, 0, 255).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = (img.astype(np.float64) * 255.0 / np.iinfo(img.dtype).max).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    if in_chans == 1:
        return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR) if img.ndim == 2 or img.shape[2] == 1 else img


def read_thumbnail(path: str, max_side: int = 256) -> np.ndarray:
    """A small RGB copy of an image for looking at (grids): JPEGs are decoded at reduced size
    (PIL's draft mode), so a 12000 px photo costs a few MB, not gigabytes. 16-bit and float
    images go through read_image. An unreadable file raises ValueError naming it."""
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "L", "RGBA", "P", "CMYK", "LA", "1"):
                im.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2 .. 1/8 scale
                im = ImageOps.exif_transpose(im)
                im.thumbnail((max_side, max_side))
                return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - read_image below names the file and the reason
        if not isinstance(e, (OSError, ValueError, SyntaxError)):
            raise
    img = read_image(path)
    scale = max_side / max(img.shape[:2])
    if scale < 1:
        img = cv2.resize(img, (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))),
                         interpolation=cv2.INTER_AREA)
    return img


def image_header(path: str) -> dict:
    """Size, mode and format from an image's header (no decoding; EXIF rotation applied to the
    size), or the reason it cannot be read: for the EDA's look at a competition's images."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that turn the image by 90°
                w, h = h, w
            return {"path": str(path), "height": h, "width": w, "mode": im.mode, "format": im.format, "error": None}
    except Exception as e:  # noqa: BLE001 - an unreadable image is reported, not raised
        return {"path": str(path), "height": None, "width": None, "mode": None, "format": None,
                "error": f"{type(e).__name__}: {e}"}
