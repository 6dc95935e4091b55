"""helpers.config: defaults, YAML and experiments, overrides, typed checks, save/load round trip."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from helpers.config import CFG, experiment_names, load_cfg, load_saved_cfg, parse_set, save_cfg


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
    cfg = load_cfg()
    assert cfg == CFG()
    assert cfg.task == "classification" and cfg.metric == "accuracy"
    assert cfg.n_folds == 5 and cfg.epochs == 10 and cfg.lr == pytest.approx(1e-3)
    assert cfg.arch == "timm" and cfg.pretrained is False
    assert cfg.fold_ids == [0, 1, 2, 3, 4]


def test_yaml_overrides_defaults_and_keeps_the_rest(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"epochs": 3, "lr": 0.5, "metadata_cols": ["a", "b"],
                                             "models_dir": str(tmp_path / "models"), "experiment": "mine"})
    cfg = load_cfg(path)
    assert cfg.epochs == 3
    assert cfg.lr == 0.5
    assert cfg.metadata_cols == ["a", "b"]
    assert cfg.experiment == "mine"
    assert cfg.exp_dir == tmp_path / "models" / "mine"
    # untouched keys keep their defaults
    assert cfg.batch_size == CFG().batch_size and cfg.seed == CFG().seed


def test_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_cfg(str(path)) == CFG()


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
    path = write_yaml(tmp_path / "c.yaml", {"epochs": 2})
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
        load_cfg(overrides={"epoch": 3})
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
                                        ("trn_fold", "folds"), ("apex", "amp"), ("gradient_accumulation_steps", "grad_accum")])
def test_unknown_key_from_a_kaggle_cfg_notebook_suggests_ours(name, ours):
    with pytest.raises(KeyError, match=f"did you mean {ours}\\b"):
        load_cfg(overrides={name: 1})


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
        load_cfg(overrides={key: value})
    assert f"'{key}'" in str(e.value)


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"batch_size": "big"})
    with pytest.raises(TypeError, match="batch_size"):
        load_cfg(path)


def test_int_accepted_for_float_fields():
    cfg = load_cfg(overrides={"lr": 1, "grad_clip": 0})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.grad_clip == 0.0 and isinstance(cfg.grad_clip, float)


def test_tuple_accepted_for_list_fields():
    cfg = load_cfg(overrides={"folds": (0, 2)})
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
        load_cfg(overrides={key: value})
    assert f"'{key}'" in str(e.value)
    assert value in str(e.value)


def test_regression_needs_rmse():
    with pytest.raises(ValueError, match="metric"):
        load_cfg(overrides={"task": "regression", "metric": "accuracy"})
    assert load_cfg(overrides={"task": "regression", "metric": "rmse"}).task == "regression"


def test_folds_out_of_range_and_too_few_folds():
    with pytest.raises(ValueError, match="folds"):
        load_cfg(overrides={"n_folds": 3, "folds": [0, 3]})
    with pytest.raises(ValueError, match="n_folds"):
        load_cfg(overrides={"n_folds": 1})


def test_num_heads_must_divide_emb_dim():
    with pytest.raises(ValueError, match="num_heads"):
        load_cfg(overrides={"emb_dim": 24, "num_heads": 5})


# --- --set parsing -------------------------------------------------------------------------
def test_parse_set_types():
    out = parse_set(["epochs=3", "lr=0.1", "folds=[0,1]", "debug=true", "model_name=resnet34", "image_ext="])
    assert out == {"epochs": 3, "lr": 0.1, "folds": [0, 1], "debug": True, "model_name": "resnet34", "image_ext": ""}
    assert isinstance(out["epochs"], int) and not isinstance(out["epochs"], bool)
    assert isinstance(out["lr"], float)
    assert out["debug"] is True
    cfg = load_cfg(overrides=out)
    assert (cfg.epochs, cfg.lr, cfg.folds, cfg.debug) == (3, 0.1, [0, 1], True)


def test_parse_set_value_may_contain_equals():
    assert parse_set(["experiment=a=b"]) == {"experiment": "a=b"}


def test_parse_set_without_equals_is_an_error():
    with pytest.raises(ValueError, match="epochs"):
        parse_set(["epochs"])


def test_scientific_notation_float():
    cfg = load_cfg(overrides=parse_set(["lr=1e-3"]))
    assert cfg.lr == pytest.approx(1e-3)


# --- snapshot round trip -------------------------------------------------------------------
def test_save_then_load_saved_round_trip(tmp_path):
    cfg = load_cfg(overrides={"models_dir": str(tmp_path / "models"), "experiment": "roundtrip", "epochs": 4,
                              "lr": 3e-4, "min_lr": 1e-7, "metadata_cols": ["ink", "site"], "folds": [1, 2],
                              "pretrained": True, "group_col": "patient", "arch": "hybrid"})
    path = save_cfg(cfg)
    assert path == tmp_path / "models" / "roundtrip" / "config.yaml"
    assert path.exists()
    loaded = load_saved_cfg(cfg.exp_dir)
    assert loaded == cfg
    assert dataclasses.asdict(loaded) == dataclasses.asdict(cfg)
    assert isinstance(loaded.lr, float) and loaded.min_lr == pytest.approx(1e-7)
    # nothing but the snapshot was written
    assert sorted(p.name for p in cfg.exp_dir.iterdir()) == ["config.yaml"]


def test_save_cfg_to_explicit_path(tmp_path):
    cfg = CFG(models_dir=str(tmp_path / "models"), epochs=2)
    path = save_cfg(cfg, tmp_path / "elsewhere" / "config.yaml")
    assert path.exists()
    assert load_saved_cfg(tmp_path / "elsewhere").epochs == 2
    assert not (tmp_path / "models").exists()


def test_outputs_leave_a_read_only_repository(tmp_path, monkeypatch):
    """The repository added to a Kaggle kernel as a dataset is read-only: relative output
    folders (models/, submissions/, .cache/) go to the working directory instead."""
    import os

    from helpers import config

    assert config.under_root("models") == config.ROOT / "models"
    real_access = os.access
    monkeypatch.setattr(config.os, "access", lambda p, mode: False if Path(p) == config.ROOT else real_access(p, mode))
    monkeypatch.chdir(tmp_path)
    cfg = CFG(experiment="kg")
    assert cfg.exp_dir == tmp_path / "models" / "kg"
    assert config.under_root(cfg.cache_dir) == tmp_path / ".cache"
    assert config.under_root("/abs/models") == Path("/abs/models")
    assert cfg.path(cfg.train_csv) == config.ROOT / "inputs" / "digits" / "train.csv"  # inputs are only read
