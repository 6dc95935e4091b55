"""helpers.ensemble: hill climbing, honest weights, collecting experiments, the submission."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import artifacts
from helpers.config import CFG
from helpers.ensemble import Experiment, blend, collect_experiments, fit_ensemble, hill_climb
from helpers.metrics import get_score
from helpers.submission import check_submission, create_submission, local_lb
from helpers.results import write_score


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --- hill climbing ---------------------------------------------------------------------------
@pytest.mark.parametrize("trial", range(6))
@pytest.mark.parametrize("metric", ["accuracy", "roc_auc", "f1_macro"])
def test_hill_climb_never_worse_than_best_single(metric, trial):
    rng = np.random.default_rng(trial)
    n, n_classes, n_models = 120, 3, 4
    y = rng.integers(0, n_classes, n)
    preds = [softmax(rng.normal(size=(n, n_classes)) + rng.uniform(0, 2) * np.eye(n_classes)[y]) for _ in range(n_models)]
    w = hill_climb(preds, y, metric, iters=20)
    assert w.shape == (n_models,)
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
    best_single = max(get_score(metric, y, p) for p in preds)
    assert get_score(metric, y, blend(preds, w)) >= best_single - 1e-12


@pytest.mark.parametrize("trial", range(6))
def test_hill_climb_rmse_never_worse(trial):
    rng = np.random.default_rng(100 + trial)
    y = rng.normal(size=80)
    preds = [y + rng.normal(scale=rng.uniform(0.2, 1.5), size=80) + rng.normal() for _ in range(3)]
    w = hill_climb(preds, y, "rmse", iters=20)
    best_single = min(get_score("rmse", y, p) for p in preds)
    assert get_score("rmse", y, blend(preds, w)) <= best_single + 1e-12


def complementary(n: int = 100):
    """Models A and B are each right (confidently) on one half and slightly wrong on the other;
    C (the worst alone) is wrong on 60% of the rows. A+B together are right everywhere."""
    y = np.tile([0, 1], n // 2)
    first = np.arange(n) < n // 2
    onehot = np.eye(2)[y]

    def model(good_rows):
        p_true = np.where(good_rows, 0.9, 0.45)
        return onehot * p_true[:, None] + (1 - onehot) * (1 - p_true)[:, None]

    a, b = model(first), model(~first)
    c = onehot * 0.55 + (1 - onehot) * 0.45
    wrong = np.arange(n) % 5 < 3
    c[wrong] = 1 - c[wrong]
    return y, [a, b, c]


def test_hill_climb_weights_two_complementary_models():
    y, preds = complementary()
    assert get_score("accuracy", y, preds[0]) == 0.5 and get_score("accuracy", y, preds[1]) == 0.5
    assert get_score("accuracy", y, preds[2]) == 0.4
    w = hill_climb(preds, y, "accuracy", iters=10)
    assert w[0] > 0 and w[1] > 0
    assert w[0] + w[1] == pytest.approx(1.0)  # C adds nothing
    assert get_score("accuracy", y, blend(preds, w)) == 1.0


def test_hill_climb_regression_complementary():
    y = np.linspace(0, 10, 50)
    preds = [y + 1.0, y - 1.0, y + 3.0]  # opposite biases cancel
    w = hill_climb(preds, y, "rmse", iters=10)
    assert w[0] == pytest.approx(0.5) and w[1] == pytest.approx(0.5) and w[2] == 0
    assert get_score("rmse", y, blend(preds, w)) == pytest.approx(0.0, abs=1e-12)


def test_fit_ensemble_in_sample_and_held_out():
    y, preds = complementary()
    folds = np.arange(len(y)) % 4
    exps = [Experiment(name, p, p[:5], get_score("accuracy", y, p)) for name, p in zip("abc", preds)]
    result = fit_ensemble(exps, y, folds, "accuracy", "hill", iters=10)
    assert set(result) >= {"weights", "in_sample", "held_out", "oof"}
    assert result["in_sample"] == 1.0
    assert result["held_out"] == 1.0  # every fold's weights (from the other folds) also blend A and B
    assert isinstance(result["held_out"], float)
    assert result["oof"].shape == preds[0].shape
    assert result["weights"][0] > 0 and result["weights"][1] > 0


def test_fit_ensemble_held_out_is_honest():
    """Pure-noise models: in-sample selection can overfit, held-out cannot beat it on average."""
    rng = np.random.default_rng(5)
    n = 200
    y = rng.integers(0, 2, n)
    preds = [softmax(rng.normal(size=(n, 2))) for _ in range(5)]
    exps = [Experiment(str(i), p, p, get_score("accuracy", y, p)) for i, p in enumerate(preds)]
    result = fit_ensemble(exps, y, np.arange(n) % 5, "accuracy", "hill", iters=15)
    assert result["in_sample"] >= max(e.score for e in exps)
    assert result["held_out"] <= result["in_sample"]


# --- collecting experiments ------------------------------------------------------------------
CLASSES = ["cat", "dog", "eel"]


def write_experiment(cfg: CFG, name: str, oof: pd.DataFrame, test: pd.DataFrame, **cfg_kw) -> None:
    exp_cfg = CFG(**{**{k: getattr(cfg, k) for k in ("models_dir", "competition_dir")}, "experiment": name, **cfg_kw})
    artifacts.write_predictions(exp_cfg, "oof", oof)
    artifacts.write_predictions(exp_cfg, "test", test)
    write_score(exp_cfg, oof)  # score.json names the data the experiment was made from


def competition(folder, rows: int):
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": [f"img_{i}" for i in range(rows)], "label": "cat"}).to_csv(folder / "train.csv", index=False)
    return str(folder)


@pytest.fixture
def two_experiments(tmp_path):
    rng = np.random.default_rng(0)
    n, n_test = 30, 8
    ids = [f"img_{i}" for i in range(n)]
    y = rng.integers(0, 3, n)
    labels = [CLASSES[c] for c in y]
    fold = np.arange(n) % 3
    prob_cols = [f"prob_{c}" for c in CLASSES]
    cfg = CFG(models_dir=str(tmp_path / "models"), competition_dir=competition(tmp_path / "comp", n), experiment="exp_a")
    p_a = softmax(rng.normal(size=(n, 3)) + 2 * np.eye(3)[y])
    p_b = softmax(rng.normal(size=(n, 3)) + 1 * np.eye(3)[y])
    t_a, t_b = softmax(rng.normal(size=(n_test, 3))), softmax(rng.normal(size=(n_test, 3)))
    test_ids = [f"test_{i}" for i in range(n_test)]

    def frames(p, t):
        oof = pd.DataFrame({"id": ids, "label": labels, "fold": fold})
        oof[prob_cols] = p
        test = pd.DataFrame({"id": test_ids})
        test[prob_cols] = t
        return oof, test

    oof_a, test_a = frames(p_a, t_a)
    oof_b, test_b = frames(p_b, t_b)
    order, test_order = rng.permutation(n), rng.permutation(n_test)  # exp_b wrote its rows in another order
    write_experiment(cfg, "exp_a", oof_a, test_a)
    write_experiment(cfg, "exp_b", oof_b.iloc[order], test_b.iloc[test_order])
    return cfg, dict(y=y, p_a=p_a, p_b=p_b, t_a=t_a, t_b=t_b, ids=ids, test_ids=test_ids, oof_b=oof_b, test_b=test_b)


def test_collect_experiments_aligns_rows(two_experiments):
    cfg, d = two_experiments
    col = collect_experiments(cfg)
    assert [e.name for e in col.experiments] == ["exp_a", "exp_b"]
    a, b = col.experiments
    assert list(col.oof["id"]) == d["ids"]
    np.testing.assert_array_equal(col.y_true, d["y"])
    np.testing.assert_allclose(a.oof, d["p_a"])
    np.testing.assert_allclose(b.oof, d["p_b"])  # re-ordered to exp_a's ids
    np.testing.assert_allclose(a.test, d["t_a"])
    np.testing.assert_allclose(b.test, d["t_b"])
    assert list(col.test_ids) == d["test_ids"]
    assert a.score == pytest.approx(get_score("accuracy", d["y"], d["p_a"]))
    assert b.score == pytest.approx(get_score("accuracy", d["y"], d["p_b"]))


def test_collect_experiments_skips_other_competitions_and_incomplete(two_experiments, tmp_path):
    cfg, d = two_experiments
    oof = pd.DataFrame({"id": ["x"], "label": ["cat"], "fold": [0], "prob_cat": [1.0], "prob_dog": [0.0], "prob_eel": [0.0]})
    test = pd.DataFrame({"id": ["y"], "prob_cat": [1.0], "prob_dog": [0.0], "prob_eel": [0.0]})
    write_experiment(cfg, "other_comp", oof, test, competition_dir=competition(tmp_path / "elsewhere", 3))
    incomplete = CFG(models_dir=cfg.models_dir, competition_dir=cfg.competition_dir, experiment="half_done")
    artifacts.write_predictions(incomplete, "oof", oof)  # no test.csv
    write_score(incomplete, oof)
    assert [e.name for e in collect_experiments(cfg).experiments] == ["exp_a", "exp_b"]


def test_collect_experiments_ids_differ_names_experiment(two_experiments):
    cfg, d = two_experiments
    bad = d["oof_b"].copy()
    bad.loc[3, "id"] = "intruder"
    bad.to_csv(artifacts.exp_dir(cfg).parent / "exp_b" / "oof.csv", index=False)
    with pytest.raises(ValueError) as e:
        collect_experiments(cfg)
    assert "exp_b" in str(e.value)
    assert "oof.csv" in str(e.value)


def test_experiments_of_other_folds_are_weighed_on_the_folds_they_share(two_experiments, caplog):
    """An earlier run's experiment of 3 folds beside a time_limit run's holdout fold (fold 0):
    the blend is judged on fold 0's rows, and the log says so; an experiment that shares no
    fold is an error naming the folds."""
    cfg, d = two_experiments
    holdout = d["oof_b"][d["oof_b"]["fold"] == 0]
    holdout.to_csv(artifacts.exp_dir(cfg).parent / "exp_b" / "oof.csv", index=False)
    col = collect_experiments(cfg)
    rows = np.arange(len(d["ids"])) % 3 == 0
    assert list(col.oof["id"]) == [i for i, r in zip(d["ids"], rows) if r] and set(col.oof["fold"]) == {0}
    np.testing.assert_allclose(col.experiments[0].oof, d["p_a"][rows])
    np.testing.assert_allclose(col.experiments[1].oof, d["p_b"][rows])
    assert "'exp_a': folds [0, 1, 2]; 'exp_b': folds [0]" in caplog.text and "rows of folds [0]" in caplog.text
    other = d["oof_b"][d["oof_b"]["fold"] == 1].assign(fold=0)  # its "fold 0": other rows (another n_folds or seed)
    other.to_csv(artifacts.exp_dir(cfg).parent / "exp_b" / "oof.csv", index=False)
    with pytest.raises(ValueError, match=r"exp_b.*its folds \[0\] hold other rows than 'exp_a''s"):
        collect_experiments(cfg)
    a = pd.read_csv(artifacts.exp_dir(cfg) / "oof.csv")
    a[a["fold"] == 1].to_csv(artifacts.exp_dir(cfg) / "oof.csv", index=False)
    with pytest.raises(ValueError, match=r"share no fold.*'exp_a': folds \[1\]; 'exp_b': folds \[0\]"):
        collect_experiments(cfg)


def test_the_ensemble_blends_the_configs_experiments_and_others_only_when_asked_and_fit(two_experiments, tmp_path, caplog):
    """A second config run into the same models folder (exp_a) beside an earlier run's experiment
    (exp_b, of a time_limit holdout fold): exp_a alone is blended; exp_b joins when asked, and
    only while its rows fit and its test predictions are of today's test files."""
    import dataclasses
    import json

    import yaml

    from helpers import freshness
    from helpers.config import load_cfg

    cfg, d = two_experiments
    config = tmp_path / "second.yaml"
    config.write_text(yaml.safe_dump({"competition_dir": cfg.competition_dir, "models_dir": cfg.models_dir,
                                      "experiments": {"exp_a": {}}}))
    mine = load_cfg(config)
    assert mine.members == ["exp_a"]
    assert [e.name for e in collect_experiments(mine).experiments] == ["exp_a"]
    asked = dataclasses.replace(mine, blend_others=["*"])
    assert [e.name for e in collect_experiments(asked).experiments] == ["exp_a", "exp_b"]
    exp_b = artifacts.exp_dir(cfg).parent / "exp_b"
    d["oof_b"][d["oof_b"]["fold"] == 0].to_csv(exp_b / "oof.csv", index=False)  # a holdout fold: other rows
    assert [e.name for e in collect_experiments(asked).experiments] == ["exp_a"]
    assert "experiment 'exp_b' (blend_others) is not blended: its OOF rows (ids and folds) are not those of 'exp_a'" in caplog.text
    d["oof_b"].to_csv(exp_b / "oof.csv", index=False)
    old = {name: "an older digest" for name in freshness._test_files(cfg)}
    (exp_b / "stamps").mkdir(exist_ok=True)
    (exp_b / "stamps" / "test_fold0.json").write_text(json.dumps({"made_from": {"files": old}}))
    assert [e.name for e in collect_experiments(asked).experiments] == ["exp_a"]
    assert "were made from another" in caplog.text
    with pytest.raises(KeyError, match="'members' is the config file's experiments"):
        load_cfg(config, overrides={"members": ["exp_b"]})


def test_collect_experiments_test_ids_differ_names_experiment(two_experiments):
    cfg, d = two_experiments
    d["test_b"].iloc[:-1].to_csv(artifacts.exp_dir(cfg).parent / "exp_b" / "test.csv", index=False)
    with pytest.raises(ValueError, match="exp_b"):
        collect_experiments(cfg)


def test_collect_experiments_none_found(tmp_path):
    cfg = CFG(models_dir=str(tmp_path / "models"), competition_dir=str(tmp_path / "comp"), experiment="x")
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError):
        collect_experiments(cfg)


# --- the submission --------------------------------------------------------------------------
@pytest.fixture
def comp(tmp_path):
    d = tmp_path / "comp"
    d.mkdir()
    return d


def sub_cfg(comp, tmp_path, **kw) -> CFG:
    return CFG(competition_dir=str(comp), models_dir=str(tmp_path / "models"), **{"pretrained": False, **kw})


def test_make_submission_decodes_string_labels_in_sample_order(comp, tmp_path):
    sample = pd.DataFrame({"id": ["c", "a", "d", "b"], "label": ["cat"] * 4})
    sample.to_csv(comp / "sample_submission.csv", index=False)
    test_ids = pd.Series(["a", "b", "c", "d"])  # prediction order differs from the sample's
    pred = np.eye(3)[[1, 2, 0, 1]]  # a->dog, b->eel, c->cat, d->dog
    sub = create_submission(sub_cfg(comp, tmp_path), test_ids, pred, CLASSES)
    assert list(sub.columns) == ["id", "label"]
    assert list(sub["id"]) == ["c", "a", "d", "b"]
    assert list(sub["label"]) == ["cat", "dog", "dog", "eel"]
    assert not sub.isna().any().any()


def test_make_submission_integer_classes_and_numeric_ids(comp, tmp_path):
    sample = pd.DataFrame({"image_id": [30, 10, 20], "digit": [0, 0, 0]})
    sample.to_csv(comp / "sample_submission.csv", index=False)
    cfg = sub_cfg(comp, tmp_path, id_col="image_id", target_col="digit")
    sub = create_submission(cfg, pd.Series([10, 20, 30]), np.eye(4)[[3, 0, 2]], [0, 1, 2, 3])
    assert list(sub.columns) == ["image_id", "digit"]
    assert sub["image_id"].tolist() == ["30", "10", "20"]  # ids are text, as in the file
    assert sub["digit"].tolist() == [2, 3, 0]
    assert sub["digit"].dtype.kind == "i"


def test_make_submission_probability_columns(comp, tmp_path):
    pd.DataFrame({"id": ["y", "x"], "cat": 0.0, "dog": 0.0, "eel": 0.0}).to_csv(comp / "sample_submission.csv", index=False)
    pred = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    sub = create_submission(sub_cfg(comp, tmp_path), pd.Series(["x", "y"]), pred, CLASSES)
    assert list(sub.columns) == ["id", "cat", "dog", "eel"]
    assert list(sub["id"]) == ["y", "x"]
    np.testing.assert_allclose(sub[["cat", "dog", "eel"]].to_numpy(), pred[[1, 0]])


@pytest.mark.parametrize("metric, sample_value", [("roc_auc", 0), ("accuracy", 0.5)])
def test_make_submission_binary_writes_the_positive_probability(comp, tmp_path, metric, sample_value):
    """Binary competitions scored on ranking (ROC AUC, or a float sample column) want P(positive)."""
    pd.DataFrame({"image_name": ["b", "a", "c"], "target": sample_value}).to_csv(comp / "sample_submission.csv", index=False)
    pd.DataFrame({"image_name": ["a", "b", "c"], "target": [1, 0, 1]}).to_csv(comp / "solution.csv", index=False)
    cfg = sub_cfg(comp, tmp_path, id_col="image_name", target_col="target", metric=metric)
    pred = np.array([[0.2, 0.8], [0.9, 0.1], [0.4, 0.6]])  # a, b, c
    sub = create_submission(cfg, pd.Series(["a", "b", "c"]), pred, [0, 1])
    assert sub["image_name"].tolist() == ["b", "a", "c"]
    np.testing.assert_allclose(sub["target"], [0.1, 0.8, 0.6])
    check_submission(cfg, sub, [0, 1])
    assert local_lb(cfg, sub, [0, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        check_submission(cfg, sub.assign(target=[0.1, 1.8, 0.6]), [0, 1])


def test_make_submission_binary_labels_when_the_sample_holds_labels(comp, tmp_path):
    pd.DataFrame({"id": ["a", "b"], "label": ["cat", "cat"]}).to_csv(comp / "sample_submission.csv", index=False)
    sub = create_submission(sub_cfg(comp, tmp_path), pd.Series(["a", "b"]), np.array([[0.2, 0.8], [0.9, 0.1]]), ["cat", "dog"])
    assert sub["label"].tolist() == ["dog", "cat"]


def test_make_submission_regression(comp, tmp_path):
    pd.DataFrame({"id": [2, 1], "score": 0.0}).to_csv(comp / "sample_submission.csv", index=False)
    cfg = sub_cfg(comp, tmp_path, task="regression", metric="rmse", target_col="score")
    sub = create_submission(cfg, pd.Series([1, 2]), np.array([[1.5], [2.5]]), None)
    assert list(sub.columns) == ["id", "score"]
    assert sub["score"].tolist() == [2.5, 1.5]


def test_make_submission_missing_prediction(comp, tmp_path):
    pd.DataFrame({"id": ["a", "b", "z"], "label": "cat"}).to_csv(comp / "sample_submission.csv", index=False)
    with pytest.raises(ValueError, match="z"):
        create_submission(sub_cfg(comp, tmp_path), pd.Series(["a", "b"]), np.eye(3)[[0, 1]], CLASSES)


def test_local_lb_scores_against_solution(comp, tmp_path):
    pd.DataFrame({"id": ["a", "b", "c", "d"], "label": ["cat", "dog", "eel", "dog"]}).to_csv(comp / "solution.csv", index=False)
    cfg = sub_cfg(comp, tmp_path)
    sub = pd.DataFrame({"id": ["d", "c", "b", "a"], "label": ["dog", "eel", "cat", "cat"]})
    assert local_lb(cfg, sub, CLASSES) == pytest.approx(0.75)
    (comp / "solution.csv").unlink()
    assert local_lb(cfg, sub, CLASSES) is None


def test_mean_and_rank_averaging():
    rng = np.random.default_rng(3)
    n = 150
    y = rng.integers(0, 3, n)
    a = softmax(np.eye(3)[y] * 2 + rng.normal(size=(n, 3)))
    b = softmax(np.eye(3)[y] * 2 + rng.normal(size=(n, 3)))
    exps = [Experiment(name, p, p[:20], get_score("accuracy", y, p)) for name, p in (("a", a), ("b", b))]
    mean = fit_ensemble(exps, y, np.arange(n) % 5, "accuracy", "mean")
    assert np.allclose(mean["weights"], [0.5, 0.5]) and np.allclose(mean["oof"], (a + b) / 2)
    assert mean["in_sample"] == mean["held_out"]  # nothing fitted
    rank = fit_ensemble(exps, y, np.arange(n) % 5, "accuracy", "rank")
    assert np.allclose(rank["oof"].sum(1), 1) and rank["test"].shape == (20, 3)
    assert rank["in_sample"] > 0.6


def test_results_table_lists_experiments_and_the_ensemble(tmp_path):
    from helpers.ensemble import results_table

    cfg = CFG(models_dir=str(tmp_path / "models"), competition_dir=str(tmp_path / "comp"), experiment="cnn",
              model_name="resnet18", img_size=64, epochs=7)
    oof = pd.DataFrame({"id": list("abcd"), "label": ["cat", "dog", "cat", "dog"], "fold": [0, 0, 1, 1],
                        "prob_cat": [0.9, 0.2, 0.4, 0.3], "prob_dog": [0.1, 0.8, 0.6, 0.7]})
    artifacts.write_predictions(cfg, "oof", oof)
    artifacts.write_predictions(cfg, "test", oof[["id", "prob_cat", "prob_dog"]])
    write_score(cfg, oof, wall_s=12.0)
    table = results_table(cfg, {"method": "hill", "in_sample": 0.9, "held_out": 0.8})
    assert (tmp_path / "models" / "results.csv").exists()
    row = table.iloc[0]
    assert (row["experiment"], row["model"], row["img_size"], row["epochs"], row["wall_s"]) == ("cnn", "resnet18", 64, 7, 12.0)
    assert row["cv"] == 0.75 and row["cv_mean"] == 0.75
    assert table["experiment"].tolist()[1:] == ["ensemble (hill, in-sample)", "ensemble (hill, held-out)"]


def test_a_binary_column_named_after_a_class_gets_that_class_probability(comp, tmp_path):
    """Kaggle's 'cat' column wants P(cat), even when 'cat' sorts first among the classes."""
    pd.DataFrame({"id": ["a", "b"], "cat": [0.5, 0.5]}).to_csv(comp / "sample_submission.csv", index=False)
    pd.DataFrame({"id": ["a", "b"], "label": ["cat", "dog"]}).to_csv(comp / "solution.csv", index=False)
    cfg = sub_cfg(comp, tmp_path, metric="roc_auc")
    sub = create_submission(cfg, pd.Series(["a", "b"]), np.array([[0.9, 0.1], [0.3, 0.7]]), ["cat", "dog"])
    np.testing.assert_allclose(sub["cat"], [0.9, 0.3])
    assert local_lb(cfg, sub, ["cat", "dog"]) == pytest.approx(1.0)


def test_a_stacker_is_not_blended_while_its_cnn_submits_its_refit_alone(tmp_path):
    """Fold 0's OOF rows would weigh the refit as if it were the fold model: on the fine-tuning
    benchmark the blend that gave the stacker half the weight scored 0.922, the refit alone 0.969."""
    from helpers import ensemble

    stacker = tmp_path / "exp_lgbm"
    stacker.mkdir()
    (stacker / "stacker.json").write_text('{"source": "exp", "features_from": "folds", "stack_on": "embeddings"}')
    alone, blended = CFG(competition_dir=str(tmp_path), refit="alone"), CFG(competition_dir=str(tmp_path), refit="blend")
    why = ensemble._judged_on_other_models(alone, [stacker, tmp_path / "exp"], {"exp"})
    assert list(why) == [stacker] and "refit: alone" in why[stacker]
    assert ensemble._judged_on_other_models(alone, [stacker], set()) == {}  # the refit is not blended: the folds' are
    assert ensemble._judged_on_other_models(blended, [stacker], {"exp"}) == {}  # half the CNN's test predictions are the folds'
