"""helpers.config: defaults, YAML and experiments, overrides, typed checks, save/load round trip."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from helpers import artifacts, freshness
from helpers.artifacts import read_config, save_config
from helpers.config import CFG, experiment_names, load_cfg
from helpers.configfile import parse_set


def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@pytest.fixture
def multi_yaml(tmp_path):
    """A config file with shared settings and two experiments."""
    return write_yaml(tmp_path / "multi.yaml", {
        "competition_dir": str(tmp_path / "comp"),
        "models_dir": str(tmp_path / "models"),
        "epochs": 7,
        "lr": 0.002,
        "experiments": {
            "exp_resnet": {"arch": "timm", "model_name": "resnet34"},
            "exp_hybrid": {"arch": "hybrid", "img_size": 64, "epochs": 3},
        },
    })


# --- defaults and YAML ---------------------------------------------------------------------
def test_defaults_without_a_file():
    cfg = load_cfg(overrides={"competition_dir": "comp"})
    assert cfg == CFG(competition_dir="comp")
    assert cfg.task == "classification" and cfg.metric == "accuracy"
    assert cfg.n_folds == 5 and cfg.epochs == 10 and cfg.lr == pytest.approx(1e-3)
    assert cfg.arch == "timm" and cfg.pretrained is True  # fine-tuning by default (helpers.weights finds the weights)
    assert cfg.fold_ids == [0, 1, 2, 3, 4]


def test_yaml_overrides_defaults_and_keeps_the_rest(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"competition_dir": "comp", "epochs": 3, "lr": 0.5, "metadata_cols": ["a", "b"],
                                             "models_dir": str(tmp_path / "models"), "experiment": "mine"})
    cfg = load_cfg(path)
    assert cfg.epochs == 3
    assert cfg.lr == 0.5
    assert cfg.metadata_cols == ["a", "b"]
    assert cfg.experiment == "mine"
    assert artifacts.exp_dir(cfg) == tmp_path / "models" / "mine"
    # untouched keys keep their defaults
    assert cfg.batch_size == CFG().batch_size and cfg.seed == CFG().seed


def test_a_config_without_competition_dir_is_an_error_naming_the_key(tmp_path):
    """No silent demo: a user YAML that forgets competition_dir must not train on the digits."""
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ValueError, match="config key 'competition_dir' is not set"):
        load_cfg(str(path))
    path = write_yaml(tmp_path / "mine.yaml", {"target_col": "label", "epochs": 3})
    with pytest.raises(ValueError, match="competition_dir"):
        load_cfg(path)
    from helpers.config import ROOT
    assert load_cfg(ROOT / "configs" / "digits.yaml").competition_dir == "inputs/digits"  # only the demo's own config


@pytest.mark.parametrize("key, place", [("patch_size", "model_kwargs"), ("emb_dim", "model_kwargs"),
                                        ("lgbm_n_estimators", "lgbm_params"), ("lgbm_early_stopping", "lgbm_params")])
def test_a_flat_key_that_moved_names_its_new_place(tmp_path, key, place):
    path = write_yaml(tmp_path / "old.yaml", {"competition_dir": "comp", key: 8})
    with pytest.raises(KeyError, match=f"config key '{key}' has moved: set it under {place}"):
        load_cfg(path)


def test_a_saved_config_with_moved_keys_is_carried_to_their_new_place():
    from helpers.config import cfg_from_dict, to_dict

    old = {**to_dict(CFG(arch="hybrid")), "patch_size": 8, "emb_dim": 16, "lgbm_n_estimators": 30}
    del old["model_kwargs"], old["lgbm_params"]
    cfg = cfg_from_dict(old)
    assert cfg.model_kwargs == {"patch_size": 8, "emb_dim": 16} and cfg.lgbm_params == {"n_estimators": 30}


def test_missing_yaml_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_cfg(str(tmp_path / "nope.yaml"))


def test_experiments_first_is_the_default(multi_yaml):
    cfg = load_cfg(multi_yaml)
    assert cfg.experiment == "exp_resnet"
    assert cfg.model_name == "resnet34"
    assert cfg.epochs == 7  # shared setting
    assert cfg.lr == pytest.approx(0.002)
    assert experiment_names(multi_yaml) == ["exp_resnet", "exp_hybrid"]


def test_experiments_pick_by_name(multi_yaml):
    cfg = load_cfg(multi_yaml, experiment="exp_hybrid")
    assert cfg.experiment == "exp_hybrid"
    assert cfg.arch == "hybrid"
    assert cfg.img_size == 64
    assert cfg.epochs == 3  # the experiment's own setting beats the shared one
    assert cfg.lr == pytest.approx(0.002)  # shared setting still applies
    assert cfg.model_name == CFG().model_name  # the other experiment's setting does not leak


def test_unknown_experiment_name_is_an_error(multi_yaml):
    with pytest.raises(KeyError) as e:
        load_cfg(multi_yaml, experiment="exp_nope")
    msg = str(e.value)
    assert "exp_nope" in msg
    assert "exp_resnet" in msg and "exp_hybrid" in msg


def test_experiment_name_without_experiments_mapping(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"competition_dir": "comp", "epochs": 2})
    assert load_cfg(path, experiment="named").experiment == "named"
    assert experiment_names(path) == [CFG().experiment]


def test_overrides_win_over_yaml_and_experiment(multi_yaml):
    cfg = load_cfg(multi_yaml, experiment="exp_hybrid", overrides={"epochs": 1, "lr": 0.3, "debug": True})
    assert cfg.epochs == 1
    assert cfg.lr == pytest.approx(0.3)
    assert cfg.debug is True
    assert cfg.arch == "hybrid"


# --- checked keys and types ----------------------------------------------------------------
def test_unknown_key_in_overrides_names_it_and_suggests():
    with pytest.raises(KeyError) as e:
        load_cfg(overrides={"competition_dir": "comp", "epoch": 3})
    msg = str(e.value)
    assert "'epoch'" in msg
    assert "epochs" in msg  # close match suggested


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("epochs: 3\nlr: [0.1\nseed: 1\n")
    with pytest.raises(ValueError, match=r"(?s)broken.yaml: not valid YAML.*broken.yaml\", line 3"):
        load_cfg(path)


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"learning_rate": 0.1})
    with pytest.raises(KeyError, match="learning_rate"):
        load_cfg(path)


@pytest.mark.parametrize("name, ours", [("learning_rate", "lr"), ("size", "img_size"), ("n_fold", "n_folds"),
                                        ("trn_fold", "folds"), ("apex", "amp_dtype"), ("gradient_accumulation_steps", "grad_accum")])
def test_unknown_key_from_a_kaggle_cfg_notebook_suggests_ours(name, ours):
    with pytest.raises(KeyError, match=f"did you mean {ours}\\b"):
        load_cfg(overrides={"competition_dir": "comp", name: 1})


def test_unknown_key_in_an_experiment_names_it(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"experiments": {"a": {"bach_size": 4}}})
    with pytest.raises(KeyError) as e:
        load_cfg(path)
    assert "bach_size" in str(e.value) and "batch_size" in str(e.value)


@pytest.mark.parametrize("key, value", [
    ("epochs", "ten"),
    ("pretrained", 1),
    ("epochs", 3.5),
    ("epochs", True),
    ("lr", "fast"),
    ("lr", True),
    ("model_name", 18),
    ("metadata_cols", "ink"),
])
def test_wrong_type_names_the_key(key, value):
    with pytest.raises(TypeError) as e:
        load_cfg(overrides={"competition_dir": "comp", key: value})
    assert f"'{key}'" in str(e.value)


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"batch_size": "big"})
    with pytest.raises(TypeError, match="batch_size"):
        load_cfg(path)


def test_int_accepted_for_float_fields():
    cfg = load_cfg(overrides={"competition_dir": "comp", "lr": 1, "grad_clip": 0})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.grad_clip == 0.0 and isinstance(cfg.grad_clip, float)


def test_mixup_off_epoch_is_an_epoch_or_a_share_of_the_schedule():
    """A time-limited run plans its epochs, so the `best` preset's Mixup stops at a share of
    them (0.8: 24 of 30, 40 of 50) rather than at epoch 24 whatever the plan; an epoch number
    stays the int it was, so what was made from it stays up to date."""
    from helpers.train import mixup_off

    epoch = load_cfg(overrides={"competition_dir": "comp", "mixup_off_epoch": 17})
    assert epoch.mixup_off_epoch == 17 and isinstance(epoch.mixup_off_epoch, int)
    assert freshness.digest(CFG(competition_dir="comp").mixup_off_epoch) == freshness.digest(0)
    assert (mixup_off(epoch, 30), mixup_off(epoch, 50)) == (17, 17)
    share = load_cfg(overrides={"competition_dir": "comp", "mixup_off_epoch": 0.8})
    assert (mixup_off(share, 30), mixup_off(share, 50), mixup_off(share, 1)) == (24, 40, 1)
    assert mixup_off(load_cfg(overrides={"competition_dir": "comp"}), 30) == 0  # never
    assert load_cfg(overrides={"competition_dir": "comp", "quality": "best"}).mixup_off_epoch == 0.8
    with pytest.raises(ValueError, match="'mixup_off_epoch' is an epoch number"):
        load_cfg(overrides={"competition_dir": "comp", "mixup_off_epoch": 2.5})


def test_tuple_accepted_for_list_fields():
    cfg = load_cfg(overrides={"competition_dir": "comp", "folds": (0, 2)})
    assert cfg.folds == [0, 2]
    assert cfg.fold_ids == [0, 2]


@pytest.mark.parametrize("key, value", [
    ("task", "segmentation"),
    ("metric", "logloss"),
    ("arch", "vit_from_scratch"),
    ("augment", "extreme"),
])
def test_invalid_choice_names_the_key(key, value):
    with pytest.raises(ValueError) as e:
        load_cfg(overrides={"competition_dir": "comp", key: value})
    assert f"'{key}'" in str(e.value)
    assert value in str(e.value)


def test_regression_needs_rmse():
    with pytest.raises(ValueError, match="metric"):
        load_cfg(overrides={"competition_dir": "comp", "task": "regression", "metric": "accuracy"})
    assert load_cfg(overrides={"competition_dir": "comp", "task": "regression", "metric": "rmse"}).task == "regression"


def test_folds_out_of_range_and_too_few_folds():
    with pytest.raises(ValueError, match="folds"):
        load_cfg(overrides={"competition_dir": "comp", "n_folds": 3, "folds": [0, 3]})
    with pytest.raises(ValueError, match="n_folds"):
        load_cfg(overrides={"competition_dir": "comp", "n_folds": 1})


def test_num_heads_must_divide_emb_dim():
    from helpers.models import model_problems

    cfg = load_cfg(overrides={"competition_dir": "comp", "arch": "hybrid", "model_kwargs": {"emb_dim": 24, "num_heads": 5}})
    assert any("model_kwargs.num_heads" in p and "emb_dim" in p for p in model_problems(cfg))
    cfg.model_kwargs = {"patch_sz": 8}
    assert any("patch_sz" in p and "patch_size" in p for p in model_problems(cfg))


# --- --set parsing -------------------------------------------------------------------------
def test_parse_set_types():
    out = parse_set(["epochs=3", "lr=0.1", "folds=[0,1]", "debug=true", "model_name=resnet34", "image_ext="])
    assert out == {"epochs": 3, "lr": 0.1, "folds": [0, 1], "debug": True, "model_name": "resnet34", "image_ext": ""}
    assert isinstance(out["epochs"], int) and not isinstance(out["epochs"], bool)
    assert isinstance(out["lr"], float)
    assert out["debug"] is True
    cfg = load_cfg(overrides={"competition_dir": "comp", **out})
    assert (cfg.epochs, cfg.lr, cfg.folds, cfg.debug) == (3, 0.1, [0, 1], True)


def test_parse_set_value_may_contain_equals():
    assert parse_set(["experiment=a=b"]) == {"experiment": "a=b"}


def test_parse_set_without_equals_is_an_error():
    with pytest.raises(ValueError, match="epochs"):
        parse_set(["epochs"])


def test_scientific_notation_float():
    cfg = load_cfg(overrides={"competition_dir": "comp", **parse_set(["lr=1e-3"])})
    assert cfg.lr == pytest.approx(1e-3)


# --- snapshot round trip -------------------------------------------------------------------
def test_save_then_load_saved_round_trip(tmp_path):
    cfg = load_cfg(overrides={"competition_dir": "comp", "models_dir": str(tmp_path / "models"), "experiment": "roundtrip", "epochs": 4,
                              "lr": 3e-4, "min_lr": 1e-7, "metadata_cols": ["ink", "site"], "folds": [1, 2],
                              "pretrained": True, "group_col": "patient", "arch": "hybrid"})
    path = save_config(cfg)
    assert path == tmp_path / "models" / "roundtrip" / "config.yaml"
    assert path.exists()
    loaded = read_config(artifacts.exp_dir(cfg))
    assert loaded == cfg
    assert dataclasses.asdict(loaded) == dataclasses.asdict(cfg)
    assert isinstance(loaded.lr, float) and loaded.min_lr == pytest.approx(1e-7)
    # nothing but the snapshot was written
    assert sorted(p.name for p in artifacts.exp_dir(cfg).iterdir()) == ["config.yaml"]


def test_save_config_to_explicit_path(tmp_path):
    cfg = CFG(models_dir=str(tmp_path / "models"), epochs=2)
    path = save_config(cfg, tmp_path / "elsewhere" / "config.yaml")
    assert path.exists()
    assert read_config(tmp_path / "elsewhere").epochs == 2
    assert not (tmp_path / "models").exists()


def test_outputs_leave_a_read_only_repository(tmp_path, monkeypatch):
    """The repository added to a Kaggle kernel as a dataset is read-only: relative output
    folders (models/, submissions/, .cache/) go to the working directory instead."""
    import os

    from helpers import config

    assert artifacts.under_root("models") == config.ROOT / "models"
    real_access = os.access
    monkeypatch.setattr(artifacts.os, "access", lambda p, mode: False if Path(p) == config.ROOT else real_access(p, mode))
    monkeypatch.chdir(tmp_path)
    cfg = CFG(experiment="kg", competition_dir="inputs/digits")
    assert artifacts.exp_dir(cfg) == tmp_path / "models" / "kg"
    assert artifacts.cache_dir(cfg) == tmp_path / ".cache"
    assert artifacts.under_root("/abs/models") == Path("/abs/models")
    assert cfg.path(cfg.train_csv) == config.ROOT / "inputs" / "digits" / "train.csv"  # inputs are only read
