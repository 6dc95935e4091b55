"""helpers.stacking.run_stacking on synthetic embeddings laid out exactly as extract_features
writes them: features/train_fold{k}.npy (every train row, folds order, float16),
features/test_fold{k}.npy, train_ids.csv (id, fold) and test_ids.csv (id)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import artifacts, freshness
from helpers.artifacts import read_config
from helpers.config import CFG
from helpers.metrics import get_score
from helpers.stacking import run_stacking

N_FOLDS = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_cfg(tmp_path, **kw) -> CFG:
    base = dict(models_dir=str(tmp_path / "models"), competition_dir=str(tmp_path / "comp"), experiment="syn",
                n_folds=N_FOLDS, lgbm_params=dict(n_estimators=200, learning_rate=0.1, early_stopping_round=30), seed=0,
                stack_on="embeddings", pretrained=False)  # the tests of the embeddings' stacker; stack_on oof below
    return CFG(**{**base, **kw})


def write_features(cfg: CFG, folds: pd.DataFrame, test: pd.DataFrame, train_embs: list, test_embs: list) -> None:
    """What extract_features writes, without the CNNs."""
    for k in cfg.fold_ids:
        artifacts.save_features(cfg, "train", k, train_embs[k])
        artifacts.save_features(cfg, "test", k, test_embs[k])
        freshness.record(cfg, "features", k)


def fold_embeddings(signal: np.ndarray, rng, dim: int, noise: float = 1.0) -> list[np.ndarray]:
    """One embedding matrix per fold's CNN: the same signal, each with its own noise and extra dims."""
    out = []
    for _ in range(N_FOLDS):
        extra = rng.normal(size=(len(signal), dim - signal.shape[1]))
        out.append(np.hstack([signal + noise * rng.normal(size=signal.shape), extra]))
    return out


def assign_folds(n: int, rng) -> np.ndarray:
    return rng.permutation(np.arange(n) % N_FOLDS)


@pytest.fixture
def classification_data(tmp_path):
    rng = np.random.default_rng(0)
    n, n_test = 240, 45
    classes = ["ant", "bee", "cow"]
    y = rng.permutation(np.arange(n + n_test) % 3)
    signal = 2.5 * np.eye(3)[y]  # each class pushes its own embedding dimension
    embs = fold_embeddings(signal, rng, dim=8, noise=0.8)
    folds = pd.DataFrame({"id": [f"tr{i}" for i in range(n)], "label": [classes[c] for c in y[:n]],
                          "target": y[:n], "fold": assign_folds(n, rng)})
    test = pd.DataFrame({"id": [f"te{i}" for i in range(n_test)]})
    cfg = make_cfg(tmp_path)
    write_features(cfg, folds, test, [e[:n] for e in embs], [e[n:] for e in embs])
    return cfg, folds, test, y[n:]


def test_stacking_classification_writes_outputs_and_learns(classification_data):
    cfg, folds, test, y_test = classification_data
    score = run_stacking(cfg, folds, test)
    out = artifacts.exp_dir(cfg).parent / "syn_lgbm"
    for name in ("oof.csv", "test.csv", "score.json", "config.yaml", "importance.csv"):
        assert (out / name).exists(), name

    oof = pd.read_csv(out / "oof.csv")
    prob_cols = ["prob_ant", "prob_bee", "prob_cow"]
    assert list(oof.columns) == ["id", "label", "fold", *prob_cols]
    assert len(oof) == len(folds) and set(oof["id"]) == set(folds["id"])
    merged = oof.merge(folds, on="id", suffixes=("", "_true"))
    assert (merged["label"] == merged["label_true"]).all()
    assert (merged["fold"] == merged["fold_true"]).all()
    np.testing.assert_allclose(oof[prob_cols].sum(axis=1), 1.0, atol=1e-6)

    acc = get_score("accuracy", merged["target"].to_numpy(), merged[prob_cols].to_numpy())
    assert acc > 0.8  # chance is 1/3
    saved = json.loads((out / "score.json").read_text())
    assert saved["cv"] == pytest.approx(acc)
    assert score["cv"] == pytest.approx(acc)
    assert saved["metric"] == "accuracy" and saved["experiment"] == "syn_lgbm"
    assert len(saved["folds"]) == N_FOLDS

    test_pred = pd.read_csv(out / "test.csv")
    assert list(test_pred.columns) == ["id", *prob_cols]
    assert list(test_pred["id"]) == list(test["id"])  # test order kept
    assert not test_pred.isna().any().any()
    np.testing.assert_allclose(test_pred[prob_cols].sum(axis=1), 1.0, atol=1e-6)
    assert (test_pred[prob_cols].to_numpy().argmax(1) == y_test).mean() > 0.75

    assert read_config(out).experiment == "syn_lgbm"
    importance = score["importance"]
    assert set(importance["feature"]) == {f"emb_{i}" for i in range(8)}
    # the three signal dimensions matter most
    assert set(importance["feature"][:3]) == {"emb_0", "emb_1", "emb_2"}


def test_a_stacker_on_out_of_fold_predictions_learns_from_rows_no_cnn_trained_on(classification_data):
    """stack_on oof (the default): fold k's stacker learns from the other folds' OOF predictions
    (each from a CNN that never saw its row) plus the metadata, and predicts the test set from
    fold k's test predictions; no embeddings are read. Here the CNN's OOF predictions are right
    on 70% of the rows, which a metadata column flags, and a second column holds the class where
    the CNN guesses: the stacker learns which to trust from rows whose predictions are as good
    as those it is applied to."""
    cfg, folds, test, y_test = classification_data
    cfg = make_cfg(artifacts.exp_dir(cfg).parent.parent, stack_on="oof", metadata_cols=["sure", "hint"])
    rng = np.random.default_rng(1)
    classes = ["ant", "bee", "cow"]
    sure, y = rng.random(len(folds)) < 0.7, folds["target"].to_numpy()
    guess = np.where(sure, y, rng.integers(0, 3, len(folds)))
    probs = 0.1 + 0.7 * np.eye(3)[guess]
    folds = folds.assign(sure=sure.astype(float), hint=np.where(sure, rng.integers(0, 3, len(folds)), y).astype(float))
    oof = artifacts.frame_predictions(folds["id"], probs, cfg, [f"prob_{c}" for c in classes])
    oof.insert(1, "label", folds["label"].to_numpy())
    oof.insert(2, "fold", folds["fold"].to_numpy())
    artifacts.write_predictions(cfg, "oof", oof)
    for k in cfg.fold_ids:  # fold k's test predictions: what its stacker reads for the test set
        test_probs = 0.1 + 0.7 * np.eye(3)[(y_test + (k == 0)) % 3]  # fold 0's CNN is wrong on every test row
        artifacts.write_predictions(cfg, "test", artifacts.frame_predictions(test["id"], test_probs, cfg,
                                                                             [f"prob_{c}" for c in classes]), k)
    from helpers.results import write_score

    artifacts.write_predictions(cfg, "test", artifacts.frame_predictions(test["id"], 0.1 + 0.7 * np.eye(3)[y_test], cfg,
                                                                         [f"prob_{c}" for c in classes]))
    write_score(cfg, oof)
    freshness.record(cfg, "cv")
    test = test.assign(sure=1.0, hint=rng.integers(0, 3, len(test)).astype(float))
    score = run_stacking(cfg, folds, test)
    assert set(score["importance"]["feature"]) == {"oof_prob_ant", "oof_prob_bee", "oof_prob_cow", "sure", "hint"}
    assert set(score["importance"]["kind"]) == {"cnn prediction", "metadata"}
    assert score["cv"] > get_score("accuracy", y, probs) + 0.05  # 0.80 the CNN alone
    test_pred = pd.read_csv(artifacts.exp_dir(cfg).parent / "syn_lgbm" / "test.csv")
    assert ((test_pred.filter(like="prob_").to_numpy().argmax(1) == y_test).mean()
            == pytest.approx(1.0))  # four folds' stackers right, fold 0's wrong: their mean right
    assert json.loads((artifacts.exp_dir(cfg).parent / "syn_lgbm" / "stacker.json").read_text())["stack_on"] == "oof"


def test_stacking_subset_of_folds(classification_data):
    cfg, folds, test, _ = classification_data
    cfg = make_cfg(artifacts.exp_dir(cfg).parent.parent, folds=[0, 2])
    run_stacking(cfg, folds, test)
    oof = pd.read_csv(artifacts.exp_dir(cfg).parent / "syn_lgbm" / "oof.csv")
    assert sorted(oof["fold"].unique()) == [0, 2]
    assert len(oof) == int(folds["fold"].isin([0, 2]).sum())


def test_stacking_rows_must_match_the_features(classification_data):
    cfg, folds, test, _ = classification_data
    with pytest.raises(ValueError, match="train_fold0.npy.*run 03_features"):
        run_stacking(cfg, folds.iloc[1:].reset_index(drop=True), test)
    with pytest.raises(ValueError, match="test_fold0.npy"):
        run_stacking(cfg, folds, test.iloc[1:].reset_index(drop=True))


def test_stacking_is_kept_while_up_to_date_and_redone_when_a_stacker_key_changes(classification_data, caplog):
    import logging

    cfg, folds, test, _ = classification_data
    first = run_stacking(cfg, folds, test)
    out = Path(cfg.models_dir) / "syn_lgbm" / "oof.csv"
    mtime = out.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="kaggle"):
        again = run_stacking(cfg, folds, test)
    assert out.stat().st_mtime_ns == mtime and again["cv"] == first["cv"] and "syn_lgbm: up to date" in caplog.text
    changed = make_cfg(Path(cfg.models_dir).parent, lgbm_params=dict(n_estimators=200, learning_rate=0.1,
                                                                     early_stopping_round=30, num_leaves=4))
    with caplog.at_level(logging.INFO, logger="kaggle"):
        run_stacking(changed, folds, test)
    assert out.stat().st_mtime_ns != mtime and "lgbm_params" in caplog.text


def test_metadata_improves_the_stacker(tmp_path):
    """The label needs an embedding dimension and a metadata column together."""
    rng = np.random.default_rng(1)
    n, n_test = 360, 30
    meta = rng.normal(size=n + n_test)
    latent = rng.normal(size=n + n_test)
    y = (latent + meta > 0).astype(int)
    embs = fold_embeddings(latent[:, None], rng, dim=4, noise=0.1)
    folds = pd.DataFrame({"id": np.arange(n), "label": y[:n], "target": y[:n], "fold": assign_folds(n, rng),
                          "meta": meta[:n]})
    test = pd.DataFrame({"id": np.arange(n, n + n_test), "meta": meta[n:]})
    cfg_with = make_cfg(tmp_path, metadata_cols=["meta"])
    write_features(cfg_with, folds, test, [e[:n] for e in embs], [e[n:] for e in embs])

    with_meta = run_stacking(cfg_with, folds, test)
    assert "meta" in set(with_meta["importance"]["feature"])
    assert with_meta["importance"].set_index("feature").loc["meta", "kind"] == "metadata"
    without_meta = run_stacking(make_cfg(tmp_path, metadata_cols=[]), folds, test)
    assert "meta" not in set(without_meta["importance"]["feature"])
    assert with_meta["cv"] > 0.8
    assert with_meta["cv"] > without_meta["cv"] + 0.08
    assert without_meta["cv"] < 0.8


def test_categorical_string_metadata(tmp_path):
    rng = np.random.default_rng(2)
    n, n_test = 240, 30
    site = rng.choice(["north", "south", "east"], n + n_test)
    y = (site == "south").astype(int)  # the label is in the metadata only
    embs = fold_embeddings(np.zeros((n + n_test, 1)), rng, dim=3)
    folds = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "label": np.where(y[:n], "yes", "no"),
                          "target": y[:n], "fold": assign_folds(n, rng), "site": site[:n]})
    test = pd.DataFrame({"id": [f"t{i}" for i in range(n_test)], "site": site[n:]})
    cfg = make_cfg(tmp_path, metadata_cols=["site"])
    write_features(cfg, folds, test, [e[:n] for e in embs], [e[n:] for e in embs])
    score = run_stacking(cfg, folds, test)
    assert score["cv"] > 0.95
    test_pred = pd.read_csv(artifacts.exp_dir(cfg).parent / "syn_lgbm" / "test.csv")
    assert ((test_pred["prob_yes"] > 0.5).to_numpy() == (site[n:] == "south")).mean() > 0.95


def test_stacking_regression(tmp_path):
    rng = np.random.default_rng(3)
    n, n_test = 240, 30
    latent = rng.normal(size=n + n_test)
    y = 3.0 * latent + 10.0 + 0.3 * rng.normal(size=n + n_test)
    embs = fold_embeddings(latent[:, None], rng, dim=5, noise=0.1)
    folds = pd.DataFrame({"id": np.arange(n), "label": y[:n], "target": y[:n], "fold": assign_folds(n, rng)})
    test = pd.DataFrame({"id": np.arange(n, n + n_test)})
    cfg = make_cfg(tmp_path, task="regression", metric="rmse")
    write_features(cfg, folds, test, [e[:n] for e in embs], [e[n:] for e in embs])
    score = run_stacking(cfg, folds, test)
    out = artifacts.exp_dir(cfg).parent / "syn_lgbm"
    oof = pd.read_csv(out / "oof.csv")
    assert list(oof.columns) == ["id", "label", "fold", "pred"]
    rmse = float(np.sqrt(np.mean((oof["pred"] - oof["label"]) ** 2)))
    assert score["cv"] == pytest.approx(rmse)
    assert rmse < 0.4 * np.std(y)  # a constant would score std(y)
    test_pred = pd.read_csv(out / "test.csv")
    assert list(test_pred.columns) == ["id", "pred"] and len(test_pred) == n_test
    assert np.sqrt(np.mean((test_pred["pred"].to_numpy() - y[n:]) ** 2)) < 0.5 * np.std(y)


# --- leak-free layout, heads, PCA, frozen features --------------------------------------------
def test_no_row_is_predicted_by_a_model_that_saw_it(tmp_path):
    """Each fold's 'CNN' leaks the label of every row it trained on (as a fine-tuned CNN
    half-memorises its training rows) and knows nothing of its own fold's rows. If any row's
    stacker prediction came from embeddings of a model that saw the row, the OOF score would be
    perfect; laid out leak-free, it stays at chance."""
    rng = np.random.default_rng(1)
    n, n_test = 300, 30
    y = rng.permutation(np.arange(n) % 3)
    folds = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "label": [str(c) for c in y], "target": y,
                          "fold": assign_folds(n, rng)})
    test = pd.DataFrame({"id": [f"t{i}" for i in range(n_test)]})
    cfg = make_cfg(tmp_path)
    train_embs = []
    for k in range(N_FOLDS):
        seen = (folds["fold"] != k).to_numpy()[:, None]
        emb = np.where(seen, 3.0 * np.eye(3)[y], rng.normal(size=(n, 3)))  # memorised vs never seen
        train_embs.append(np.hstack([emb, rng.normal(size=(n, 2))]))
    write_features(cfg, folds, test, train_embs, [rng.normal(size=(n_test, 5)) for _ in range(N_FOLDS)])
    result = run_stacking(cfg, folds, test)
    oof = pd.read_csv(tmp_path / "models" / "syn_lgbm" / "oof.csv")
    assert (oof.set_index("id").loc[folds["id"], "fold"].to_numpy() == folds["fold"].to_numpy()).all()
    assert result["cv"] < 0.5  # chance is 1/3; a leak would give 1.0


@pytest.mark.parametrize("stacker", ["svr", "logistic"])
def test_sklearn_heads(stacker, classification_data):
    cfg, folds, test, _ = classification_data
    cfg = make_cfg(Path(cfg.models_dir).parent, stacker=stacker)
    result = run_stacking(cfg, folds, test)
    assert result["importance"] is None and result["cv"] > 0.8
    out = Path(cfg.models_dir) / f"syn_{stacker}"
    assert (out / "oof.csv").exists() and (out / "test.csv").exists()


def test_svr_regression_with_text_metadata(tmp_path):
    rng = np.random.default_rng(2)
    n = 200
    target = rng.normal(50, 15, n)
    folds = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "score": target, "target": target,
                          "site": rng.choice(["a", "b"], n), "fold": assign_folds(n, rng)})
    test = pd.DataFrame({"id": ["t0", "t1"], "site": ["a", "c"]})  # 'c' never seen in training
    cfg = make_cfg(tmp_path, task="regression", metric="rmse", target_col="score", stacker="svr", stack_c=10.0,
                   metadata_cols=["site"])
    embs = [np.column_stack([target / 15 + rng.normal(0, 0.2, n), rng.normal(size=(n, 3))]) for _ in range(N_FOLDS)]
    write_features(cfg, folds, test, embs, [rng.normal(size=(2, 4)) for _ in range(N_FOLDS)])
    result = run_stacking(cfg, folds, test)
    assert result["cv"] < target.std() * 0.6


@pytest.mark.parametrize("stacker", ["svr", "logistic"])
def test_regression_heads_learn_on_the_targets_own_scale(tmp_path, stacker):
    """A Pawpularity-like target (1-100): the heads see it standardised, so the default C fits."""
    rng = np.random.default_rng(4)
    n = 240
    latent = rng.normal(size=n)
    target = np.clip(38 + 20 * latent + rng.normal(0, 3, n), 1, 100)
    folds = pd.DataFrame({"id": np.arange(n), "Pawpularity": target, "target": target, "fold": assign_folds(n, rng)})
    test = pd.DataFrame({"id": [n, n + 1]})
    cfg = make_cfg(tmp_path, task="regression", metric="rmse", target_col="Pawpularity", stacker=stacker)
    embs = [np.column_stack([latent + rng.normal(0, 0.1, n), rng.normal(size=(n, 7))]) for _ in range(N_FOLDS)]
    write_features(cfg, folds, test, embs, [rng.normal(size=(2, 8)) for _ in range(N_FOLDS)])
    assert run_stacking(cfg, folds, test)["cv"] < 0.5 * target.std()  # unscaled, SVR(C=1) scored 0.8


def test_pca_is_fitted_per_fold_and_keeps_the_signal(classification_data):
    cfg, folds, test, _ = classification_data
    cfg = make_cfg(Path(cfg.models_dir).parent, stack_pca=3)
    result = run_stacking(cfg, folds, test)
    assert set(result["importance"]["feature"]) == {"pca_0", "pca_1", "pca_2"}
    assert result["cv"] > 0.8


def test_frozen_pretrained_backbone_features(tmp_path):
    from helpers.data import read_test, read_train
    from helpers.tools.demo import write_digits
    from helpers.folds import get_folds
    from helpers.stacking import extract_features

    comp = write_digits(tmp_path / "comp", size=16, n=120)
    cfg = make_cfg(tmp_path, competition_dir=str(comp), features_from="pretrained", pretrained=False, arch="timm",
                   model_name="resnet18", img_size=32, num_workers=0, cache_dir=str(tmp_path / "cache"), n_folds=2)
    folds, test = get_folds(cfg, read_train(cfg)), read_test(cfg)
    extract_features(cfg, folds, test)
    assert np.load(artifacts.feature_path(cfg, "train", None)).shape == (len(folds), 512)
    assert not artifacts.feature_path(cfg, "train", 0).exists()
    result = run_stacking(cfg, folds, test)  # every fold's stacker reads the one frozen set
    assert 0 <= result["cv"] <= 1


def test_embeddings_are_never_computed_in_bf16(tmp_path, monkeypatch):
    """They are stored as float16; bf16 would keep 8 bits of their mantissa, not 11. Where
    training runs in bf16 (here a CPU said to compute it natively), 03_features and the
    Predictor embed in fp32; fp16 autocast (a T4) stays."""
    import torch

    import helpers.engine as engine
    from helpers import runtime
    from helpers.data import read_test, read_train
    from helpers.folds import get_folds
    from helpers.stacking import extract_features
    from helpers.tools.demo import write_digits

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    cpu = torch.device("cpu")
    assert runtime.autocast(CFG(), cpu).fast_dtype == torch.bfloat16  # what training runs in
    assert not isinstance(runtime.autocast(CFG(), cpu, bf16=False), torch.autocast)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert runtime.autocast(CFG(), torch.device("cuda"), bf16=False).fast_dtype == torch.float16
    seen = []
    real = engine.amp_context

    def spy(dtype, device):
        if dtype is torch.bfloat16:
            pytest.fail("embeddings under training's autocast")
        seen.append(1)
        return real(dtype, device)
    monkeypatch.setattr(engine, "amp_context", spy)
    comp = write_digits(tmp_path / "comp", size=16, n=120)
    cfg = make_cfg(tmp_path, competition_dir=str(comp), features_from="pretrained", pretrained=False, arch="timm",
                   model_name="resnet18", img_size=32, num_workers=0, cache_dir=str(tmp_path / "cache"), n_folds=2)
    extract_features(cfg, get_folds(cfg, read_train(cfg)), read_test(cfg))
    assert seen and np.isfinite(np.load(artifacts.feature_path(cfg, "train", None))).all()


@pytest.mark.parametrize("stacker", ["lgbm", "svr", "logistic"])
def test_a_saved_stacker_loads_without_pickle_and_predicts_the_same(stacker, tmp_path):
    """What the offline package loads: LightGBM's text model, skops files, JSON; never a pickle.
    Text metadata included (LightGBM's categories, scikit-learn's one-hot)."""
    from helpers.stacking import FoldStacker

    rng = np.random.default_rng(4)
    n = 150
    y = rng.integers(0, 3, n)
    emb = np.eye(3)[y] * 2 + rng.normal(size=(n, 3))
    rows = pd.DataFrame({"site": rng.choice(["a", "b", "c"], n), "age": rng.normal(size=n)})
    cfg = make_cfg(tmp_path, stacker=stacker, metadata_cols=["site", "age"], stack_pca=2)
    fitted = FoldStacker(cfg, 3).fit(cfg, emb[:100], rows[:100], y[:100], seed=0)
    fitted.save(tmp_path / "stacker_fold0")
    files = sorted(p.name for p in (tmp_path / "stacker_fold0").iterdir())
    assert "meta.json" in files and "pca.skops" in files and not any(f.endswith((".joblib", ".pkl")) for f in files)
    loaded = FoldStacker.load(tmp_path / "stacker_fold0")
    np.testing.assert_allclose(loaded.predict(emb[100:], rows[100:].reset_index(drop=True)),
                               fitted.predict(emb[100:], rows[100:].reset_index(drop=True)), atol=1e-9)


def test_a_skops_file_with_a_foreign_type_is_refused(tmp_path):
    import skops.io as sio

    from helpers.stacking import _skops_load

    import os

    sio.dump({"f": os.system}, tmp_path / "model0.skops")  # a function: what a crafted file would call
    with pytest.raises(ValueError, match="not loaded: it holds types"):
        _skops_load(tmp_path / "model0.skops")
