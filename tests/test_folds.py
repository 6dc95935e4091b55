"""helpers.folds.create_folds: stratified, binned-regression and grouped folds."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers.config import CFG
from helpers.folds import get_folds, create_folds


def classification_frame(n_per_class=(40, 25, 15), seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([[c] * n for c, n in zip(["cat", "dog", "eel"], n_per_class)])
    rng.shuffle(labels)
    classes = sorted(set(labels))
    return pd.DataFrame({"id": [f"img_{i}" for i in range(len(labels))], "label": labels,
                         "target": [classes.index(c) for c in labels]})


def regression_frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.lognormal(0.0, 1.0, n)  # skewed: unstratified folds would differ a lot in mean
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "label": y, "target": y})


def test_classification_every_class_in_every_fold():
    df = classification_frame()
    folds = create_folds(CFG(n_folds=5), df)
    assert len(folds) == len(df)
    assert list(folds["id"]) == list(df["id"])  # rows and order kept
    assert set(folds["fold"]) == set(range(5))
    table = pd.crosstab(folds["label"], folds["fold"])
    assert (table > 0).all().all()
    # each class split as evenly as possible
    for label, row in table.iterrows():
        assert row.max() - row.min() <= 1, label


def test_classification_fold_sizes_balanced():
    folds = create_folds(CFG(n_folds=4), classification_frame())
    sizes = folds["fold"].value_counts()
    assert sizes.sum() == 80
    assert sizes.max() - sizes.min() <= 1 + 2  # stratification may move a row or two


def test_folds_deterministic_for_a_seed():
    df = classification_frame()
    a = create_folds(CFG(n_folds=5, seed=7), df)
    b = create_folds(CFG(n_folds=5, seed=7), df)
    c = create_folds(CFG(n_folds=5, seed=8), df)
    assert (a["fold"] == b["fold"]).all()
    assert (a["fold"] != c["fold"]).any()
    assert "fold" not in df.columns  # the input is not modified


def test_regression_binned_stratification_similar_means():
    df = regression_frame()
    cfg = CFG(task="regression", metric="rmse", n_folds=5, n_bins=10)
    folds = create_folds(cfg, df)
    assert set(folds["fold"]) == set(range(5))
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    means = folds.groupby("fold")["target"].mean()
    overall = df["target"].mean()
    assert (abs(means - overall) / overall).max() < 0.12
    # every quantile bin lands in every fold
    bins = pd.qcut(df["target"], 10, labels=False)
    assert (pd.crosstab(bins, folds["fold"]) >= 3).all().all()


def test_regression_with_few_unique_values():
    df = pd.DataFrame({"id": range(30), "label": [1.0, 2.0, 3.0] * 10})
    df["target"] = df["label"]
    folds = create_folds(CFG(task="regression", metric="rmse", n_folds=3, n_bins=10), df)
    assert (pd.crosstab(folds["target"], folds["fold"]) > 0).all().all()


def _groups(folds: pd.DataFrame) -> pd.Series:
    return folds.groupby("group")["fold"].nunique()


def test_group_col_classification_keeps_groups_together():
    df = classification_frame((60, 45, 45))
    rng = np.random.default_rng(1)
    df["group"] = rng.integers(0, 30, len(df)).astype(str)
    folds = create_folds(CFG(n_folds=3, group_col="group"), df)
    assert (_groups(folds) == 1).all()
    assert set(folds["fold"]) == set(range(3))
    assert (pd.crosstab(folds["label"], folds["fold"]) > 0).all().all()


def test_group_col_regression_keeps_groups_together():
    df = regression_frame(150)
    df["group"] = np.arange(150) // 5  # 30 groups of 5 rows
    folds = create_folds(CFG(task="regression", metric="rmse", n_folds=5, group_col="group"), df)
    assert (_groups(folds) == 1).all()
    assert set(folds["fold"]) == set(range(5))
    assert (folds["fold"].value_counts() == 30).all()  # 6 groups per fold


def test_rare_class_names_the_class(tmp_path):
    df = classification_frame((40, 25, 3))  # 'eel' has 3 rows, fewer than 5 folds
    with pytest.raises(ValueError) as e:
        create_folds(CFG(n_folds=5, competition_dir=str(tmp_path)), df)
    msg = str(e.value)
    assert "class 'eel' of 'label' has 3 row(s), fewer than n_folds=5" in msg  # the label, not its index


def test_rare_class_names_the_class_label(tmp_path):
    df = classification_frame((40, 25, 3))
    with pytest.raises(ValueError, match="eel"):
        create_folds(CFG(n_folds=5, competition_dir=str(tmp_path)), df)


def test_make_folds_with_non_default_index():
    df = classification_frame()
    df.index = df.index + 1000  # e.g. a filtered or concatenated frame
    folds = create_folds(CFG(n_folds=5), df)
    assert set(folds["fold"]) == set(range(5))
    assert (pd.crosstab(folds["label"], folds["fold"]) > 0).all().all()


def test_get_folds_saves_and_reuses(tmp_path):
    cfg = CFG(n_folds=3, models_dir=str(tmp_path / "models"), experiment="f")
    df = classification_frame()
    first = get_folds(cfg, df)
    path = tmp_path / "models" / "f" / "folds.csv"
    assert path.exists()
    stamp = path.stat().st_mtime_ns
    again = get_folds(cfg, df)  # nothing changed: the saved folds, not new ones
    assert (again["fold"].to_numpy() == first["fold"].to_numpy()).all() and path.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("change", [{"seed": 99}, {"n_folds": 4}])
def test_get_folds_remakes_folds_when_what_they_were_made_from_changed(tmp_path, change, caplog):
    """A saved folds.csv is not reused after seed or n_folds changed (it used to be, whenever
    its ids matched), and the log says which key changed."""
    import logging

    base = dict(n_folds=3, models_dir=str(tmp_path / "models"), experiment="f")
    df = classification_frame()
    first = get_folds(CFG(**base), df)
    with caplog.at_level(logging.INFO, logger="kaggle"):
        again = get_folds(CFG(**{**base, **change}), df)
    assert (again["fold"].to_numpy() != first["fold"].to_numpy()).any()
    key, value = next(iter(change.items()))
    assert f"folds remade: {key}" in caplog.text and f"-> {value}" in caplog.text
    saved = pd.read_csv(tmp_path / "models" / "f" / "folds.csv")
    assert (saved["fold"].to_numpy() == again["fold"].to_numpy()).all()


def test_grouped_folds_after_group_col_is_added(tmp_path):
    """Adding group_col after finding near-duplicates must not keep the old, leaky folds."""
    base = dict(n_folds=3, models_dir=str(tmp_path / "models"), experiment="f")
    df = classification_frame()
    df["group"] = np.arange(len(df)) // 4
    get_folds(CFG(**base), df)
    grouped = get_folds(CFG(**base, group_col="group"), df)
    assert (grouped.groupby("group")["fold"].nunique() == 1).all()
