"""The built-in demo competitions, made from scikit-learn's bundled handwritten digits.

    python -m helpers.demo [--out inputs/digits] [--size 64]
    python -m helpers.demo --multilabel [--out inputs/digits_multilabel]

The first writes train.csv (id, label), test.csv (id), sample_submission.csv, train/ and test/
PNG images (upscaled, RGB) and a held-back solution.csv with the test labels. The same builder
makes the tiny competitions of the tests (string labels, a metadata column). The second is a
multi-label competition: each image a 2x2 grid of digit cells (some empty), labelled with the
digits it shows ("one seven"), like a pipe image with several defects.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from ..config import ROOT
from ..utils import atomic_to_csv

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_digits(out_dir: str | Path, size: int = 64, n: int | None = None, test_size: float = 0.2,
                 string_labels: bool = False, metadata: bool = False, seed: int = 0) -> Path:
    """Write a digits competition to out_dir (n rows in all; None = all 1797)."""
    out = Path(out_dir)
    digits = load_digits()
    images, labels = digits.images, digits.target
    if n is not None:
        keep, _ = train_test_split(np.arange(len(labels)), train_size=n, stratify=labels, random_state=seed)
        images, labels = images[np.sort(keep)], labels[np.sort(keep)]
    ids = np.array([f"img_{i:05d}" for i in range(len(labels))])
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        (out / split).mkdir(parents=True, exist_ok=True)
        for i in idx:
            gray = (images[i] * (255.0 / 16.0)).astype(np.uint8)
            big = cv2.resize(gray, (size, size), interpolation=cv2.INTER_CUBIC)
            cv2.imwrite(str(out / split / f"{ids[i]}.png"), cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    label_of = (lambda y: NAMES[y]) if string_labels else (lambda y: int(y))
    train = pd.DataFrame({"id": ids[train_idx], "label": [label_of(y) for y in labels[train_idx]]})
    test = pd.DataFrame({"id": ids[test_idx]})
    if metadata:  # a tabular column that carries signal: the share of ink in the image
        ink = images.reshape(len(images), -1).mean(1) / 16.0
        train["ink"], test["ink"] = ink[train_idx].round(4), ink[test_idx].round(4)
    solution = pd.DataFrame({"id": ids[test_idx], "label": [label_of(y) for y in labels[test_idx]]})
    sample = pd.DataFrame({"id": ids[test_idx], "label": label_of(0)})
    for name, df in (("train", train), ("test", test), ("sample_submission", sample), ("solution", solution)):
        atomic_to_csv(df, out / f"{name}.csv")
    return out


def write_multilabel_digits(out_dir: str | Path, n: int = 1800, size: int = 64, test_size: float = 0.2,
                            empty_cell: float = 0.45, seed: int = 0, n_labels: int = 10) -> Path:
    """Write a multi-label competition: n images, each a 2x2 grid of digit cells (a cell is
    empty with probability `empty_cell`), labelled with the names of the digits shown,
    space-separated (an image may show none); the digits are 0..n_labels-1. Train and test
    images use different digit samples."""
    out = Path(out_dir)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    kept = np.flatnonzero(digits.target < n_labels)
    pool_train, pool_test = train_test_split(kept, test_size=0.3, stratify=digits.target[kept], random_state=seed)
    n_test = int(round(n * test_size))
    rows = {"train": [], "test": []}
    cell = size // 2
    for i in range(n):
        split = "test" if i >= n - n_test else "train"
        pool = pool_test if split == "test" else pool_train
        canvas = np.zeros((size, size), np.uint8)
        present = set()
        for r in range(2):
            for c in range(2):
                if rng.random() < empty_cell:
                    continue
                k = int(rng.choice(pool))
                canvas[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = cv2.resize(
                    (digits.images[k] * (255.0 / 16.0)).astype(np.uint8), (cell, cell), interpolation=cv2.INTER_CUBIC)
                present.add(NAMES[digits.target[k]])
        image_id = f"ml_{i:05d}"
        (out / split).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / split / f"{image_id}.png"), cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR))
        rows[split].append({"id": image_id, "labels": " ".join(sorted(present, key=NAMES.index))})
    train, solution = pd.DataFrame(rows["train"]), pd.DataFrame(rows["test"])
    for name, df in (("train", train), ("test", solution[["id"]]), ("solution", solution),
                     ("sample_submission", solution[["id"]].assign(labels="zero"))):
        atomic_to_csv(df, out / f"{name}.csv")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "inputs" / "digits"), help="competition folder to write")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--multilabel", action="store_true", help="the multi-label demo (inputs/digits_multilabel)")
    args = parser.parse_args()
    if args.multilabel:
        out = write_multilabel_digits(args.out if args.out != parser.get_default("out") else ROOT / "inputs" / "digits_multilabel")
        print(f"multi-label demo written to {out}: {len(pd.read_csv(out / 'train.csv'))} train, "
              f"{len(pd.read_csv(out / 'test.csv'))} test images")
        return
    out = write_digits(args.out, size=args.size)
    print(f"demo competition written to {out}: {len(pd.read_csv(out / 'train.csv'))} train, "
          f"{len(pd.read_csv(out / 'test.csv'))} test images")


if __name__ == "__main__":
    main()
