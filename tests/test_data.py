"""helpers.data: image paths, image reading in every mode, train/test CSVs."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from helpers.config import CFG
from helpers.data import read_test, read_train
from helpers.images import read_image, resolve_paths
from helpers.tools.demo import NAMES, write_digits


def touch_image(path, value: int = 128, size: int = 4) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((size, size, 3), value, np.uint8))
    return str(path)


# --- resolve_paths -------------------------------------------------------------------------
@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "images"
    for name in ("a.png", "b.jpg", "c.jpeg", "d.png", "e.JPG"):
        touch_image(d / name)
    (d / "f.tif").write_bytes(b"x")
    (d / "g.gif").write_bytes(b"x")  # only found with image_ext='.gif'
    return d


def test_resolve_ids_without_extension_fall_back_to_jpg_jpeg_png(image_dir, tmp_path):
    ids = pd.Series(["a", "b", "c"])
    paths = resolve_paths(ids, image_dir, "", tmp_path / "train.csv")
    assert paths == [str(image_dir / "a.png"), str(image_dir / "b.jpg"), str(image_dir / "c.jpeg")]


def test_resolve_ids_with_extension_used_as_is(image_dir, tmp_path):
    ids = pd.Series(["a.png", "b.jpg", "e.JPG"])
    paths = resolve_paths(ids, image_dir, "", tmp_path / "train.csv")
    assert paths == [str(image_dir / "a.png"), str(image_dir / "b.jpg"), str(image_dir / "e.JPG")]


def test_resolve_extension_in_any_case_and_more_formats(tmp_path):
    """Kaggle sets ship .JPG, .JPEG, .tif, .bmp, .webp and class sub-folders (ImageNet-Sketch)."""
    d = tmp_path / "imgs"
    for name in ("a.JPG", "b.JPEG", "c.tif", "d.bmp", "e.webp", "n0144/x.JPEG", "Up.png"):
        touch_image(d / name)
    ids = pd.Series(["a", "b", "c", "d", "e", "n0144/x.JPEG", "a.jpg"])
    assert resolve_paths(ids, d, "", tmp_path / "t.csv") == [
        str(d / n) for n in ("a.JPG", "b.JPEG", "c.tif", "d.bmp", "e.webp", "n0144/x.JPEG", "a.JPG")]
    assert resolve_paths(pd.Series(["b"]), d, ".jpeg", tmp_path / "t.csv") == [str(d / "b.JPEG")]
    with pytest.raises(FileNotFoundError, match="id=up"):  # the name itself keeps its case
        resolve_paths(pd.Series(["up"]), d, "", tmp_path / "t.csv")


def test_resolve_numeric_ids(tmp_path):
    d = tmp_path / "imgs"
    touch_image(d / "7.png")
    touch_image(d / "12.jpg")
    assert resolve_paths(pd.Series([7, 12]), d, "", tmp_path / "t.csv") == [str(d / "7.png"), str(d / "12.jpg")]


def test_resolve_explicit_image_ext(image_dir, tmp_path):
    # with an explicit extension only that extension is tried
    assert resolve_paths(pd.Series(["a", "d", "d.png"]), image_dir, ".png", tmp_path / "t.csv") == [
        str(image_dir / "a.png"), str(image_dir / "d.png"), str(image_dir / "d.png")]
    assert resolve_paths(pd.Series(["g"]), image_dir, ".gif", tmp_path / "t.csv") == [str(image_dir / "g.gif")]
    # without one, the id as it is, then the known extensions (.gif among them: an animated GIF's first frame)
    assert resolve_paths(pd.Series(["g"]), image_dir, "", tmp_path / "t.csv") == [str(image_dir / "g.gif")]
    with pytest.raises(FileNotFoundError, match="id=b"):
        resolve_paths(pd.Series(["b"]), image_dir, ".png", tmp_path / "t.csv")  # b.jpg exists, b.png does not


def test_resolve_missing_image_names_row_and_id(image_dir, tmp_path):
    ids = pd.Series(["a", "b", "ghost", "c", "phantom"])
    with pytest.raises(FileNotFoundError) as e:
        resolve_paths(ids, image_dir, "", tmp_path / "train.csv")
    msg = str(e.value)
    assert "train.csv" in msg
    assert "2 image(s)" in msg
    assert "row 4 id=ghost" in msg  # index 2 -> CSV row 4 (header is row 1)
    assert "row 6 id=phantom" in msg
    assert "ghost.png" in msg  # what was tried


def test_resolve_missing_image_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder"):
        resolve_paths(pd.Series(["a"]), tmp_path / "nope", "", tmp_path / "train.csv")


# --- read_image ----------------------------------------------------------------------------
def test_read_image_rgb_order(tmp_path):
    path = tmp_path / "red.png"
    bgr = np.zeros((5, 7, 3), np.uint8)
    bgr[..., 2] = 255  # pure red in OpenCV's BGR order
    cv2.imwrite(str(path), bgr)
    img = read_image(str(path))
    assert img.shape == (5, 7, 3) and img.dtype == np.uint8
    assert (img[..., 0] == 255).all()
    assert (img[..., 1:] == 0).all()


def test_read_image_grayscale_to_rgb(tmp_path):
    path = tmp_path / "gray.png"
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6) * 8
    cv2.imwrite(str(path), gray)
    img = read_image(str(path))
    assert img.shape == (5, 6, 3) and img.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], gray)


def test_read_image_rgba_drops_alpha(tmp_path):
    path = tmp_path / "rgba.png"
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 0] = 200  # blue
    bgra[..., 3] = 10  # nearly transparent
    cv2.imwrite(str(path), bgra)
    img = read_image(str(path))
    assert img.shape == (4, 4, 3) and img.dtype == np.uint8
    assert (img[..., 2] == 200).all() and (img[..., :2] == 0).all()


def test_read_image_16bit_to_uint8(tmp_path):
    path = tmp_path / "deep.png"
    deep = np.full((6, 6), 65535, np.uint16)
    deep[:3] = 0
    cv2.imwrite(str(path), deep)
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).dtype == np.uint16  # really 16-bit on disk
    img = read_image(str(path))
    assert img.shape == (6, 6, 3) and img.dtype == np.uint8
    assert (img[3:] == 255).all() and (img[:3] == 0).all()


def test_read_image_one_channel(tmp_path):
    path = tmp_path / "color.png"
    bgr = np.zeros((5, 5, 3), np.uint8)
    bgr[..., 1] = 100
    cv2.imwrite(str(path), bgr)
    img = read_image(str(path), in_chans=1)
    assert img.shape == (5, 5, 1) and img.dtype == np.uint8
    assert 0 < int(img[0, 0, 0]) < 100


def test_read_image_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ValueError) as e:
        read_image(str(path))
    assert str(path) in str(e.value)
    assert "empty" in str(e.value)


def test_read_image_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ValueError) as e:
        read_image(str(path))
    assert str(path) in str(e.value)


def test_read_image_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_image(str(tmp_path / "missing.png"))


# --- read_train / read_test ----------------------------------------------------------------
@pytest.fixture(scope="module")
def comp_dir(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("data") / "comp", size=16, n=120, string_labels=True, metadata=True)


def comp_cfg(comp, tmp_path, **kw) -> CFG:
    return CFG(competition_dir=str(comp), models_dir=str(tmp_path / "models"), **{"pretrained": False, **kw})


def test_read_train_encodes_string_labels(comp_dir, tmp_path):
    cfg = comp_cfg(comp_dir, tmp_path, metadata_cols=["ink"])
    train = read_train(cfg)
    raw = pd.read_csv(comp_dir / "train.csv")
    assert len(train) == len(raw) == 96
    assert list(train["id"]) == list(raw["id"])
    assert set(train["label"]) == set(NAMES)
    assert sorted(train["target"].unique()) == list(range(10))
    assert train["target"].dtype.kind == "i"
    classes = sorted(NAMES)  # the encoding is the sorted class labels
    assert (train["target"] == train["label"].map(classes.index)).all()
    assert "ink" in train.columns
    for path, id_ in zip(train["path"], train["id"]):
        assert path == str(comp_dir / "train" / f"{id_}.png")
    img = read_image(train["path"][0])
    assert img.shape == (16, 16, 3)


def test_read_train_debug_keeps_debug_rows(comp_dir, tmp_path):
    full = read_train(comp_cfg(comp_dir, tmp_path))
    train = read_train(comp_cfg(comp_dir, tmp_path, debug=True, debug_rows=20))
    # tiny, but every class kept with enough rows for the folds (5 folds x 10 classes)
    assert len(train) == 50 < len(full)
    assert train["target"].value_counts().min() == 5 and train["target"].nunique() == full["target"].nunique()
    assert list(train.index) == list(range(50))
    train = read_train(comp_cfg(comp_dir, tmp_path, debug=True, debug_rows=20, n_folds=2))
    assert len(train) == 20


def test_read_train_regression_target(tmp_path):
    comp = tmp_path / "reg"
    touch_image(comp / "train" / "a.png")
    touch_image(comp / "train" / "b.png")
    pd.DataFrame({"id": ["a", "b"], "label": [1, 2.5]}).to_csv(comp / "train.csv", index=False)
    train = read_train(comp_cfg(comp, tmp_path, task="regression", metric="rmse"))
    assert train["target"].tolist() == [1.0, 2.5]


def test_read_train_missing_target_column(tmp_path):
    comp = tmp_path / "bad"
    touch_image(comp / "train" / "a.png")
    pd.DataFrame({"id": ["a"], "class": ["x"]}).to_csv(comp / "train.csv", index=False)
    with pytest.raises(KeyError) as e:
        read_train(comp_cfg(comp, tmp_path))
    msg = str(e.value)
    assert "label" in msg
    assert str(comp / "train.csv") in msg


def test_read_train_missing_metadata_column(comp_dir, tmp_path):
    with pytest.raises(KeyError, match="site"):
        read_train(comp_cfg(comp_dir, tmp_path, metadata_cols=["site"]))


def test_read_train_nan_target_names_rows(tmp_path):
    comp = tmp_path / "nan"
    for i in "abc":
        touch_image(comp / "train" / f"{i}.png")
    pd.DataFrame({"id": ["a", "b", "c"], "label": ["x", None, "y"]}).to_csv(comp / "train.csv", index=False)
    with pytest.raises(ValueError) as e:
        read_train(comp_cfg(comp, tmp_path))
    assert "empty cell(s) in target column 'label' (rows 3)" in str(e.value)


def test_read_train_missing_image_names_row(comp_dir, tmp_path):
    comp = tmp_path / "copy"
    (comp / "train").mkdir(parents=True)
    raw = pd.read_csv(comp_dir / "train.csv")
    for id_ in raw["id"][1:]:  # the image of the first row is missing
        (comp / "train" / f"{id_}.png").write_bytes((comp_dir / "train" / f"{id_}.png").read_bytes())
    raw.to_csv(comp / "train.csv", index=False)
    with pytest.raises(FileNotFoundError) as e:
        read_train(comp_cfg(comp, tmp_path))
    assert f"row 2 id={raw['id'][0]}" in str(e.value)


def test_read_test_from_test_csv(comp_dir, tmp_path):
    test = read_test(comp_cfg(comp_dir, tmp_path, metadata_cols=["ink"]))
    raw = pd.read_csv(comp_dir / "test.csv")
    assert list(test["id"]) == list(raw["id"])
    assert "ink" in test.columns
    assert all(p.startswith(str(comp_dir / "test")) for p in test["path"])


def test_read_test_ids_from_sample_submission_when_no_test_csv(comp_dir, tmp_path):
    comp = tmp_path / "notest"
    comp.mkdir()
    (comp / "test").symlink_to(comp_dir / "test", target_is_directory=True)
    sample = pd.read_csv(comp_dir / "sample_submission.csv").iloc[::-1]  # another order than test.csv
    sample.to_csv(comp / "sample_submission.csv", index=False)
    assert not (comp / "test.csv").exists()
    test = read_test(comp_cfg(comp, tmp_path))
    assert list(test.columns) == ["id", "path"]
    assert list(test["id"]) == list(sample["id"])
    assert list(test["path"]) == [str(comp / "test" / f"{i}.png") for i in sample["id"]]


def test_metadata_without_test_csv_is_an_error_naming_the_key(comp_dir, tmp_path):
    """Metadata for the stacker must exist for the test rows too: say so before any training."""
    comp = tmp_path / "notest_meta"
    comp.mkdir()
    (comp / "test").symlink_to(comp_dir / "test", target_is_directory=True)
    (comp / "train").symlink_to(comp_dir / "train", target_is_directory=True)
    for name in ("train.csv", "sample_submission.csv"):
        (comp / name).write_text((comp_dir / name).read_text())
    cfg = comp_cfg(comp, tmp_path, metadata_cols=["ink"])
    with pytest.raises(FileNotFoundError, match="metadata_cols.*ink"):
        read_test(cfg)
    from helpers.check import check
    assert any("metadata_cols" in p and "test.csv" in p for p in check(cfg, images=False))


def test_read_test_empty_is_an_error(tmp_path):
    comp = tmp_path / "empty"
    (comp / "test").mkdir(parents=True)
    pd.DataFrame({"id": []}).to_csv(comp / "test.csv", index=False)
    with pytest.raises(ValueError, match="empty"):
        read_test(comp_cfg(comp, tmp_path))
