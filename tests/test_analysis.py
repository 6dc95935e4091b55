"""Error analysis of OOF predictions, for classification and regression."""
from __future__ import annotations

import numpy as np
import pandas as pd

from helpers import artifacts
from helpers.analysis import error_analysis
from helpers.config import CFG
from helpers.tools.demo import write_digits
from helpers.data import read_train


def _setup(tmp_path, **kw):
    comp = write_digits(tmp_path / "comp", size=16, n=60, string_labels=True)
    cfg = CFG(competition_dir=str(comp), models_dir=str(tmp_path / "models"), experiment="a", n_folds=2, **kw)
    folds = read_train(cfg).assign(fold=lambda d: np.arange(len(d)) % 2)
    return cfg, folds


def test_classification_analysis(tmp_path):
    cfg, folds = _setup(tmp_path)
    classes = sorted(folds["label"].unique())
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(classes)), len(folds))
    probs[np.arange(len(folds)), folds["target"]] += 0.5 * (np.arange(len(folds)) % 3 > 0)  # 2 in 3 right
    probs /= probs.sum(1, keepdims=True)
    oof = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])
    oof.insert(0, "id", folds["id"])
    oof.insert(1, "label", folds["label"])
    oof.insert(2, "fold", folds["fold"])
    artifacts.exp_dir(cfg).mkdir(parents=True)
    oof.to_csv(artifacts.exp_dir(cfg) / "oof.csv", index=False)
    result = error_analysis(cfg, folds)
    wrong = pd.read_csv(artifacts.exp_dir(cfg) / "analysis" / "wrong_oof.csv")
    expected_wrong = (np.asarray(classes)[probs.argmax(1)] != folds["label"].to_numpy()).sum()
    assert len(wrong) == expected_wrong > 0
    assert wrong["confidence"].is_monotonic_decreasing and wrong["path"].str.endswith(".png").all()
    assert set(result["report"].index) >= set(classes) | {"macro avg"}
    for png in ("confusion_matrix.png", "wrong_confident.png"):
        assert (artifacts.exp_dir(cfg) / "analysis" / png).exists()


def test_regression_analysis(tmp_path):
    cfg, folds = _setup(tmp_path)
    cfg.task, cfg.metric, cfg.target_col = "regression", "rmse", "score"
    truth = np.linspace(0, 100, len(folds))
    pred = truth + np.where(np.arange(len(folds)) == 7, 50.0, 1.0)  # row 7 is the worst
    oof = pd.DataFrame({"id": folds["id"], "score": truth, "fold": folds["fold"], "pred": pred})
    artifacts.exp_dir(cfg).mkdir(parents=True)
    oof.to_csv(artifacts.exp_dir(cfg) / "oof.csv", index=False)
    result = error_analysis(cfg, folds)
    largest = pd.read_csv(artifacts.exp_dir(cfg) / "analysis" / "largest_errors.csv")
    assert largest.iloc[0]["id"] == folds["id"][7] and largest.iloc[0]["abs_error"] == 50.0
    assert (artifacts.exp_dir(cfg) / "analysis" / "residuals.png").exists() and result["grid"] is not None


def test_no_analysis_before_every_fold_is_trained(tmp_path):
    cfg, folds = _setup(tmp_path)
    assert error_analysis(cfg, folds) is None
