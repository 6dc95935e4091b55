"""Reliability: every image mode loads the same way, a fold killed with SIGKILL resumes and
ends where an uninterrupted run ends, two runs with one seed give identical OOF, and the
submission is validated before it is written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from helpers.config import CFG, ROOT
from helpers.images import read_image
from helpers.submission import check_submission, create_submission, write_submission
from helpers.tools.demo import write_digits

REF = np.zeros((40, 60, 3), np.uint8)
REF[..., 0] = np.linspace(0, 255, 60)[None]
REF[..., 1] = np.linspace(0, 255, 40)[:, None]
REF[..., 2] = 100


def test_grayscale_png(tmp_path):
    gray = REF[..., 1]
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    img = read_image(str(tmp_path / "g.png"))
    assert img.shape == (40, 60, 3) and img.dtype == np.uint8
    assert (img == gray[..., None]).all()


def test_rgba_png_drops_alpha(tmp_path):
    Image.fromarray(np.dstack([REF, np.full((40, 60), 128, np.uint8)])).save(tmp_path / "a.png")
    assert (read_image(str(tmp_path / "a.png")) == REF).all()


def test_palette_png(tmp_path):
    Image.fromarray(REF).quantize(64).save(tmp_path / "p.png")
    expected = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    assert (read_image(str(tmp_path / "p.png")) == expected).all()


def test_16bit_png_scaled_to_8bit(tmp_path):
    g16 = np.linspace(0, 65535, 60)[None].repeat(40, 0).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "s.png"), g16)
    img = read_image(str(tmp_path / "s.png"))
    assert img.dtype == np.uint8 and (img[..., 0] == (g16 >> 8)).all()


def test_cmyk_jpeg(tmp_path):
    Image.fromarray(REF).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    img = read_image(str(tmp_path / "c.jpg"))
    assert img.shape == (40, 60, 3)
    assert np.abs(img.astype(int) - REF).mean() < 3  # colours survive, channel order is RGB


def test_exif_rotated_jpeg(tmp_path):
    im = Image.fromarray(REF)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "e.jpg", exif=exif, quality=95)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "e.jpg")).convert("RGB"))
    img = read_image(str(tmp_path / "e.jpg"))
    assert img.shape == (60, 40, 3) and np.abs(img.astype(int) - expected).mean() < 1


def test_image_header_reports_size_mode_and_unreadable_files(tmp_path):
    """What 00_eda shows of each image: its displayed size and mode, or why it cannot be read."""
    from helpers.images import image_header

    Image.fromarray(REF).convert("CMYK").save(tmp_path / "c.jpg")
    cv2.imwrite(str(tmp_path / "s.png"), np.zeros((40, 60), np.uint16))
    im = Image.fromarray(REF)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "e.jpg", exif=exif)
    (tmp_path / "bad.jpg").write_bytes(b"<html>404</html>")
    rows = {Path(p).name: image_header(str(tmp_path / p)) for p in ("c.jpg", "s.png", "e.jpg", "bad.jpg")}
    assert (rows["c.jpg"]["height"], rows["c.jpg"]["width"], rows["c.jpg"]["mode"]) == (40, 60, "CMYK")
    assert rows["s.png"]["mode"].startswith("I") and rows["s.png"]["error"] is None
    assert (rows["e.jpg"]["height"], rows["e.jpg"]["width"]) == (60, 40)  # as read_image returns it
    assert rows["bad.jpg"]["height"] is None and "UnidentifiedImageError" in rows["bad.jpg"]["error"]


def test_image_grid_names_an_unreadable_file_instead_of_failing(tmp_path):
    from helpers.plots import image_grid

    Image.fromarray(REF).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"")
    fig = image_grid([str(tmp_path / "ok.png"), str(tmp_path / "bad.png")], ["a", "b"], tmp_path / "grid.png")
    assert (tmp_path / "grid.png").exists()
    assert "bad.png\nb" in [ax.get_title() for ax in fig.axes]


# --- faults and reproducibility ---------------------------------------------------------
TRAIN_SCRIPT = """
import sys, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from helpers.config import CFG
from helpers.data import read_train
from helpers.folds import get_folds
from helpers.train import train_fold
from helpers.utils import get_logger
cfg = CFG(competition_dir={comp!r}, models_dir={models!r}, experiment="kill", n_folds=2, epochs=6, patience=10,
          img_size=32, batch_size=16, num_workers=0, arch="hybrid", model_kwargs=dict(patch_size=8, emb_dim=16, num_heads=2))
train_fold(cfg, get_folds(cfg, read_train(cfg)), 0, None, get_logger("kaggle"))
"""


def _script(tmp_path: Path, comp: Path, models: Path) -> list[str]:
    code = TRAIN_SCRIPT.format(root=str(ROOT), comp=str(comp), models=str(models))
    return [sys.executable, "-c", code]


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("kill") / "comp", size=16, n=240)


def test_sigkill_mid_epoch_resumes_to_the_same_result(comp, tmp_path):
    clean, killed, again = tmp_path / "clean", tmp_path / "killed", tmp_path / "again"
    subprocess.run(_script(tmp_path, comp, clean), check=True, capture_output=True)
    subprocess.run(_script(tmp_path, comp, again), check=True, capture_output=True)
    oof_clean = pd.read_csv(clean / "kill" / "oof_fold0.csv")
    # reproducibility: the same seed on CPU gives identical OOF predictions
    pd.testing.assert_frame_equal(oof_clean, pd.read_csv(again / "kill" / "oof_fold0.csv"))

    metrics = killed / "kill" / "fold0" / "metrics.jsonl"
    proc = subprocess.Popen(_script(tmp_path, comp, killed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-epoch 3 (or later), never between files
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(metrics.read_text().splitlines())
    assert 2 <= done_before < 6 and not (killed / "kill" / "oof_fold0.csv").exists()

    out = subprocess.run(_script(tmp_path, comp, killed), check=True, capture_output=True, text=True).stdout
    assert "resuming from" in out and f"after epoch {done_before}" in out
    pd.testing.assert_frame_equal(oof_clean, pd.read_csv(killed / "kill" / "oof_fold0.csv"))
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5, 6]

    # a finished fold is skipped unless asked to retrain
    out = subprocess.run(_script(tmp_path, comp, killed), check=True, capture_output=True, text=True).stdout
    assert "up to date" in out


# --- the submission is validated before it is written -------------------------------------
@pytest.fixture
def sub_cfg(tmp_path):
    comp = tmp_path / "comp"
    comp.mkdir()
    pd.DataFrame({"id": ["a", "b", "c"], "label": ["cat", "cat", "cat"]}).to_csv(comp / "sample_submission.csv", index=False)
    return CFG(competition_dir=str(comp), submissions_dir=str(tmp_path / "subs"))


def test_valid_submission_is_written(sub_cfg, tmp_path):
    sub = create_submission(sub_cfg, pd.Series(["c", "a", "b"]), np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), ["cat", "dog"])
    assert sub["label"].tolist() == ["dog", "cat", "cat"]
    paths = write_submission(sub_cfg, sub, ["cat", "dog"])
    assert paths[0].name == "submission.csv" and paths[1].name.startswith("ensemble_hill_")
    assert pd.read_csv(paths[0]).equals(sub) and pd.read_csv(paths[1]).equals(sub)


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s.iloc[::-1].reset_index(drop=True), "ids differ"),
    (lambda s: s.iloc[:2], "ids differ"),
    (lambda s: s.rename(columns={"label": "class"}), "columns"),
    (lambda s: s.assign(label=["cat", None, "dog"]), "NaN in column(s) ['label']"),
    (lambda s: s.assign(label=["cat", "cow", "dog"]), "not among the training classes: ['cow']"),
])
def test_invalid_submission_is_refused(sub_cfg, corrupt, message):
    good = pd.DataFrame({"id": ["a", "b", "c"], "label": ["cat", "dog", "dog"]})
    check_submission(sub_cfg, good, ["cat", "dog"])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        write_submission(sub_cfg, corrupt(good), ["cat", "dog"])
    assert not (Path(sub_cfg.submissions_dir) / "submission.csv").exists()
