"""`refit`: one more model on all rows for the folds' mean best epoch, its test predictions kept
apart from the OOF-scored folds and blended in (or alone) by the ensemble and the package."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from helpers import artifacts, budget, freshness, pipeline, planning, stages
from helpers.config import CFG, load_cfg
from helpers.data import read_test, read_train
from helpers.ensemble import Experiment, run_ensemble
from helpers.folds import get_folds
from helpers.results import REFIT_SHARE, with_refit
from helpers.tools.demo import write_digits
from helpers.train import train_fold, train_refit


def test_refit_values_and_where_it_may_be_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"competition_dir": str(tmp_path), "refit": True, "experiments": {"a": {}}}))
    assert load_cfg(path).refit == "blend"  # refit: true (YAML's on/yes too) blends
    assert load_cfg(path, overrides={"refit": False}).refit == ""
    assert load_cfg(path, overrides={"refit": "alone"}).refit == "alone"
    with pytest.raises(ValueError, match="config key 'refit' must be one of"):
        load_cfg(path, overrides={"refit": "sometimes"})
    path.write_text(yaml.safe_dump({"competition_dir": str(tmp_path), "experiments": {"a": {"refit": "alone"}}}))
    with pytest.raises(KeyError, match="'experiments.a.refit' applies to every experiment of the run"):
        load_cfg(path)
    cfg = CFG(competition_dir=str(tmp_path))
    assert "refit" not in stages.output_keys(cfg, "train")  # turning it on retrains no fold
    assert "refit" in stages.output_keys(cfg, "ensemble")  # but re-blends


def test_with_refit_blends_half_or_replaces():
    folds, refit = np.array([[0.8, 0.2], [0.4, 0.6]]), np.array([[0.2, 0.8], [0.0, 1.0]])
    assert np.allclose(with_refit(folds, refit, "blend"), (1 - REFIT_SHARE) * folds + REFIT_SHARE * refit)
    assert np.allclose(with_refit(folds, refit, "alone"), refit)


def test_a_budget_keeps_time_for_the_refit(tmp_path):
    cfg = CFG(competition_dir=str(tmp_path), models_dir=str(tmp_path / "models"), experiment="e", time_limit="100s",
              epochs=50, n_folds=2, refit="blend", pretrained=False)
    budget.open_ledger([cfg], ["e/train_fold0", "e/train_fold1", "e/train_refit"])
    ledger = budget.read_ledger(cfg)
    ledger.update(after_s=10.0)
    budget.write_ledger(cfg, ledger)
    # 100 - 10 later - 2 more kernels (18) = 72 s for 2 folds and a refit worth 1.5 (twice the rows to train,
    # none to validate): 20.6 s
    assert budget.fold_epochs(cfg, 0, elapsed_s=2.0, epoch_s=2.0, test_s=0.0) == 1 + 9
    budget.spend(cfg, "e/train_fold0", 20.0)
    budget.spend(cfg, "e/train_fold1", 20.0)
    # the refit alone: 100 - 40 - 10 = 50 s, but no more than the epochs the CV chose (cfg.epochs)
    assert budget.fold_epochs(cfg, "refit", elapsed_s=4.0, epoch_s=4.0, test_s=2.0) == 1 + 11
    assert budget.fold_epochs(CFG(**{**cfg.__dict__, "epochs": 6}), "refit", elapsed_s=4.0, epoch_s=4.0, test_s=2.0) == 6


def test_a_holdout_plans_refit_gets_twice_the_folds_epochs(tmp_path):
    """In a holdout plan (one fold and a refit, on a budget) the fold gives the CV score and the
    refit the submission: the refit is planned for HOLDOUT_REFIT times the fold's epochs."""

    cfg = CFG(competition_dir=str(tmp_path), models_dir=str(tmp_path / "models"), experiment="e", time_limit="100s",
              epochs=1000, n_folds=5, folds=[0], refit="alone", pretrained=False)
    assert budget.holdout(cfg) and budget.refit_x(cfg) == budget.HOLDOUT_REFIT == 2.0
    assert not budget.holdout(CFG(**{**cfg.__dict__, "time_limit": ""}))  # no budget: the CV's best epoch
    assert not budget.holdout(CFG(**{**cfg.__dict__, "folds": [0, 1]}))
    assert not budget.holdout(CFG(**{**cfg.__dict__, "refit": "blend"}))  # the fold's predictions count: an even split
    budget.open_ledger([cfg], ["e/train_fold0", "e/train_refit"])
    ledger = budget.read_ledger(cfg)
    ledger.update(after_s=0.0, kernels="per_experiment")
    budget.write_ledger(cfg, ledger)
    # 100 s over the fold and a refit worth 2 x 15/13 folds: the fold's share 30.2 s
    assert budget.fold_epochs(cfg, 0, elapsed_s=1.0, epoch_s=1.0, test_s=0.0) == 1 + 29
    # at 2 s an epoch that share gives it 15, under the 20 a CV score needs: an even split (46.4 s)
    # has them, so the fold gets 20 (40 s) and the refit the rest
    assert budget.fold_epochs(cfg, 0, elapsed_s=2.0, epoch_s=2.0, test_s=0.0) == 20
    assert budget.fold_epochs(cfg, 0, elapsed_s=4.0, epoch_s=4.0, test_s=0.0) == 1 + 10  # an even split: 46.4 s
    fold, refit = planning.holdout_split(cfg, 15.0)  # the plan's, from the fold's epochs at the refit's weight of 2
    assert fold == 20 and refit == pytest.approx((15 * (1 + 30 / 13) - 20) * 13 / 15)
    assert planning.holdout_split(cfg, 25.0) == pytest.approx((25.0, 50.0))
    (artifacts.fold_dir(cfg, 0)).mkdir(parents=True)
    (artifacts.fold_dir(cfg, 0) / "metrics.jsonl").write_text("{}\n" * 30)
    assert budget.refit_epochs(cfg) == 60
    assert budget.refit_epochs(CFG(**{**cfg.__dict__, "epochs": 45})) == 45  # your epochs stay the most


def test_a_refit_waiting_with_another_experiments_folds_gets_its_weighted_share(tmp_path):
    cfg = CFG(competition_dir=str(tmp_path), models_dir=str(tmp_path / "models"), experiment="a", time_limit="100s",
              epochs=50, n_folds=2, refit="blend", pretrained=False)
    budget.open_ledger([cfg], ["a/train_fold0", "a/train_fold1", "a/train_refit", "b/train_fold0", "b/train_fold1"])
    ledger = budget.read_ledger(cfg)
    ledger.update(after_s=0.0, kernels="per_experiment")  # folds one after another: one kernel per experiment
    ledger["spent"].update({"a/train_fold0": 10.0, "a/train_fold1": 10.0})
    budget.write_ledger(cfg, ledger)
    # 100 - 20 - one more kernel (b's, 9 s) = 71 s over b's 2 folds and a refit worth 1.5: the refit gets 30.4 s
    assert budget.fold_epochs(cfg, "refit", elapsed_s=1.0, epoch_s=1.0, test_s=0.0) == 1 + 29


def test_the_planner_drops_the_same_fold_from_every_experiment(tmp_path, monkeypatch):
    monkeypatch.setattr(planning, "probe", lambda cfg, n_out, steps=3: {"train_img_s": 2000.0 / cfg.img_size * (
        0.5 if cfg.experiment == "slow" else 1.0), "infer_img_s": 5000.0, "img_size": cfg.img_size})
    cfgs = [CFG(competition_dir=str(tmp_path), models_dir=str(tmp_path / "models"), experiment=name, time_limit="4min",
                n_folds=5, img_size=64, pretrained=False) for name in ("fast", "slow")]
    budget.open_ledger(cfgs, [])
    plan = planning.plan_run(cfgs, (2000, 500), [10, 10])
    assert plan["folds"]["fast"] == plan["folds"]["slow"] and len(plan["folds"]["slow"]) < 5  # the ensemble needs shared OOF rows
    assert "(every experiment)" in plan["notes"][0]


@pytest.fixture(scope="module")
def refitted(tmp_path_factory, one_torch_thread):
    tmp = tmp_path_factory.mktemp("refit")
    comp = write_digits(tmp / "comp", size=16, n=90, string_labels=True)
    cfg = CFG(competition_dir=str(comp), models_dir=str(tmp / "models"), submissions_dir=str(tmp / "subs"),
              experiment="r", n_folds=2, img_size=16, batch_size=16, epochs=3, patience=3, num_workers=0,
              model_name="resnet18", refit="blend", ensemble_method="mean", cache=False, pretrained=False)
    folds, test = get_folds(cfg, read_train(cfg)), read_test(cfg)
    results = [train_fold(cfg, folds, k, test) for k in cfg.fold_ids]
    refit = train_refit(cfg, folds, test)
    return cfg, folds, test, results, refit


def test_the_refit_trains_on_every_row_for_the_folds_mean_best_epoch(refitted):
    cfg, folds, test, results, refit = refitted
    mean_best = int(np.floor(np.mean([r["best_epoch"] for r in results]) + 0.5))
    assert refit["epochs"] == mean_best == len(artifacts.read_metrics(cfg, "refit"))
    history = artifacts.read_metrics(cfg, "refit")
    assert "metric" not in history[0] and "valid_loss" not in history[0]  # nothing held out: no score
    best = artifacts.load_checkpoint(artifacts.checkpoint_path(cfg, "refit"))
    assert best["score"] is None and best["epoch"] == mean_best
    preds = artifacts.read_predictions(cfg, "test", "refit")
    assert preds[cfg.id_col].tolist() == test[cfg.id_col].tolist()
    assert freshness.stale(cfg, "refit") is None and freshness.stale(cfg, "refit_test") is None
    assert train_refit(cfg, folds, test).get("skipped")  # up to date: kept
    assert freshness.stale(CFG(**{**cfg.__dict__, "lr": 1e-4}), "refit").startswith("lr 0.001 -> 0.0001")  # retrained


def test_the_ensemble_blends_the_refit_and_the_package_does_the_same(refitted, tmp_path):
    cfg, folds, test, results, refit = refitted
    out = run_ensemble(cfg)
    score = json.loads((artifacts.ensemble_dir(cfg) / "score.json").read_text())
    assert score["refit"] == {"r": "blend"}
    folds_test, refit_test = artifacts.read_predictions(cfg, "test"), artifacts.read_predictions(cfg, "test", "refit")
    cols = [c for c in folds_test.columns if c.startswith("prob_")]
    expected = with_refit(folds_test[cols].to_numpy(), refit_test[cols].to_numpy(), "blend")
    labels = np.array([c[len("prob_"):] for c in cols])[expected.argmax(1)]
    assert out["submission"][cfg.target_col].astype(str).tolist() == labels.tolist()
    assert out["result"]["in_sample"] == pytest.approx(json.loads((artifacts.exp_dir(cfg) / "score.json").read_text())["cv"])  # OOF only

    from helpers.package import package_ensemble, run_package

    config = tmp_path / "r.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in cfg.__dict__.items() if k in (
        "competition_dir", "models_dir", "submissions_dir", "n_folds", "img_size", "batch_size", "epochs", "patience",
        "num_workers", "model_name", "refit", "ensemble_method", "cache")} | {"experiments": {"r": {}}}))
    pkg = package_ensemble(str(config), tmp_path / "pkg")
    assert (pkg / "cnn" / "r" / "refit.safetensors").exists()
    assert json.loads((pkg / "package.json").read_text())["blend"]["members"][0]["refit"] == "blend"
    again = run_package(pkg, cfg.competition_dir)
    assert again[cfg.target_col].astype(str).tolist() == labels.tolist()

    alone = CFG(**{**cfg.__dict__, "refit": "alone"})
    assert "refit" in freshness.stale(alone, "ensemble")  # blend -> alone: the ensemble again, no training
    assert freshness.stale(alone, "refit") is None and freshness.stale(alone, "train", 0) is None
    out = run_ensemble(alone)
    alone_labels = np.array([c[len("prob_"):] for c in cols])[refit_test[cols].to_numpy().argmax(1)]
    assert out["submission"][cfg.target_col].astype(str).tolist() == alone_labels.tolist()


def test_the_runner_trains_the_refit_after_the_folds(tmp_path):
    comp = write_digits(tmp_path / "comp", size=16, n=60, string_labels=True)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"competition_dir": str(comp), "models_dir": str(tmp_path / "models"), "n_folds": 3,
                                    "refit": "alone", "experiments": {"a": {}, "b": {"img_size": 32}}}))
    jobs = pipeline.plan(str(path), {})
    train = [(j.cfg.experiment, j.parameters["fold"]) for j in jobs if j.stage == "02_train"]
    assert train == [("a", 0), ("a", 1), ("a", 2), ("a", "refit"), ("b", 0), ("b", 1), ("b", 2), ("b", "refit")]
    refit_job = next(j for j in jobs if j.parameters.get("fold") == "refit")
    assert refit_job.label == "02_train refit (all rows) [a]" and refit_job.output.name == "02_train_refit.ipynb"
    assert "refit/best.pt not made yet" in pipeline.stale(refit_job)
    assert [j.stage for j in pipeline.plan(str(path), {"refit": False})].count("02_train") == 6
    merged = pipeline.one_kernel(jobs, force=True)  # one after another on one device: one kernel per experiment
    train = [j for j in merged if j.stage == "02_train"]
    assert [j.label for j in train] == ["02_train folds 0, 1, 2 + refit (all rows) [a]", "02_train folds 0, 1, 2 + refit (all rows) [b]"]
    assert train[0].parameters["fold"] == [0, 1, 2, "refit"] and train[0].output.name == "02_train_fold0_fold1_fold2_refit.ipynb"
    assert [j.stage for j in merged] == [j.stage for j in jobs if j.stage != "02_train" or j.parameters["fold"] == 0
                                         ] and "would" not in str(pipeline.stale(train[1]))


def test_a_refit_the_time_left_cuts_short_is_skipped_and_the_folds_blend_alone(refitted, tmp_path, monkeypatch, caplog):
    import shutil


    cfg, folds, test, results, refit = refitted
    timed = CFG(**{**cfg.__dict__, "models_dir": str(tmp_path / "models"), "time_limit": "100s"})
    shutil.copytree(artifacts.exp_dir(cfg), artifacts.exp_dir(timed))  # the folds, trained; no refit yet
    shutil.rmtree(artifacts.exp_dir(timed) / "refit")
    ledger = budget.open_ledger([timed], ["r/train_refit"])
    ledger.update(rows=[len(folds), len(test)], rates={"r": {"train_img_s": 1.0, "infer_img_s": 1.0}})  # slow epochs foretold
    budget.write_ledger(timed, ledger)
    budget.spend(timed, "r/earlier", 80.0)  # 20 s left, less the later stages: not enough
    monkeypatch.setattr(budget, "refit_epochs", lambda c: 4)
    monkeypatch.setattr(budget, "folds_epochs", lambda c: 4.0)  # the CV chose 4
    assert train_refit(timed, folds, test) is None
    assert "refit: skipped, the time left gives it 1 epoch(s), less than 75% of the 4 the folds ran" in caplog.text
    assert not artifacts.checkpoint_path(timed, "refit").exists() and freshness.stale(timed, "refit")
    out = run_ensemble(timed)  # with time_limit a missing refit is no error: the folds alone
    assert json.loads((artifacts.ensemble_dir(timed) / "score.json").read_text())["refit"] == {}
    assert "its refit is not in the blend" in caplog.text and len(out["submission"]) == len(test)


def test_the_refit_follows_its_folds_schedule_and_stops_where_they_chose(refitted, tmp_path, monkeypatch):
    """The folds ran a schedule of `epochs` and their best epoch came before its end: the refit
    runs the same schedule (the same learning rate after each epoch) and stops at that epoch,
    rather than a schedule squeezed into fewer epochs that no fold ran."""
    import shutil

    cfg, folds, test, results, refit = refitted
    again = CFG(**{**cfg.__dict__, "models_dir": str(tmp_path / "models")})
    shutil.copytree(artifacts.exp_dir(cfg), artifacts.exp_dir(again))
    shutil.rmtree(artifacts.exp_dir(again) / "refit")
    monkeypatch.setattr(budget, "refit_epochs", lambda c: 2)  # the folds' mean best epoch: 2 of their 3
    assert train_refit(again, folds)["epochs"] == 2
    fold_lr = [row["lr"] for row in artifacts.read_metrics(again, 0)]
    refit_lr = [row["lr"] for row in artifacts.read_metrics(again, "refit")]
    assert len(refit_lr) == 2 and refit_lr == pytest.approx(fold_lr[:2])
    assert refit_lr[-1] > cfg.min_lr * 1.5  # not annealed to the end: the folds' best came mid-schedule


def test_a_refit_whose_first_epoch_paid_for_start_up_is_judged_on_its_second(refitted, tmp_path, monkeypatch):
    """A refit in a kernel of its own (folds on several GPUs, Ray) pays CUDA's start in its first
    epoch (6.4 s against 0.5 s on an H100): judged on it, it would be skipped for want of time
    it has. Slower than twice what the probe foretold, it trains a second epoch and is planned
    (and judged) from that."""
    import shutil
    import time

    from helpers import train

    cfg, folds, test, results, refit = refitted
    timed = CFG(**{**cfg.__dict__, "models_dir": str(tmp_path / "models"), "time_limit": "100s"})
    shutil.copytree(artifacts.exp_dir(cfg), artifacts.exp_dir(timed))
    shutil.rmtree(artifacts.exp_dir(timed) / "refit")
    ledger = budget.open_ledger([timed], ["r/train_refit"])
    ledger.update(rows=[len(folds), len(test)], after_s=0.0,
                  rates={"r": {"train_img_s": 1e5, "infer_img_s": 1e5}})  # fast epochs foretold
    budget.write_ledger(timed, ledger)
    budget.spend(timed, "r/earlier", 88.0)  # 12 s left: a 6 s first epoch says 2 of 4 epochs fit
    plain, calls = train.train_one_epoch, []

    def start_up(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(6.0)
        return plain(*a, **k)

    monkeypatch.setattr(train, "train_one_epoch", start_up)
    monkeypatch.setattr(budget, "refit_epochs", lambda c: 4)
    monkeypatch.setattr(budget, "folds_epochs", lambda c: 4.0)  # the CV chose 4
    from helpers.utils import get_logger

    assert train_refit(timed, folds, test, get_logger("kaggle", artifacts.log_path(timed))) is not None
    log = artifacts.log_path(timed).read_text()
    assert "skipped" not in log and "the refit gets 2 epoch(s) of 6" in log and "planned again after epoch 2" in log
    assert artifacts.load_checkpoint(artifacts.checkpoint_path(timed, "refit"))["epoch"] == 4


def test_the_predictor_uses_the_refit_as_the_ensemble_did(refitted):
    from helpers.predict import Predictor

    cfg, folds, test, results, refit = refitted
    run_ensemble(cfg)  # refit: blend, in the ensemble's score.json
    folds_test, refit_test = artifacts.read_predictions(cfg, "test"), artifacts.read_predictions(cfg, "test", "refit")
    cols = [c for c in folds_test.columns if c.startswith("prob_")]
    folds_p, refit_p = folds_test[cols].to_numpy(), refit_test[cols].to_numpy()
    paths = test["path"].tolist()
    for mode, expected in ((None, with_refit(folds_p, refit_p, "blend")), ("alone", refit_p), ("", folds_p)):
        predictor = Predictor.from_experiment(artifacts.exp_dir(cfg), device="cpu", refit=mode)
        preds, errors = predictor.predict_array(paths)
        assert not errors and len(predictor.models) == {None: 3, "alone": 1, "": 2}[mode]
        np.testing.assert_allclose(preds, expected, atol=1e-3)


def test_one_trained_fold_hill_climbs_on_parts_of_it(refitted, caplog):
    """`folds: [0]` (a quick first run, Kaggle's trn_fold, or time_limit's holdout plan): there is
    no other fold to judge the weights on; hill climbing judges them on parts of the fold's rows."""
    cfg, folds, test, results, refit = refitted
    one = CFG(**{**cfg.__dict__, "folds": [0], "ensemble_method": "hill", "refit": ""})
    with caplog.at_level("INFO", logger="kaggle"):
        out = run_ensemble(one)
    assert "judged on 5 parts" in caplog.text and out["result"]["method"] == "hill"
    assert len(out["submission"]) == len(test) and out["result"]["held_out"] <= out["result"]["in_sample"] + 1e-9


def test_holdout_parts_are_stratified_and_judge_honestly():
    from helpers.ensemble import fit_ensemble
    from helpers.metrics import holdout_parts

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    parts = holdout_parts(y, len(y))
    assert sorted(np.unique(parts)) == list(range(5))
    for c in range(3):  # every part holds about a fifth of each class
        share = np.bincount(parts[y == c], minlength=5) / (y == c).sum()
        assert np.all(np.abs(share - 0.2) < 0.03)
    assert len(np.unique(holdout_parts(rng.normal(size=50), 50))) == 5  # a regression target: plain KFold
    assert len(np.unique(holdout_parts(rng.integers(0, 5, 40) / 4.0, 40))) == 5  # scores 0, 0.25, ..., 1: values, not classes
    assert len(np.unique(holdout_parts(rng.integers(0, 2, (30, 4)), 30))) == 5  # multi-label rows
    assert sorted(np.unique(holdout_parts(np.array([0, 1, 1]), 3))) == [0, 1, 2]  # fewer rows than parts
    good = np.eye(3)[y] * 0.6 + 0.4 / 3
    noise = rng.dirichlet(np.ones(3), len(y))
    models = [Experiment("good", good, good[:10], 0.0), Experiment("noise", noise, noise[:10], 0.0)]
    result = fit_ensemble(models, y, np.zeros(len(y), dtype=int), "accuracy", "hill", 20)
    assert result["held_out"] == pytest.approx(1.0) and result["weights"][0] > 0.5
