"""Multi-label competitions (task: multilabel): targets in both shapes, the pre-flight check,
losses, Mixup, folds, metrics with cross-fitted thresholds, submissions, stacking, the
ensemble, analysis, and the generated multi-label demo through the runner, the Predictor and
the Kaggle package."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from helpers import artifacts, pipeline, stages
from helpers.config import CFG
from helpers.data import DataError, read_train
from helpers.tools.demo import NAMES, write_multilabel_digits
from helpers.ensemble import fit_ensemble, hill_climb
from helpers.tasks import TASKS
from helpers.tasks import create_criterion
from helpers.metrics import cross_fitted, fit_thresholds, get_score, label_weights
from helpers.submission import check_submission, create_submission, local_lb
from helpers.tasks.multilabel import decisions as multilabel_decisions

LABELS = ["cloudy", "primary", "water"]


def to_label_columns(comp, labels: list[str]) -> None:
    """Rewrite a competition with one label column into one 0/1 column per label (train,
    solution and sample_submission), Kaggle's other multi-label shape."""
    for name in ("train", "solution", "sample_submission"):
        df = pd.read_csv(comp / f"{name}.csv", dtype={"id": str}, keep_default_na=False)
        sets = [set(str(v).split()) for v in df["labels"]]
        for label in labels:
            df[label] = [int(label in s) for s in sets]
        df.drop(columns=["labels"]).to_csv(comp / f"{name}.csv", index=False)


def tiny_comp(tmp_path, rows: list[str]):
    """A competition whose train.csv holds `rows` (space-separated labels); images are not
    needed by the checks that use it."""
    comp = tmp_path / "comp"
    (comp / "train").mkdir(parents=True)
    ids = [f"r{i}" for i in range(len(rows))]
    for i in ids:
        (comp / "train" / f"{i}.png").write_bytes(b"")
    pd.DataFrame({"id": ids, "tags": rows}).to_csv(comp / "train.csv", index=False)
    return comp


# --- targets and the pre-flight check ------------------------------------------------------------
@pytest.fixture(scope="module")
def ml_comp(tmp_path_factory):
    return write_multilabel_digits(tmp_path_factory.mktemp("mlc") / "comp", n=120, size=32, seed=1)


def test_both_target_shapes_give_the_same_label_matrix(ml_comp, tmp_path):
    import shutil

    joined = read_train(CFG(competition_dir=str(ml_comp), target_col="labels", task="multilabel", metric="f1_micro"))
    other = tmp_path / "cols"
    shutil.copytree(ml_comp, other)
    present = [n for n in NAMES if joined["labels"].str.contains(n).any()]
    to_label_columns(other, present)
    cols = read_train(CFG(competition_dir=str(other), task="multilabel", metric="f1_micro", label_cols=present))
    assert list(joined["id"]) == list(cols["id"])
    assert np.stack(joined["target"]).shape == (len(joined), len(present))  # labels sorted by name, cols in their order
    by_name = pd.DataFrame(np.stack(joined["target"]), columns=sorted(present))[present].to_numpy()
    np.testing.assert_array_equal(by_name, np.stack(cols["target"]))
    assert set(cols["label"]) == {" ".join(sorted(s.split(), key=present.index)) for s in joined["labels"]}  # joined back
    empty = joined["labels"] == ""
    assert empty.any() and (np.stack(joined["target"])[empty.to_numpy()].sum(1) == 0).all()  # no label: a valid row


def test_preflight_names_unknown_labels_rare_labels_and_empty_rows(tmp_path):
    comp = tiny_comp(tmp_path, ["cloudy primary", "primary", "water primary", "cloudy", "unicorn primary", "", "cloudy water"])
    base = dict(competition_dir=str(comp), target_col="tags", task="multilabel", metric="f1_micro", n_folds=2)
    with pytest.raises(DataError) as err:
        read_train(CFG(**base, labels=LABELS, allow_empty=False))
    message = str(err.value)
    assert "train.csv: labels ['unicorn'] in 'tags' are not in config key 'labels' (rows 6)" in message
    assert "1 row(s) have no label (rows 7)" in message and "allow_empty" in message
    with pytest.raises(DataError, match="label 'unicorn' has 1 positive row\\(s\\), fewer than n_folds=2"):
        read_train(CFG(**base))  # every label the data names, a blank row allowed: only the rare label is left


def test_preflight_label_columns_must_be_zero_or_one(tmp_path):
    comp = tiny_comp(tmp_path, ["a"] * 4)
    df = pd.read_csv(comp / "train.csv").drop(columns=["tags"]).assign(a=[1, 0, 1, 1], b=[0, 1, 2, 1])
    df.to_csv(comp / "train.csv", index=False)
    with pytest.raises(DataError, match=r"label columns \['a', 'b'\] must hold 0 or 1 \(rows 4\)"):
        read_train(CFG(competition_dir=str(comp), task="multilabel", metric="f1_micro", label_cols=["a", "b"], n_folds=2))


def test_config_rejects_a_single_label_metric_for_multilabel():
    from helpers.config import check_config

    with pytest.raises(ValueError, match="metric"):
        check_config(CFG(competition_dir="x", task="multilabel", metric="accuracy"))
    with pytest.raises(ValueError, match="metric"):
        check_config(CFG(competition_dir="x", task="classification", metric="f1_micro"))


# --- losses and Mixup ------------------------------------------------------------------------
def test_losses_bce_pos_weight_focal_and_asl():
    targets = [np.array([1.0, 0.0, 0.0])] * 9 + [np.array([1.0, 1.0, 0.0])]  # label 1: 1 positive in 10
    logits = torch.tensor([[2.0, -1.0, -3.0], [0.5, 1.0, -2.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    bce = create_criterion(CFG(task="multilabel", metric="f1_micro"), targets, 3)
    torch.testing.assert_close(bce(logits, y), torch.nn.functional.binary_cross_entropy_with_logits(logits, y))
    weighted = create_criterion(CFG(task="multilabel", metric="f1_micro", pos_weight="balanced"), targets, 3)
    np.testing.assert_allclose(weighted.pos_weight.numpy(), [1.0, 9.0, 10.0])  # negatives per positive (at least one), >= 1
    named = create_criterion(CFG(task="multilabel", metric="f1_micro", pos_weight="balanced", label_pos_weight={"c": 3}),
                             targets, 3, ["a", "b", "c"])
    np.testing.assert_allclose(named.pos_weight.numpy(), [1.0, 9.0, 3.0])  # a weight given by name wins
    with pytest.raises(ValueError, match=r"'label_pos_weight' names labels the training data does not have: \['d'\]"):
        create_criterion(CFG(task="multilabel", metric="f1_micro", label_pos_weight={"d": 3}), targets, 3, ["a", "b", "c"])
    assert weighted(logits, y) > bce(logits, y)  # the rare label's miss costs more
    for kind in ("focal", "asl"):
        loss = create_criterion(CFG(task="multilabel", metric="f1_micro", loss=kind), targets, 3)
        value = loss(logits.requires_grad_(), y)
        value.backward()
        assert value.ndim == 0 and value > 0 and torch.isfinite(logits.grad).all()
        assert loss(torch.tensor([[9.0, -9.0, -9.0]]), torch.tensor([[1.0, 0.0, 0.0]])) < value  # right and sure: small
        logits.grad = None
    with pytest.raises(ValueError, match="multilabel takes 'bce', 'focal' or 'asl'"):
        create_criterion(CFG(task="multilabel", metric="f1_micro", loss="ce"), targets, 3)


def test_mixup_of_multi_hot_targets_is_refused_before_any_work_where_timm_cannot(monkeypatch):
    """timm's Mixup takes multi-hot targets from 1.0.31 (`multi_label`); on an older timm (Kaggle's
    and Colab's images lag PyPI) the model check names the keys and the fix, before any work."""
    from helpers import models

    cfg = CFG(task="multilabel", metric="f1_micro", mixup_alpha=0.2, arch="hybrid")
    monkeypatch.setattr(models, "_mixes_multi_hot", lambda: False)
    assert any("Mixup/CutMix of multi-label targets needs timm's Mixup(multi_label=...)" in p for p in models.model_problems(cfg))
    assert not any("Mixup" in p for p in models.model_problems(CFG(task="classification", mixup_alpha=0.2, arch="hybrid")))


def test_mixup_mixes_multi_hot_targets():
    from timm.data import Mixup

    from helpers.models import _mixes_multi_hot

    if not _mixes_multi_hot():
        pytest.skip("this timm's Mixup has no multi_label (timm < 1.0.31): the model check refuses it, above")
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.0, num_classes=3, multi_label=True)
    x = torch.rand(4, 3, 8, 8)
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    _, mixed = mixup(x, y)
    lam = mixed[0, 0].item()  # row 0 mixed with row 3 (flipped batch): label 0 keeps lam
    np.testing.assert_allclose(mixed.numpy(), (lam * y + (1 - lam) * y.flip(0)).numpy(), atol=1e-6)


# --- folds -------------------------------------------------------------------------------------
def multilabel_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.5, 0.2, 0.05, 0.3])
    matrix = (rng.random((n, 4)) < prevalence).astype(float)
    return pd.DataFrame({"id": [f"i{i}" for i in range(n)], "target": list(matrix),
                         "site": [f"s{i // 3}" for i in range(n)]})


def test_multilabel_folds_spread_every_label(tmp_path):
    train = multilabel_frame()
    cfg = CFG(competition_dir=str(tmp_path), models_dir=str(tmp_path / "m"), task="multilabel", metric="f1_micro", n_folds=5)

    fold = TASKS['multilabel'].assign_folds(cfg, train)
    matrix = np.stack(train["target"])
    assert sorted(np.unique(fold)) == [0, 1, 2, 3, 4]
    per_fold = np.array([matrix[fold == k].sum(0) for k in range(5)])  # positives of each label per fold
    assert (per_fold.max(0) - per_fold.min(0) <= 2).all()  # iterative stratification: even to a row or two
    assert (per_fold[:, 2] >= 1).all()  # even the 5% label is in every fold


def test_multilabel_folds_keep_groups_together(tmp_path):
    train = multilabel_frame()
    cfg = CFG(competition_dir=str(tmp_path), models_dir=str(tmp_path / "m"), task="multilabel", metric="f1_micro",
              n_folds=4, group_col="site")

    fold = TASKS['multilabel'].assign_folds(cfg, train)
    assert (pd.Series(fold).groupby(train["site"]).nunique() == 1).all()
    matrix = np.stack(train["target"])
    shares = np.array([matrix[fold == k].mean(0) for k in range(4)])
    assert (np.abs(shares - matrix.mean(0)).max(0) < 0.1).all()


# --- metrics -----------------------------------------------------------------------------------
def test_f1_micro_macro_at_given_thresholds():
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=float)
    p = np.array([[0.9, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.6]])
    t = np.array([0.5, 0.5])
    # label 0: tp 2; label 1: tp 1 (row 2), fp 1 (row 3), fn 1 (row 1)
    assert get_score("f1_micro", y, p, t) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert get_score("f1_macro", y, p, t) == pytest.approx((1.0 + 0.5) / 2)
    assert get_score("f1_micro", y, p, np.array([0.5, 0.35])) == pytest.approx(2 * 4 / (2 * 4 + 1))
    w = label_weights({"b": 3.0}, ["a", "b"])
    f2_b = 5 * 1 / (5 * 1 + 4 * 1 + 1)
    assert get_score("f2_ciw", y, p, t, w) == pytest.approx((1.0 + 3 * f2_b) / 4)  # class-importance weighted F2
    from sklearn.metrics import average_precision_score, roc_auc_score

    assert get_score("map", y, p) == pytest.approx(np.mean([average_precision_score(y[:, j], p[:, j]) for j in range(2)]))
    assert get_score("roc_auc", y, p) == pytest.approx(roc_auc_score(y, p, average="macro"))


def test_thresholds_are_tuned_per_label_and_cv_is_cross_fitted():
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.random((n, 3)) < [0.5, 0.3, 0.1]).astype(float)
    scale = np.array([0.3, 0.6, 0.15])  # each label's scores live in their own range
    p = np.clip(scale * (0.6 * y + 0.5 * rng.random((n, 3))), 0, 1)
    t = fit_thresholds("f1_micro", y, p)
    assert len(set(t)) == 3 and (t < 0.5).all()
    assert get_score("f1_micro", y, p, t) > get_score("f1_micro", y, p, np.full(3, 0.5)) + 0.2
    folds = np.arange(n) % 4
    cv, per_fold, all_rows = cross_fitted("f1_micro", y, p, folds)
    np.testing.assert_array_equal(all_rows, t)
    assert len(per_fold) == 4 and cv <= get_score("f1_micro", y, p, t) + 1e-12  # not tuned on the rows it scores
    noise = rng.random((n, 3))  # a model with no skill: tuning on the same rows flatters it, cross-fitting does not
    assert cross_fitted("f1_micro", y, noise, folds)[0] < get_score("f1_micro", y, noise) - 0.005


def _weak_rare_labels(seed: int, n: int = 2000):
    """Eight labels from common to rare, the rarer the harder to see (as a competition's tail)."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04, 0.02, 0.01])
    y = (rng.random((n, 8)) < prevalence).astype(float)
    logit = np.linspace(1.5, 0.3, 8) * (2 * y - 1) + rng.normal(0, 1, (n, 8)) + np.log(prevalence / (1 - prevalence))
    return y, 1 / (1 + np.exp(-logit))


def test_micro_f1_thresholds_are_tuned_on_the_pooled_counts():
    """micro-F1 pools TP/FP/FN over the labels: a rare, weak label tuned for its own F1 floods the
    pool with false alarms; thresholds tuned on the pooled F1 score higher, cross-fitted too."""
    y, p = _weak_rare_labels(0)
    own, pooled = fit_thresholds("f1_macro", y, p), fit_thresholds("f1_micro", y, p)  # f1_macro: each label's own F1
    assert get_score("f1_micro", y, p, pooled) > get_score("f1_micro", y, p, own) + 0.02
    assert (pooled[-2:] > own[-2:]).all()  # the rare labels predicted less
    folds = np.arange(len(y)) % 5
    honest_own = np.zeros_like(p)
    for k in range(5):
        rows = folds == k
        honest_own[rows] = p[rows] >= fit_thresholds("f1_macro", y[~rows], p[~rows])
    assert cross_fitted("f1_micro", y, p, folds)[0] > get_score("f1_micro", y, honest_own, np.full(8, 0.5)) + 0.02


@pytest.mark.parametrize("method", ["mean", "hill"])
def test_one_fold_tunes_thresholds_on_other_parts_of_it(method):
    """`folds: [0]` or time_limit's holdout plan: the thresholds that score a row are tuned on
    the other parts of the fold, in the experiment's CV and in every blend's held-out score."""
    from helpers.ensemble import Experiment, fit_ensemble

    rng = np.random.default_rng(1)
    y = (rng.random((300, 4)) < [0.4, 0.2, 0.1, 0.05]).astype(float)
    noise = rng.random((300, 4))  # no skill: tuning thresholds on the rows it scores flatters it
    one_fold = np.zeros(300, dtype=int)
    tuned_on_itself = get_score("f1_macro", y, noise)
    cv, per_fold, _ = cross_fitted("f1_macro", y, noise, one_fold)
    assert cv < tuned_on_itself - 0.01 and per_fold == [cv]
    exps = [Experiment(str(i), noise, noise, cv) for i in range(2)]
    result = fit_ensemble(exps, y, one_fold, "f1_macro", method, iters=5)
    assert result["held_out"] < result["in_sample"] - 0.01


# --- submissions -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["labels", "columns"])
def test_submission_in_both_shapes(tmp_path, shape):
    comp = tmp_path / "comp"
    comp.mkdir()
    ids = ["b", "a", "c"]
    if shape == "labels":
        pd.DataFrame({"id": ids, "tags": ["x"] * 3}).to_csv(comp / "sample_submission.csv", index=False)
    else:
        pd.DataFrame({"id": ids, **{c: 0 for c in LABELS}}).to_csv(comp / "sample_submission.csv", index=False)
    pd.DataFrame({"id": ids, "tags": ["cloudy primary", "", "water"]}).to_csv(comp / "solution.csv", index=False)
    cfg = CFG(competition_dir=str(comp), models_dir=str(tmp_path / "m"), target_col="tags", task="multilabel",
              metric="f1_micro", label_cols=[] if shape == "labels" else [])
    probs = np.array([[0.1, 0.2, 0.1], [0.7, 0.9, 0.05], [0.2, 0.1, 0.4]])  # rows a, b, c
    sub = create_submission(cfg, pd.Series(["a", "b", "c"]), probs, LABELS, thresholds=[0.5, 0.5, 0.3])
    assert list(sub["id"]) == ids
    if shape == "labels":
        assert list(sub["tags"]) == ["cloudy primary", "", "water"]  # b, a (nothing above), c (water at 0.3)
    else:
        assert sub[LABELS].to_numpy().tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    check_submission(cfg, sub, LABELS)
    assert local_lb(cfg, sub, LABELS) == pytest.approx(1.0)
    if shape == "labels":
        bad = sub.assign(tags=["cloudy unicorn", "", "water"])
        with pytest.raises(ValueError, match=r"submission column 'tags' has labels not among the training labels: \['unicorn'\]"):
            check_submission(cfg, bad, LABELS)
    else:
        with pytest.raises(ValueError, match="differ from"):
            check_submission(cfg, sub.drop(columns=["water"]), LABELS)


def test_submission_probability_columns_when_the_metric_ranks(tmp_path):
    comp = tmp_path / "comp"
    comp.mkdir()
    pd.DataFrame({"id": ["a", "b"], **{c: 0.0 for c in LABELS}}).to_csv(comp / "sample_submission.csv", index=False)
    cfg = CFG(competition_dir=str(comp), target_col="tags", task="multilabel", metric="map")
    probs = np.array([[0.1, 0.2, 0.3], [0.7, 0.9, 0.05]])
    sub = create_submission(cfg, pd.Series(["a", "b"]), probs, LABELS)
    np.testing.assert_allclose(sub[LABELS].to_numpy(), probs)


def test_a_row_gets_its_likeliest_label_when_empty_is_not_allowed():
    probs = np.array([[0.1, 0.3, 0.2], [0.9, 0.1, 0.6]])
    strict = multilabel_decisions(CFG(task="multilabel", allow_empty=False), probs, [0.5, 0.5, 0.5])
    assert strict.tolist() == [[0, 1, 0], [1, 0, 1]]
    assert multilabel_decisions(CFG(task="multilabel"), probs, [0.5, 0.5, 0.5]).tolist() == [[0, 0, 0], [1, 0, 1]]


# --- stacking and the ensemble ---------------------------------------------------------------------
def test_stacker_fits_one_head_per_label(one_torch_thread):
    from helpers.stacking import FoldStacker

    rng = np.random.default_rng(0)
    n = 240
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    y = np.column_stack([emb[:, 0] > 0, emb[:, 1] + emb[:, 2] > 0.5, np.zeros(n)]).astype(float)  # label 2 never shows
    cfg = CFG(task="multilabel", metric="f1_micro", lgbm_params={"n_estimators": 60})
    stacker = FoldStacker(cfg, 3).fit(cfg, emb[:180], pd.DataFrame(index=range(180)), y[:180], seed=0)
    p = stacker.predict(emb[180:], pd.DataFrame(index=range(60)))
    assert p.shape == (60, 3) and (p[:, 2] == 0).all()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y[180:, 0], p[:, 0]) > 0.9 and roc_auc_score(y[180:, 1], p[:, 1]) > 0.8


@pytest.mark.parametrize("metric", ["f1_micro", "map", "f2_ciw"])
def test_hill_climb_multilabel_never_worse_than_best_single(metric):
    rng = np.random.default_rng(1)
    n = 200
    y = (rng.random((n, 4)) < 0.3).astype(float)
    preds = [np.clip(0.35 * y + rng.random((n, 4)) * s, 0, 1) for s in (0.6, 0.8, 1.0)]
    weights = hill_climb(preds, y, metric, iters=10)
    blended = sum(w * p for w, p in zip(weights, preds))
    assert get_score(metric, y, blended) >= max(get_score(metric, y, p) for p in preds) - 1e-12
    from helpers.ensemble import Experiment

    exps = [Experiment(str(i), p, p, get_score(metric, y, p)) for i, p in enumerate(preds)]
    result = fit_ensemble(exps, y, np.arange(n) % 4, metric, "hill", iters=10)
    assert result["held_out"] <= result["in_sample"] + 1e-12
    assert len(result["thresholds"]) == 4


# --- the multi-label demo, end to end -------------------------------------------------------------
@pytest.fixture(scope="module")
def ml_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ml_e2e")
    comp = write_multilabel_digits(tmp / "comp", n=400, size=32, seed=0, n_labels=3)  # learnable in seconds
    config = {"competition_dir": str(comp), "models_dir": str(tmp / "models"), "submissions_dir": str(tmp / "submissions"),
              "target_col": "labels", "task": "multilabel", "metric": "f1_micro", "n_folds": 2, "epochs": 6, "pretrained": False,
              "img_size": 32, "batch_size": 32, "lr": 0.005, "num_workers": 0, "lgbm_params": {"n_estimators": 40},
              "experiments": {"ml_cnn": {"arch": "hybrid", "model_kwargs": {"patch_size": 8, "emb_dim": 32, "num_heads": 2}}}}
    path = tmp / "ml.yaml"
    path.write_text(yaml.safe_dump(config))
    rc = pipeline.main(["--config", str(path)])
    return tmp, comp, path, rc


def test_demo_runs_end_to_end_above_the_prevalence_baseline(ml_run):
    tmp, comp, _, rc = ml_run
    assert rc == 0
    score = json.loads((tmp / "models" / "ml_cnn" / "score.json").read_text())
    assert score["cv"] > score["baseline"] + 0.05, score  # a model that sees the digits beats guessing by prevalence
    labels = sorted(score["thresholds"])
    assert set(labels) <= set(NAMES) and all(0 < t < 1 for t in score["thresholds"].values())
    oof = pd.read_csv(tmp / "models" / "ml_cnn" / "oof.csv", keep_default_na=False)
    probs = oof.filter(like="prob_").to_numpy()
    assert ((probs >= 0) & (probs <= 1)).all() and (probs.sum(1) > 1.05).any()  # sigmoid, not softmax
    sub = pd.read_csv(tmp / "submissions" / "submission.csv", dtype={"id": str}, keep_default_na=False)
    sample = pd.read_csv(comp / "sample_submission.csv", dtype={"id": str})
    assert list(sub.columns) == list(sample.columns) and sub["id"].tolist() == sample["id"].tolist()
    assert sub["labels"].str.contains(" ").any()  # several labels in one row
    ensemble = json.loads((tmp / "models" / "ensemble" / "score.json").read_text())
    assert set(ensemble["thresholds"]) == set(labels) and ensemble["local_lb"] > score["baseline"]
    for png in ("eda/target_balance.png", "folds.png"):
        assert (tmp / "models" / "ml_cnn" / png).exists(), png


def test_error_analysis_per_label(ml_run, one_torch_thread):
    from helpers.analysis import error_analysis
    from helpers.config import load_cfg

    tmp, _, path, _ = ml_run
    cfg = load_cfg(path, "ml_cnn")
    result = error_analysis(cfg, artifacts.read_folds(cfg))
    out = artifacts.analysis_dir(cfg)
    oof = artifacts.read_predictions(cfg, "oof")
    report = result["report"]
    assert {"support", "precision", "recall", "f1", "threshold", "tp", "fp", "fn", "tn"} <= set(report.columns)
    assert (report["tp"] + report["fn"] == report["support"]).all()
    assert (report["tp"] + report["fp"] + report["fn"] + report["tn"] == len(oof)).all()
    # counted as the CV counts (thresholds tuned on the other fold), not at thresholds tuned on every row
    tp, fp, fn = report["tp"].sum(), report["fp"].sum(), report["fn"].sum()
    assert 2 * tp / (2 * tp + fp + fn) == pytest.approx(artifacts.read_score(artifacts.exp_dir(cfg))["cv"])
    wrong = pd.read_csv(out / "wrong_oof.csv")
    assert set(wrong["kind"]) <= {"miss", "false alarm"} and len(wrong) == report["fp"].sum() + report["fn"].sum()
    assert (out / "label_confusion.png").exists() and (out / "wrong_confident.png").exists()


def test_predictor_gives_labels_above_the_tuned_thresholds(ml_run, one_torch_thread):
    from helpers.predict import Predictor, results_frame

    tmp, comp, _, _ = ml_run
    predictor = Predictor.from_experiment(tmp / "models" / "ml_cnn", device="cpu")
    score = json.loads((tmp / "models" / "ml_cnn" / "score.json").read_text())
    assert predictor.thresholds == [score["thresholds"][c] for c in predictor.classes]
    paths = sorted(str(p) for p in (comp / "test").glob("*.png"))[:12]
    results = predictor.predict(paths + ["missing.png"])
    assert results[-1]["label"] == "ERROR"
    for r in results[:-1]:
        chosen = [c for c in predictor.classes if r["probs"][c] >= score["thresholds"][c]]
        assert r["labels"] == chosen and r["label"] == " ".join(chosen)
        assert r["confidence"] is None if not chosen else r["confidence"] == min(r["probs"][c] for c in chosen)
    table = results_frame(results)
    assert {f"prob_{c}" for c in predictor.classes} <= set(table.columns)
    from helpers.predict import main

    out = tmp / "cli.csv"
    assert main([str(tmp / "models" / "ml_cnn"), "--image", paths[0], "--image", paths[1], "--out", str(out), "--device", "cpu"]) == 0
    cli = pd.read_csv(out, keep_default_na=False)
    assert cli["label"].tolist() == [results[0]["label"], results[1]["label"]]
    np.testing.assert_allclose(cli[f"prob_{predictor.classes[0]}"], [results[i]["probs"][predictor.classes[0]] for i in (0, 1)],
                               atol=1e-6)


def test_package_keeps_the_thresholds(ml_run, tmp_path):
    from helpers.package import package_ensemble, run_package

    tmp, comp, path, _ = ml_run
    out = package_ensemble(str(path), tmp_path / "pkg")
    spec = json.loads((out / "package.json").read_text())
    ensemble = json.loads((tmp / "models" / "ensemble" / "score.json").read_text())
    assert spec["thresholds"] == [ensemble["thresholds"][c] for c in spec["classes"]]
    sub = run_package(out, comp, tmp_path / "submission.csv")
    sub = pd.read_csv(tmp_path / "submission.csv", dtype={"id": str}, keep_default_na=False)
    expected = pd.read_csv(tmp / "submissions" / "submission.csv", dtype={"id": str}, keep_default_na=False)
    assert (sub["labels"] == expected["labels"]).mean() >= 0.95  # the same answers, offline


# --- what real multi-label data holds ----------------------------------------------------------------
def test_numeric_labels_and_label_none_survive_csv_round_trips(tmp_path):
    comp = tiny_comp(tmp_path, ["0 3", "3", "", "None", "0", "3 None", "0 None"])
    cfg = CFG(competition_dir=str(comp), models_dir=str(tmp_path / "m"), target_col="tags", task="multilabel",
              metric="f1_micro", n_folds=2, labels=[0, 3, "None"], label_weights={0: 5})
    train = read_train(cfg)
    assert np.stack(train["target"]).tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1], [1, 0, 1]]
    oof = train[["id", "tags"]].assign(fold=0, prob_0=0.9, prob_3=0.1, prob_None=0.2)
    artifacts.write_predictions(cfg, "oof", oof)
    y_true, _ = TASKS["multilabel"].oof_targets(cfg, artifacts.read_predictions(cfg, "oof"))  # "3" is not the number 3.0
    np.testing.assert_array_equal(y_true, np.stack(train["target"]))
    np.testing.assert_array_equal(label_weights(cfg.label_weights, ["0", "3", "None"]), [5.0, 1.0, 1.0])


def test_preflight_names_label_names_holding_the_separator_and_unknown_weight_keys(tmp_path):
    comp = tiny_comp(tmp_path, ["a"] * 4)
    df = pd.read_csv(comp / "train.csv").drop(columns=["tags"]).assign(**{"ETT - Abnormal": [1, 0, 1, 1], "NGT": [0, 1, 1, 1]})
    df.to_csv(comp / "train.csv", index=False)
    base = dict(competition_dir=str(comp), task="multilabel", metric="f2_ciw", label_cols=["ETT - Abnormal", "NGT"], n_folds=2)
    with pytest.raises(DataError) as err:
        read_train(CFG(**base, label_weights={"ngt": 2.0}))
    assert "label column(s) ['ETT - Abnormal'] hold label_sep ' '" in str(err.value)
    assert "config key 'label_weights' names label(s) ['ngt']" in str(err.value)
    train = read_train(CFG(**base, label_sep="|", label_weights={"NGT": 2.0}))
    assert list(train["label"]) == ["ETT - Abnormal", "NGT", "ETT - Abnormal|NGT", "ETT - Abnormal|NGT"]


def test_thresholds_on_ties_and_on_a_hopeless_label():
    y = np.array([[1, 1], [1, 0], [0, 0], [0, 0]], dtype=float)
    p = np.array([[0.85, 0.01], [0.8, 0.01], [0.1, 0.3], [0.05, 0.4]])
    t = fit_thresholds("f1_micro", y, p)
    assert 0.4 <= t[0] <= 0.6  # every threshold in (0.1, 0.8] separates: the middle, not 0.12
    assert t[1] == 1.0  # its positive scores below every threshold: never predicted, not predicted everywhere
    assert get_score("f1_micro", y, p, t) == pytest.approx(2 * 2 / (2 * 2 + 1))


def test_allow_empty_redoes_only_the_ensemble(tmp_path):
    cfg = CFG(competition_dir=str(tmp_path), models_dir=str(tmp_path / "m"), task="multilabel", metric="f1_micro")
    other = CFG(**{**cfg.__dict__, "allow_empty": False})
    keys = {stage: stages.output_keys(cfg, stage) for stage in ("folds", "train", "stacking", "ensemble")}
    assert [s for s, k in keys.items() if "allow_empty" in k] == ["ensemble"]
    assert [s for s, k in keys.items() if "label_cols" in k] == ["folds"]  # the label matrix: folds, then all that follows
    assert "label_weights" in keys["train"] and "label_weights" in keys["stacking"] and "metric" in keys["stacking"]
    assert "allow_empty" not in stages.output_keys(CFG(), "ensemble")  # other tasks' outputs keep their keys
    assert other.allow_empty is False


def test_numeric_labels_keep_their_natural_order(tmp_path):
    """Label names that are numbers (protein atlas style) in value order: '2' before '10'."""
    from helpers.tasks import TASKS

    train = pd.DataFrame({"labels": ["1 2", "10", "2 10", ""]})
    cfg = CFG(competition_dir=str(tmp_path), task="multilabel", metric="f1_micro", target_col="labels")
    assert TASKS["multilabel"].classes(train, cfg) == ["1", "2", "10"]
