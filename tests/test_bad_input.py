"""Bad input, round two: each case a new user would make gets a clear error naming the file,
row, column or key before any training, or the right result where it is not an error."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from helpers import artifacts, check
from helpers.cache import create_cache
from helpers.config import CFG, load_cfg
from helpers.data import DataError, read_test, read_train
from helpers.folds import get_folds
from helpers.images import read_image, read_thumbnail
from helpers.submission import create_submission, write_submission
from helpers.tools.demo import write_digits


@pytest.fixture
def comp(tmp_path):
    return write_digits(tmp_path / "comp", size=16, n=60, string_labels=True)


def cfg_for(comp, tmp_path, **kw) -> CFG:
    return CFG(competition_dir=str(comp), models_dir=str(tmp_path / "models"), submissions_dir=str(tmp_path / "subs"),
               cache_dir=str(tmp_path / "cache"), n_folds=2, **{"pretrained": False, **kw})


def rename_ids(comp: Path, new_id) -> None:
    """Give every image (train and test) a new id, in the CSVs and on disk."""
    for split, csvs in (("train", ["train.csv"]), ("test", ["test.csv", "sample_submission.csv", "solution.csv"])):
        frames = {name: pd.read_csv(comp / name, dtype={"id": str}) for name in csvs}
        mapping = {old: new_id(i, split) for i, old in enumerate(frames[csvs[0]]["id"])}
        for old, new in mapping.items():
            (comp / split / f"{old}.png").rename(comp / split / f"{new}.png")
        for name, df in frames.items():
            df.assign(id=df["id"].map(mapping)).to_csv(comp / name, index=False)


# --- 1. ids are text --------------------------------------------------------------------------
def test_zero_padded_ids_stay_text_through_folds_and_submission(comp, tmp_path):
    rename_ids(comp, lambda i, split: f"{i:04d}" if split == "train" else f"{9000 + i:05d}")
    cfg = cfg_for(comp, tmp_path)
    train, test = read_train(cfg), read_test(cfg)
    assert train["id"].iloc[:3].tolist() == ["0000", "0001", "0002"]  # not 0, 1, 2: every image is found
    folds = get_folds(cfg, train)
    assert get_folds(cfg, train)["id"].tolist() == folds["id"].tolist()
    assert artifacts.read_folds(cfg)["id"].iloc[0] == "0000"
    classes = sorted(train["label"].unique())
    sub = create_submission(cfg, test["id"], np.eye(len(classes))[np.arange(len(test)) % len(classes)], classes)
    path = write_submission(cfg, sub, classes)[0]
    assert path.read_text().splitlines()[1].startswith("09000,")  # the zeros survive in the file


def test_blank_and_repeated_ids_are_named_with_their_rows(comp, tmp_path):
    train = pd.read_csv(comp / "train.csv", dtype={"id": str})
    train.loc[3, "id"] = ""
    train.loc[[5, 9], "id"] = train.loc[7, "id"]
    train.to_csv(comp / "train.csv", index=False)
    problems = "\n".join(check.check(cfg_for(comp, tmp_path), images=False))
    assert "1 blank id(s) in 'id' (rows 5)" in problems  # a crash (AttributeError) before
    assert f"rows share an id in 'id': '{train.loc[7, 'id']}' on rows 7, 9, 11" in problems
    with pytest.raises(DataError, match="blank id"):
        read_train(cfg_for(comp, tmp_path))


# --- 2. a sample submission with one probability column per class -----------------------------
def write_probability_sample(comp, columns):
    test = pd.read_csv(comp / "test.csv", dtype={"id": str})
    sample = pd.DataFrame({"id": test["id"], **{c: 0.1 for c in columns}})
    sample.to_csv(comp / "sample_submission.csv", index=False)


def test_probability_columns_get_probabilities(comp, tmp_path):
    classes = sorted(pd.read_csv(comp / "train.csv")["label"].unique())
    write_probability_sample(comp, classes[::-1])  # another order than the classes'
    cfg = cfg_for(comp, tmp_path)
    test = read_test(cfg)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(classes)), len(test))
    sub = create_submission(cfg, test["id"], probs, classes)
    np.testing.assert_allclose(sub[classes].to_numpy(), probs)
    write_submission(cfg, sub, classes)


def test_probability_columns_that_are_not_the_classes_are_refused_naming_them(comp, tmp_path):
    classes = sorted(pd.read_csv(comp / "train.csv")["label"].unique())
    write_probability_sample(comp, [*classes[:-1], "unicorn"])
    cfg = cfg_for(comp, tmp_path)
    problems = "\n".join(check.check(cfg, images=False))
    assert "column(s) ['unicorn'] name no training class" in problems and f"class(es) ['{classes[-1]}'] have no column" in problems
    test = read_test(cfg)
    with pytest.raises(ValueError, match="unicorn"):
        create_submission(cfg, test["id"], np.full((len(test), len(classes)), 0.1), classes)


# --- 3. numbers in range ------------------------------------------------------------------------
@pytest.mark.parametrize("key, value, shown", [
    ("img_size", 0, "[8, ∞)"), ("epochs", 0, "[1, ∞)"), ("batch_size", -4, "[1, ∞)"), ("patience", 0, "[1, ∞)"),
    ("lr", 0.0, "(0, ∞)"), ("drop_rate", 1.0, "[0, 1)"), ("num_workers", -1, "[0, ∞)"), ("ema_decay", 1.5, "[0, 1)"),
    ("label_smoothing", -0.1, "[0, 1)"), ("n_bins", 1, "[2, ∞)"), ("seed", -1, "[0, 4294967295]"), ("in_chans", 4, "(1, 3)"),
])
def test_numbers_out_of_range_name_the_key(key, value, shown):
    with pytest.raises(ValueError) as e:
        load_cfg(overrides={"competition_dir": "comp", key: value})
    assert f"config key '{key}' must be" in str(e.value) and shown in str(e.value)


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ValueError) as e:
        load_cfg(overrides={"competition_dir": "comp", "epochs": 0, "batch_size": 0, "img_size": 0})
    assert all(f"'{k}'" in str(e.value) for k in ("epochs", "batch_size", "img_size"))


# --- 4. data the folds cannot split ---------------------------------------------------------------
def test_data_the_folds_cannot_split_is_named(comp, tmp_path):
    train = pd.read_csv(comp / "train.csv")
    train.assign(label="seven").to_csv(comp / "one_class.csv", index=False)
    problems = check.check(cfg_for(comp, tmp_path, train_csv="one_class.csv"), images=False)
    assert any("holds one class only ('seven')" in p for p in problems)
    train["site"] = np.where(np.arange(len(train)) % 2, "a", None)
    train.to_csv(comp / "train.csv", index=False)
    problems = "\n".join(check.check(cfg_for(comp, tmp_path, group_col="site"), images=False))
    assert "group column 'site' is empty on 24 row(s) (rows 2, 4, 6" in problems
    assert "group column 'site' has 1 group(s), fewer than n_folds=2" in problems


# --- 5. files -----------------------------------------------------------------------------------
def test_a_broken_link_is_reported_with_the_others(comp, tmp_path):
    first = sorted((comp / "train").glob("*.png"))[0]
    first.unlink()
    first.symlink_to(tmp_path / "nowhere.png")
    problems = check.check(cfg_for(comp, tmp_path))
    assert any(first.name in p and "broken link" in p for p in problems)


def test_a_32bit_float_tiff_is_decoded_the_way_training_reads_it(tmp_path):
    values = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    img = read_image(str(tmp_path / "f.tif"))
    assert img.dtype == np.uint8 and img.shape == (20, 30, 3)
    assert img[0, 0, 0] == 0 and img[-1, -1, 0] == 255


def test_the_check_decodes_one_image_of_every_format_like_training(comp, tmp_path):
    train = pd.read_csv(comp / "train.csv")
    first = comp / "train" / f"{train['id'][0]}.png"  # the first PNG: the one the check decodes
    data = bytearray(first.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start:start + 40] = b"\xff" * 40  # header and end chunk intact: only decoding finds it
    first.write_bytes(bytes(data))
    second = comp / "train" / f"{train['id'][1]}.png"
    second.unlink()
    Image.fromarray(np.zeros((16, 16), np.float32), mode="F").save(second.with_suffix(".tif"))  # decodable
    problems = check.check(cfg_for(comp, tmp_path))
    assert [p for p in problems if "cannot decode" in p] == [
        f"train.csv row 2 id={train['id'][0]}: {first}: a PNG image in mode RGB that training cannot decode "
        f"(cannot read image {first}: not a readable image)"]
    assert not any(".tif" in p for p in problems)


def test_a_csv_that_is_not_utf8_names_the_file(comp, tmp_path):
    text = (comp / "train.csv").read_text().replace("img_", "imagé_", 1)
    (comp / "train.csv").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=r"train.csv: not UTF-8 text"):
        read_train(cfg_for(comp, tmp_path))
    assert any("train.csv: not UTF-8 text" in p for p in check.check(cfg_for(comp, tmp_path), images=False))


def test_a_train_csv_without_rows_is_named(comp, tmp_path):
    pd.read_csv(comp / "train.csv").iloc[:0].to_csv(comp / "train.csv", index=False)
    with pytest.raises(DataError, match="train.csv: no rows"):
        read_train(cfg_for(comp, tmp_path))


def runner_config(tmp_path, comp, **extra) -> Path:
    config = {"competition_dir": str(comp), "models_dir": str(tmp_path / "models"), "submissions_dir": str(tmp_path / "subs"),
              "cache_dir": str(tmp_path / "cache"), "n_folds": 2, "epochs": 1, "img_size": 16, "num_workers": 0,
              "pretrained": False, **extra}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_runner_checks_the_data_before_the_first_stage(comp, tmp_path, capsys):
    from helpers import pipeline

    missing = sorted((comp / "train").glob("*.png"))[3]
    missing.unlink()
    assert pipeline.main(["--config", str(runner_config(tmp_path, comp))]) == 2
    err = capsys.readouterr().err
    assert "nothing ran: pre-flight check found" in err and missing.stem in err and "image not found" in err
    assert not (tmp_path / "models" / "exp" / "notebooks").exists()  # not even 00_eda


# --- 6. several experiments ----------------------------------------------------------------------
def test_every_experiment_is_checked_and_named(comp, tmp_path, capsys):
    config = runner_config(tmp_path, comp, experiments={"a": {"model_name": "resnet18"}, "b": {"model_name": "resnet181"}})
    assert check.main(["--config", str(config), "--no-images"]) == 1
    out = capsys.readouterr().out
    assert "experiments.b: config key 'model_name': unknown timm model 'resnet181'" in out
    config = runner_config(tmp_path, comp, experiments={"a": {}, "b": {"epochs": 0, "bach_size": 4}})
    with pytest.raises(KeyError, match="'experiments.b.bach_size'"):
        load_cfg(config, "b")
    assert check.main(["--config", str(config), "--no-images"]) == 1
    out = capsys.readouterr().out
    assert "config key 'experiments.b.epochs' must be in [1, ∞)" in out and "'experiments.b.bach_size'" in out


# --- 8. output folders -----------------------------------------------------------------------------
def test_an_unwritable_models_dir_is_named_before_any_work(comp, tmp_path, capsys):
    from helpers import pipeline, setup

    (tmp_path / "a_file").write_text("not a folder")
    config = runner_config(tmp_path, comp, models_dir=str(tmp_path / "a_file" / "models"))
    assert pipeline.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "config key 'models_dir': cannot write to" in err and "a_file" in err
    with pytest.raises(PermissionError, match="models_dir"):
        setup(str(config))


def test_the_runner_and_its_notebooks_agree_on_one_output_root(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.OUTPUT_ROOT_ENV, str(tmp_path))
    assert artifacts.exp_dir(CFG(experiment="e")) == tmp_path / "models" / "e"
    assert artifacts.under_root("/abs") == Path("/abs")


# --- 9. large images ---------------------------------------------------------------------------
def test_grids_and_the_eda_look_at_thumbnails(tmp_path):
    from helpers.plots import image_grid

    big = np.zeros((6000, 9000, 3), np.uint8)
    big[:, ::7] = 255
    cv2.imwrite(str(tmp_path / "big.jpg"), big)
    del big
    thumb = read_thumbnail(str(tmp_path / "big.jpg"))
    assert max(thumb.shape[:2]) <= 256 and thumb.shape[2] == 3
    image_grid([str(tmp_path / "big.jpg")] * 3, ["a", "b", "c"], tmp_path / "grid.png")
    assert (tmp_path / "grid.png").exists()


# --- 10. a cache build killed mid-way ------------------------------------------------------------
def test_a_killed_cache_build_leaves_nothing_behind(comp, tmp_path):
    cfg = cfg_for(comp, tmp_path, img_size=16)
    root = artifacts.cache_dir(cfg)
    root.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = root / f".images_0123_16_3.{dead.pid}.tmp"
    orphan.write_bytes(b"\0" * 4096)  # what a SIGKILLed build leaves
    alive = root / f".images_4567_16_3.{os.getpid()}.tmp"  # a build still running: kept
    alive.write_bytes(b"\0")
    cache = create_cache(cfg, read_train(cfg)["path"].tolist())
    assert cache is not None and not orphan.exists() and alive.exists()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [alive.name]
