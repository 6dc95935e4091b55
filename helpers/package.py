"""Package an experiment for an internet-off Kaggle kernel.

    python -m helpers.package models/<exp> OUT

writes OUT/ ready to upload as a Kaggle dataset: helpers/ (this package), model/ (every fold's
best.pt, each carrying the config it was trained with) and inference.ipynb, a notebook that
reads the competition from /kaggle/input, loads no weights from the internet (they are in
model/) and writes /kaggle/working/submission.csv in sample_submission's shape.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .artifacts import under_root
from .config import ROOT

TEMPLATE = ROOT / "notebooks" / "kaggle_inference.ipynb"


def package(exp_dir: str | Path, out: str | Path) -> Path:
    """Copy helpers, the fold checkpoints of exp_dir and the inference notebook."""
    exp_dir, out = Path(exp_dir), Path(out)
    if not exp_dir.is_absolute() and not exp_dir.exists():
        exp_dir = under_root(str(exp_dir))
    ckpts = sorted(exp_dir.glob("fold*/best.pt"))
    if not ckpts:
        raise FileNotFoundError(f"{exp_dir}: no fold*/best.pt (train the experiment first)")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(ROOT / "helpers", out / "helpers", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (out / "model").mkdir(parents=True)
    for ckpt in ckpts:
        (out / "model" / ckpt.parent.name).mkdir()
        shutil.copy2(ckpt, out / "model" / ckpt.parent.name / "best.pt")
    shutil.copy2(TEMPLATE, out / "inference.ipynb")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20
    print(f"packaged {exp_dir.name} ({len(ckpts)} folds, {size:.0f} MiB) in {out}: upload it as a Kaggle dataset, "
          f"add it and the competition to a notebook, and run inference.ipynb")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="models/<experiment>")
    parser.add_argument("out", help="output folder (replaced)")
    args = parser.parse_args(argv)
    package(args.experiment, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
