"""Competition data: read and check the CSVs, resolve image paths, read images as RGB,
albumentations transforms, the Dataset, and the label encoding used for submissions."""
from __future__ import annotations

import inspect
import os
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .config import CFG
from .models import pretrained_data_config
from .utils import read_table

IMG_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif")  # tried in this order, any letter case
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

cv2.setNumThreads(0)  # DataLoader workers parallelise; OpenCV's own threads only contend
if hasattr(cv2, "setLogLevel"):
    cv2.setLogLevel(2)  # errors only: a 32-bit TIFF that OpenCV refuses is read another way, without its warning


# --- CSVs and their checks (the pre-flight report, helpers.check, runs the same ones) ---------
class DataError(ValueError):
    """Problems of the competition's data, one per line, each naming its file, row or column."""


def _rows(mask: pd.Series, limit: int = 8) -> str:
    rows = (np.flatnonzero(np.asarray(mask)) + 2).tolist()  # +2: the header is line 1, rows start at line 2
    return ", ".join(map(str, rows[:limit])) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


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


def class_count_problems(cfg: CFG, train: pd.DataFrame, path: Path) -> list[str]:
    """Classes with fewer rows than folds: stratified folds cannot put one in every fold."""
    counts = train[cfg.target_col].astype(str).value_counts()
    return [f"{path}: class {label!r} of '{cfg.target_col}' has {n} row(s), fewer than n_folds={cfg.n_folds}; "
            f"lower n_folds or merge rare classes" for label, n in counts[counts < cfg.n_folds].items()]


def id_problems(df: pd.DataFrame, id_col: str, path: Path) -> list[str]:
    """Blank ids, and ids that appear more than once (by value, with their rows)."""
    problems = []
    ids = df[id_col].astype(str)
    blank = ids.str.strip() == ""
    if blank.any():
        problems.append(f"{path}: {int(blank.sum())} blank id(s) in '{id_col}' (rows {_rows(blank)})")
    dup = ids.duplicated(keep=False) & ~blank
    if dup.any():
        groups = [f"'{value}' on rows {_rows(ids == value, 4)}" for value in list(dict.fromkeys(ids[dup]))[:5]]
        more = dup.groupby(ids).any().sum() - len(groups)
        problems.append(f"{path}: {int(dup.sum())} rows share an id in '{id_col}': " + "; ".join(groups)
                        + (f"; and {more} more ids" if more > 0 else ""))
    return problems


def train_problems(cfg: CFG, train: pd.DataFrame, path: Path) -> list[str]:
    """Every problem of train.csv's table: columns, rows, ids, the target, the groups."""
    multilabel_cols = cfg.task == "multilabel" and bool(cfg.label_cols)
    target = list(cfg.label_cols) if multilabel_cols else [cfg.target_col]
    problems = column_problems(train, path, [cfg.id_col, *target, *cfg.metadata_cols, cfg.group_col])
    if len(train) == 0:
        return problems + [f"{path}: no rows"]
    if cfg.id_col in train:
        problems += id_problems(train, cfg.id_col, path)
    if cfg.task == "multilabel":
        if all(c in train for c in target):
            problems += multilabel_problems(cfg, train, path)
    elif cfg.target_col in train:
        target = train[cfg.target_col]
        if cfg.task == "classification":
            blank = target.map(blank_label)
            if blank.any():
                problems.append(f"{path}: empty cell(s) in target column '{cfg.target_col}' (rows {_rows(blank)}); every "
                                f"training row needs its label ('NA', 'None' and 'null' are read as labels)")
            classes = get_classes(train, cfg)
            if len(classes) == 1:
                problems.append(f"{path}: target column '{cfg.target_col}' holds one class only ({classes[0]!r}): "
                                f"there is nothing to classify (is target_col the right column?)")
            problems += look_alike_problems(target, path, cfg.target_col)
            problems += class_count_problems(cfg, train[~blank], path)
        elif not pd.api.types.is_numeric_dtype(target):
            problems.append(f"{path}: regression target '{cfg.target_col}' is not numeric")
        elif target.isna().any():
            problems.append(f"{path}: NaN in target column '{cfg.target_col}' (rows {_rows(target.isna())})")
    if cfg.group_col and cfg.group_col in train:
        nan = train[cfg.group_col].isna() | (train[cfg.group_col].astype(str).str.strip() == "")
        if nan.any():
            problems.append(f"{path}: group column '{cfg.group_col}' is empty on {int(nan.sum())} row(s) (rows {_rows(nan)}); "
                            f"every row needs its group")
        groups = train[cfg.group_col].dropna().nunique()
        if groups < cfg.n_folds:
            problems.append(f"{path}: group column '{cfg.group_col}' has {groups} group(s), fewer than n_folds={cfg.n_folds}")
    return problems


def multilabel_problems(cfg: CFG, train: pd.DataFrame, path: Path) -> list[str]:
    """A multi-label target's problems: label columns that are not 0/1, labels outside
    cfg.labels, rows without a label (unless allow_empty), labels with fewer positive rows
    than folds (stratified folds cannot put one in every fold)."""
    problems = []
    if cfg.label_cols:
        values = train[list(cfg.label_cols)]
        bad = ~values.isin([0, 1]).all(axis=1)
        if bad.any():
            problems.append(f"{path}: label columns {list(cfg.label_cols)} must hold 0 or 1 (rows {_rows(bad)})")
            return problems
        clash = [c for c in cfg.label_cols if cfg.label_sep in str(c)]
        if clash:  # the labels of a row are also kept as one string, label_sep apart
            problems.append(f"{path}: label column(s) {clash[:5]} hold label_sep {cfg.label_sep!r}; set config key "
                            f"'label_sep' to a character no label name has (e.g. '|')")
    else:
        sets = label_sets(train[cfg.target_col], cfg.label_sep)
        clash = [str(label) for label in cfg.labels if cfg.label_sep in str(label)]
        if clash:  # such a label can never be read from target_col: it would be split in two
            problems.append(f"config key 'labels' has label(s) {clash[:5]} that hold label_sep {cfg.label_sep!r}, which "
                            f"separates the labels in '{cfg.target_col}': they would be read as "
                            f"{[label.split(cfg.label_sep) for label in clash[:2]]}; set 'label_sep' to what separates "
                            f"the labels in {path.name} (e.g. '|' or ',')")
            return problems
        if cfg.labels:
            known = set(map(str, cfg.labels))
            unknown = pd.Series([bool(s - known) for s in sets])
            if unknown.any():
                names = sorted(set().union(*(s - known for s in sets)))
                problems.append(f"{path}: labels {names[:8]} in '{cfg.target_col}' are not in config key 'labels' "
                                f"(rows {_rows(unknown)})")
    labels = get_classes(train, cfg)
    for key in ("label_weights", "label_pos_weight"):
        unknown = sorted(set(map(str, getattr(cfg, key))) - set(labels))
        if unknown:
            problems.append(f"config key '{key}' names label(s) {unknown[:5]} that {path.name} does not have "
                            f"(its labels: {labels[:8]}{' ...' if len(labels) > 8 else ''})")
    matrix = multilabel_matrix(cfg, train, labels)
    empty = pd.Series(matrix.sum(1) == 0)
    if empty.any() and not cfg.allow_empty:
        problems.append(f"{path}: {int(empty.sum())} row(s) have no label (rows {_rows(empty)}); "
                        f"set allow_empty: true if that is a valid answer")
    rare = [(label, int(n)) for label, n in zip(labels, matrix.sum(0)) if n < cfg.n_folds]
    for label, n in rare:
        problems.append(f"{path}: label {label!r} has {n} positive row(s), fewer than n_folds={cfg.n_folds}")
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
    """train.csv with `path` (resolved image file) and `target` (class index or float) added."""
    path = cfg.path(cfg.train_csv)
    target = list(cfg.label_cols) if cfg.task == "multilabel" and cfg.label_cols else [cfg.target_col]
    required = [cfg.id_col, *target, *cfg.metadata_cols] + ([cfg.group_col] if cfg.group_col else [])
    df = read_csv(path, required, "train CSV", cfg.id_col, cfg.label_text)
    problems = train_problems(cfg, df, path)
    if problems:
        raise DataError("\n".join(problems))
    df["path"] = resolve_paths(df[cfg.id_col], cfg.path(cfg.image_dir_train), cfg.image_ext, path)
    if cfg.task == "classification":
        classes = get_classes(df, cfg)
        df[cfg.target_col] = df[cfg.target_col].astype(str)
        df["target"] = df[cfg.target_col].map({c: i for i, c in enumerate(classes)}).astype(int)
    elif cfg.task == "multilabel":  # a 0/1 vector per row; target_col the labels as one string
        labels = get_classes(df, cfg)
        matrix = multilabel_matrix(cfg, df, labels)
        df["target"] = list(matrix)
        df[cfg.target_col] = joined_labels(matrix, labels, cfg.label_sep)  # one spelling: a blank row is "", not NaN
    else:
        df["target"] = df[cfg.target_col].astype(float)
    if cfg.debug:  # tiny data; classification keeps every class, with enough rows for the folds
        if cfg.task == "classification":
            per_class = max(cfg.n_folds, -(-cfg.debug_rows // df["target"].nunique()))
            rng = np.random.default_rng(cfg.seed)
            keep = [rng.choice(g.index, min(per_class, len(g)), replace=False) for _, g in df.groupby("target")]
            df = df.loc[np.sort(np.concatenate(keep))]
        else:
            df = df.sample(n=min(cfg.debug_rows, len(df)), random_state=cfg.seed).sort_index()
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


def get_classes(train: pd.DataFrame, cfg: CFG) -> list[str]:
    """The class labels of a classification target, as text, in sort_labels' order; the labels
    of a multi-label one (cfg.label_cols, cfg.labels, or every label train names, sorted)."""
    if cfg.task == "multilabel":
        if cfg.label_cols:
            return [str(c) for c in cfg.label_cols]
        return [str(c) for c in cfg.labels] or sort_labels(set().union(*label_sets(train[cfg.target_col], cfg.label_sep)))
    return sort_labels(str(c) for c in train[cfg.target_col].unique() if not blank_label(c))


def sort_labels(labels) -> list[str]:
    """Labels in their natural order: by value when every one is a number ('2' before '10'),
    else as text."""
    labels = sorted(set(labels))
    try:
        values = [float(label) for label in labels]
    except ValueError:
        return labels
    if not np.isfinite(values).all():
        return labels
    return [label for _, label in sorted(zip(values, labels))]


def blank_label(value) -> bool:
    """An empty cell of a text target (the only missing value a label column has)."""
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def look_alike_problems(values: pd.Series, path: Path, column: str) -> list[str]:
    """Labels that differ only in surrounding spaces or Unicode form ('a' and 'a ', 'é' composed
    or not): they would silently be two classes."""
    import unicodedata

    text = values.astype(str).reset_index(drop=True)  # rows by position, as _rows counts them
    key = text.map(lambda v: unicodedata.normalize("NFKC", v).strip())
    problems = []
    for _, spellings in text[key != ""].groupby(key[key != ""]):
        distinct = list(dict.fromkeys(spellings))
        if len(distinct) > 1:
            rows = {repr(v): _rows(text == v, 3) for v in distinct[:4]}
            problems.append(f"{path}: labels {', '.join(rows)} of '{column}' differ only in spaces or Unicode form "
                            f"({'; '.join(f'{v} on rows {r}' for v, r in rows.items())}): they would be separate classes; "
                            f"write each label one way")
    return problems




def label_sets(column: pd.Series, sep: str) -> list[set[str]]:
    """The labels of each row of a multi-label column ('cloudy primary water'; blank: none)."""
    return [set(t for t in str(v).split(sep) if t) if isinstance(v, str) or not pd.isna(v) else set() for v in column]


def multilabel_matrix(cfg: CFG, df: pd.DataFrame, labels: list) -> np.ndarray:
    """Rows x labels, 1.0 where a row has the label: from the 0/1 label_cols, or from the labels
    in target_col."""
    if cfg.label_cols:
        return df[list(cfg.label_cols)].to_numpy(dtype=float)
    return label_matrix(df[cfg.target_col], labels, cfg.label_sep)


def label_matrix(column: pd.Series, labels: list, sep: str) -> np.ndarray:
    """Rows x labels, 1.0 where a row of `column` ('cloudy primary') names the label; labels
    that are not in `labels` are left out."""
    index = {str(label): j for j, label in enumerate(labels)}
    out = np.zeros((len(column), len(labels)))
    for i, row in enumerate(label_sets(column, sep)):
        out[i, [index[label] for label in row if label in index]] = 1.0
    return out


def joined_labels(matrix: np.ndarray, labels: list, sep: str) -> list[str]:
    """Each row's labels written back as one string."""
    return [sep.join(str(labels[j]) for j in np.flatnonzero(row > 0.5)) for row in np.asarray(matrix)]


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


# --- images --------------------------------------------------------------------------------
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
    from PIL import Image, ImageOps

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
    from PIL import Image, ImageOps

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
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that turn the image by 90°
                w, h = h, w
            return {"path": str(path), "height": h, "width": w, "mode": im.mode, "format": im.format, "error": None}
    except Exception as e:  # noqa: BLE001 - an unreadable image is reported, not raised
        return {"path": str(path), "height": None, "width": None, "mode": None, "format": None,
                "error": f"{type(e).__name__}: {e}"}


def augment_preset(cfg: CFG) -> list:
    """The CPU part of cfg.augment's training augmentations ('none' | 'light' | 'medium' |
    'heavy'); the affine warp of every preset runs on the device (device_augment).

    Chosen to feed a GPU: one CPU core gives several thousand images/s at 224 px from the
    cache for light and medium, over 1,000 for heavy (`python -m helpers.bench`). The costly
    transforms have cheaper equivalents: the affine warp on the device (a bilinear warp on
    the CPU takes a third of a millisecond), hue/saturation jitter as ColorJitter
    (HueSaturationValue costs 6x more), sharpening as Sharpen (UnsharpMask: 25x), the elastic
    field smoothed with a fixed kernel and one draw for both axes (7x), Gaussian noise drawn
    at half resolution (2x).
    """
    if cfg.augment == "none":
        return []
    flips = [A.HorizontalFlip(p=0.5)] if cfg.hflip else []
    if cfg.augment == "light":
        return flips + [A.RandomBrightnessContrast(0.2, 0.2, p=0.5)]
    medium = flips + [
        A.RandomBrightnessContrast(0.25, 0.25, p=0.6),
        # HueSaturationValue(10, 20, 10): hue +-10 of 180, saturation +-20 and value +-10 of 255
        A.ColorJitter(brightness=0.08, contrast=0.0, saturation=0.2, hue=0.055, p=0.3),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15), hole_width_range=(0.05, 0.15), p=0.4),
    ]
    if cfg.augment == "medium":
        return medium
    return medium + [  # heavy: the document-classifier write-up's hard augmentation
        A.OneOf([A.GridDistortion(p=1), A.ElasticTransform(approximate=True, same_dxdy=True, p=1),
                 A.OpticalDistortion(p=1)], p=0.4),
        A.OneOf([A.GaussianBlur(p=1), A.MotionBlur(p=1), A.Sharpen(p=1)], p=0.3),
        A.GaussNoise(noise_scale_factor=0.5, p=0.2),
        A.CoarseDropout(num_holes_range=(2, 8), hole_height_range=(0.05, 0.2), hole_width_range=(0.05, 0.2), p=0.5),
    ]


class DeviceAffine:
    """Random affine warps of a batch where it already is (the GPU), before normalisation: what
    A.Affine does to each image, moved off the CPU workers. Each image is warped with
    probability p, by x and y scales, a translation (share of the side), a rotation and x and
    y shears (degrees), each drawn uniformly as A.Affine draws them, and composed as it does
    (shear @ rotation @ scale); pixels from outside are black, as A.Affine's default fill.
    Random numbers come from the device's generator, seeded every epoch (a resumed run draws
    the same warps), and nothing waits for the device (the inverse is in closed form)."""

    def __init__(self, scale: tuple, translate: tuple, rotate: tuple, shear: tuple = (0.0, 0.0), p: float = 1.0):
        self.scale, self.translate, self.rotate, self.shear, self.p = scale, translate, rotate, shear, p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        one, zero = torch.ones(n, device=dev), torch.zeros(n, device=dev)

        def draw(bounds: tuple, default: torch.Tensor) -> torch.Tensor:
            return torch.where(on, torch.empty(n, device=dev).uniform_(*bounds), default)

        on = torch.rand(n, device=dev) < self.p
        sx, sy = draw(self.scale, one), draw(self.scale, one)
        angle = draw(self.rotate, zero).deg2rad()
        a, b = draw(self.shear, zero).deg2rad().tan(), draw(self.shear, zero).deg2rad().tan()
        tx, ty = draw(self.translate, zero) * 2, draw(self.translate, zero) * 2  # grid units: a side is 2
        warped = warp_affine(x, sx, sy, angle, a, b, tx, ty)
        return torch.where(on.view(n, 1, 1, 1), warped, x)  # the images not drawn stay exactly as they were


def warp_affine(x: torch.Tensor, sx, sy, angle, a, b, tx, ty) -> torch.Tensor:
    """Warp each image of x by shear [[1, -a], [-b, 1]] @ rotation (angle, radians,
    counter-clockwise) @ diag(sx, sy), then a shift (tx, ty) in grid units (a side is 2): the
    composition A.Affine uses. affine_grid wants the inverse, here in closed form:
    diag(1/sx, 1/sy) @ rotation.T @ shear^-1."""
    n = x.shape[0]
    cos, sin, det = torch.cos(angle), torch.sin(angle), 1 - a * b
    rt_sh = torch.stack([torch.stack([cos - sin * b, cos * a - sin], 1),
                         torch.stack([sin + cos * b, sin * a + cos], 1)], 1) / det.view(n, 1, 1)
    inverse = rt_sh / torch.stack([sx, sy], 1).view(n, 2, 1)
    shift = -(inverse @ torch.stack([tx, ty], 1).unsqueeze(2))
    theta = torch.cat([inverse, shift], 2).to(x.dtype)
    return F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), mode="bilinear",
                         padding_mode="zeros", align_corners=False)


def device_augment(cfg: CFG) -> DeviceAffine | None:
    """The affine warp of cfg.augment's preset, applied to training batches on the device
    (none for 'none' and for a custom augment_pipeline, which runs whole on the CPU)."""
    if cfg.augment_pipeline or cfg.augment == "none":
        return None
    if cfg.augment == "light":
        return DeviceAffine(scale=(0.9, 1.1), translate=(-0.06, 0.06), rotate=(-10, 10), p=0.7)
    return DeviceAffine(scale=(0.8, 1.2), translate=(-0.1, 0.1), rotate=(-20, 20), shear=(-5, 5), p=0.8)


def _with_default_p(node):
    """Fill a missing `p` with the transform class's own default (A.Resize: 1.0), as in Python;
    albumentations' from_dict would use 0.5 and skip a Resize half of the time."""
    if isinstance(node, list):
        return [_with_default_p(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _with_default_p(v) for k, v in node.items()}
    name = node.get("__class_fullname__", "")
    cls = getattr(A, name.rsplit(".", 1)[-1], None) if name else None
    if cls is not None and "p" not in node:
        param = inspect.signature(cls).parameters.get("p")
        if param is not None and param.default is not inspect.Parameter.empty:
            node["p"] = param.default
    return node


def _pipeline(cfg: CFG) -> list | None:
    """The transforms of cfg.augment_pipeline (albumentations' own serialisation), if any."""
    if not cfg.augment_pipeline:
        return None
    return list(A.from_dict(_with_default_p(cfg.augment_pipeline)).transforms)


def transform_problems(cfg: CFG) -> list[str]:
    """What is wrong with cfg.augment_pipeline (an unknown transform, a bad argument), found
    before training instead of at its first batch."""
    if not cfg.augment_pipeline:
        return []
    try:
        create_transforms(cfg, train=True)
    except Exception as e:  # noqa: BLE001 - albumentations raises many kinds; all are reported
        return [f"config key 'augment_pipeline' cannot be built: {type(e).__name__}: {e}"]
    return []


def input_stats(cfg: CFG) -> tuple[tuple, tuple, float]:
    """(mean, std, max_pixel_value) the model's input is normalised with: the pipeline's final
    Normalize when it has one; else, for a pretrained timm model, its own pretrained_cfg
    (a ViT-augreg, CLIP, EVA or TF-ported EfficientNet-Lite has other values than ImageNet);
    else ImageNet's (the documented default of the hybrid model and of pretrained: false)."""
    ops = _pipeline(cfg) or []
    if ops and isinstance(ops[-1], A.Normalize):
        n = ops[-1]
        return tuple(map(float, np.atleast_1d(n.mean))), tuple(map(float, np.atleast_1d(n.std))), float(n.max_pixel_value)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    data = pretrained_data_config(cfg)
    if data is not None:
        mean, std = tuple(map(float, data["mean"])), tuple(map(float, data["std"]))
    if cfg.in_chans == 1:  # one channel: the mean of the three
        return (float(np.mean(mean)),), (float(np.mean(std)),), 255.0
    return mean, std, 255.0


INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST,
                  "lanczos": cv2.INTER_LANCZOS4, "area": cv2.INTER_AREA}


def create_resize(cfg: CFG) -> A.Resize:
    """Images to img_size x img_size: shrunk with area interpolation (no aliasing), enlarged
    with the pretrained model's own interpolation (bilinear by default). The cache and the
    loaders use this same transform, so they see the same pixels."""
    data = pretrained_data_config(cfg)
    interpolation = INTERPOLATIONS.get(data["interpolation"], cv2.INTER_LINEAR) if data else cv2.INTER_LINEAR
    if "area_for_downscale" not in inspect.signature(A.Resize).parameters:  # albumentations < 2.0.7
        return A.Resize(cfg.img_size, cfg.img_size, interpolation=interpolation)
    return A.Resize(cfg.img_size, cfg.img_size, interpolation=interpolation, area_for_downscale="image")


def create_transforms(cfg: CFG, train: bool) -> A.Compose:
    """Training: cfg.augment_pipeline when given, else Resize + the augment preset.
    Validation/test: Resize. Both end with ToTensorV2 and yield uint8 tensors: normalisation
    (input_stats) happens on the device, in `InputNorm`, so workers send 4x fewer bytes.
    A pipeline whose Normalize is not last keeps it, and yields float tensors."""
    ops = _pipeline(cfg) if train else None
    if ops is None:
        ops = [create_resize(cfg), *(augment_preset(cfg) if train else [])]
    if ops and isinstance(ops[-1], A.Normalize):
        ops = ops[:-1]
    if not any(isinstance(t, A.ToTensorV2) for t in ops):
        ops.append(A.ToTensorV2())
    return A.Compose(ops)


class InputNorm:
    """A loader's batch -> the model's input on the device: moved without blocking (from pinned
    memory), uint8 normalised with constants built once on the device (no host-device copy
    per step), warped by the device-side augmentation of training batches, in the configured
    memory format. Float batches are only moved (and warped)."""

    def __init__(self, stats: tuple[tuple, tuple, float], device, channels_last: bool = False,
                 augment: DeviceAffine | None = None):
        self.augment = augment
        mean, std, max_pixel = stats
        self.device = torch.device(device)
        self.mean = (torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * max_pixel).to(self.device)
        self.std = (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * max_pixel).to(self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float()
            if self.augment is not None:  # before normalising: outside pixels are black, as on the CPU
                images = self.augment(images)
            images = (images - self.mean) / self.std
        elif self.augment is not None:
            images = self.augment(images)
        return images.contiguous(memory_format=self.memory_format)


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
