"""Faults and bad input, round three: a NaN is never trained on, written, scored or blended;
nothing the user made is deleted; no id reads outside its image folder; no file we load runs
code; names the project uses itself, keys given twice, labels that look like missing values,
multi-label shapes, and the problems that used to surface late or as a traceback."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from helpers import artifacts, check, executors, freshness, pipeline
from helpers.config import CFG, load_cfg
from helpers.configfile import parse_set, read_yaml
from helpers.data import read_test, read_train
from helpers.folds import get_folds
from helpers.images import read_image
from helpers.tools.demo import NAMES, write_digits, write_multilabel_digits

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def comp(tmp_path):
    return write_digits(tmp_path / "comp", size=16, n=60, string_labels=True)


def cfg_for(comp, tmp_path, **kw) -> CFG:
    return CFG(**{**dict(competition_dir=str(comp), models_dir=str(tmp_path / "models"), submissions_dir=str(tmp_path / "subs"),
                         cache_dir=str(tmp_path / "cache"), n_folds=2, epochs=1, img_size=16, batch_size=16, num_workers=0,
                         pretrained=False),
                  **kw})


def write_config(tmp_path, comp, **extra) -> Path:
    config = {"competition_dir": str(comp), "models_dir": str(tmp_path / "models"), "submissions_dir": str(tmp_path / "subs"),
              "cache_dir": str(tmp_path / "cache"), "n_folds": 2, "epochs": 1, "img_size": 16, "num_workers": 0,
              "pretrained": False, **extra}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- 1. NaN ------------------------------------------------------------------------------------------
def test_a_diverging_fold_stops_naming_itself_and_writes_nothing(comp, tmp_path):
    from helpers.engine import Diverged
    from helpers.train import train_fold

    cfg = cfg_for(comp, tmp_path, lr=1e30, warmup_epochs=0)
    with pytest.raises(Diverged) as e:
        train_fold(cfg, get_folds(cfg, read_train(cfg)), 0, read_test(cfg))
    message = str(e.value)
    assert "exp fold 0 diverged in epoch 1" in message and "NaN or inf" in message and "config key 'lr'" in message
    fold = artifacts.exp_dir(cfg)
    assert not (fold / "fold0" / "best.pt").exists()  # was an all-NaN best.pt
    assert not list(fold.glob("oof_fold0.csv")) and not list(fold.glob("test_fold0.csv"))
    assert freshness.stale(cfg, "train", 0) is not None  # not recorded as trained


def test_a_step_with_nan_gradients_is_skipped_on_the_cpu(comp, tmp_path):
    """What oneDNN's bf16 kernel did now and then: one step's gradients NaN. Skipped, as a
    GradScaler skips one; the weights stay finite and the epoch says so."""
    from helpers.data import create_loader
    from helpers.engine import divergence, rules_of, train_one_epoch
    from helpers.models import create_model
    from helpers.runtime import create_scaler
    from helpers.transforms import InputNorm, input_stats

    cfg = cfg_for(comp, tmp_path, amp_dtype="fp32", grad_clip=0.0)
    folds = get_folds(cfg, read_train(cfg))
    model = create_model(cfg, 10)
    first = next(model.parameters())
    poisoned = []
    first.register_hook(lambda g: (poisoned.append(1), g * float("nan"))[1] if not poisoned else g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    from timm.scheduler import create_scheduler_v2

    scheduler = create_scheduler_v2(optimizer, num_epochs=1, step_on_epochs=False, updates_per_epoch=4)[0]
    health = {}
    loss = train_one_epoch(model, create_loader(cfg, folds, train=True), torch.nn.CrossEntropyLoss(), optimizer, scheduler,
                           create_scaler(cfg, torch.device("cpu")), torch.device("cpu"), 0, rules_of(cfg, torch.device("cpu")),
                           InputNorm(input_stats(cfg), "cpu"), health=health)
    assert health["skipped"] == 1 and health["steps"] > 1 and np.isfinite(loss)
    assert divergence(model, loss, health) is None  # one step of two skipped: the fold goes on
    assert divergence(model, loss, {"skipped": 2, "steps": 2}).startswith("every one of its 2 steps")


def test_tiny_images_train_in_fp32_on_a_bf16_cpu(comp, tmp_path, monkeypatch, caplog):
    """The cause of the NaN folds: at 16 px a ResNet's layer4 convolution (stride 2) sees a 1x1
    map, whose bf16 weight gradient oneDNN sometimes computes from memory it never wrote."""
    from helpers import runtime
    from helpers.models import create_model, one_pixel_strided_convs
    from helpers.runtime import cpu_precision

    model = create_model(cfg_for(comp, tmp_path, model_name="resnet18"), 3)
    assert one_pixel_strided_convs(model, 16, 3) == ["backbone.layer4.0.conv1", "backbone.layer4.0.downsample.0"]
    assert one_pixel_strided_convs(model, 32, 3) == []
    monkeypatch.setattr(runtime, "cpu_bf16", lambda: True)  # a CPU with native bf16, as this machine
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO):
        assert cpu_precision(cfg_for(comp, tmp_path), model, cpu, logging.getLogger("t")).amp_dtype == "fp32"
    assert "fp32 on this CPU, not bf16: at 16 px, backbone.layer4.0.conv1" in caplog.text
    assert cpu_precision(cfg_for(comp, tmp_path, img_size=32), model, cpu, logging.getLogger("t")).amp_dtype == "auto"
    assert cpu_precision(cfg_for(comp, tmp_path, amp_dtype="bf16"), model, cpu, logging.getLogger("t")).amp_dtype == "bf16"


def test_no_nan_is_written_scored_saved_or_blended(comp, tmp_path):
    from helpers.ensemble import collect_experiments
    from helpers.metrics import get_score

    cfg = cfg_for(comp, tmp_path)
    frame = pd.DataFrame({"id": ["a", "b"], "prob_x": [0.5, np.nan], "prob_y": [0.5, 0.5]})
    with pytest.raises(ValueError, match=r"oof_fold0.csv: 1 row\(s\) of predictions are NaN or inf \(rows \[1\]\)"):
        artifacts.write_predictions(cfg, "oof", frame, 0)
    assert not artifacts.predictions_path(cfg, "oof", 0).exists()
    with pytest.raises(ValueError, match="never scored"):
        get_score("accuracy", np.array([0, 1]), frame[["prob_x", "prob_y"]].to_numpy())
    with pytest.raises(ValueError, match="embeddings"):
        artifacts.save_features(cfg, "train", 0, np.array([[1.0, np.inf]]))
    with pytest.raises(ValueError, match="NaN or inf"):
        artifacts.save_checkpoint({"model": {"w": torch.tensor([1.0, float("nan")])}, "cfg": {}}, tmp_path / "best.pt")
    # an experiment folder whose OOF file holds a NaN (an older run, an edited file) is never blended
    exp = artifacts.exp_dir(cfg)
    exp.mkdir(parents=True)
    pd.DataFrame({"id": ["a", "b"], "label": ["x", "y"], "fold": [0, 1], "prob_x": [0.9, np.nan], "prob_y": [0.1, 0.5]}
                 ).to_csv(exp / "oof.csv", index=False)
    pd.DataFrame({"id": ["c"], "prob_x": [0.5], "prob_y": [0.5]}).to_csv(exp / "test.csv", index=False)
    (exp / "score.json").write_text(json.dumps({"data": freshness.competition_digest(cfg), "cv": 1.0}))
    with pytest.raises(ValueError, match=r"experiment 'exp': .*oof.csv: 1 row\(s\) of predictions are NaN"):
        collect_experiments(cfg)


# --- 3. ids that leave the image folder ------------------------------------------------------------
@pytest.mark.parametrize("bad_id", ["../secret/x", "a/../../secret/x", "{outside}/secret/x"])
def test_an_id_never_reads_outside_its_image_folder(comp, tmp_path, bad_id):
    secret = tmp_path / "secret"
    secret.mkdir()
    Image.new("RGB", (16, 16)).save(secret / "x.png")  # a real image: only the rule keeps it out
    (comp / "train" / "a").mkdir()
    bad_id = bad_id.format(outside=str(tmp_path))
    train = pd.read_csv(comp / "train.csv", dtype=str)
    train.loc[4, "id"] = bad_id
    train.to_csv(comp / "train.csv", index=False)
    problems = "\n".join(check.check(cfg_for(comp, tmp_path)))
    assert f"train.csv row 6 id={bad_id} leaves the image folder" in problems
    with pytest.raises(FileNotFoundError, match="leaves the image folder"):
        read_train(cfg_for(comp, tmp_path))


def test_an_animated_gif_named_by_its_id_is_found_and_read(comp, tmp_path):
    train = pd.read_csv(comp / "train.csv", dtype=str)
    first = comp / "train" / f"{train['id'][0]}.png"
    frames = [Image.open(first).convert("P"), Image.new("P", (16, 16))]
    frames[0].save(comp / "train" / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    first.unlink()
    train.loc[0, "id"] = "anim.gif"  # was "not found" though it is there
    train.to_csv(comp / "train.csv", index=False)
    assert check.check(cfg_for(comp, tmp_path)) == []
    assert read_train(cfg_for(comp, tmp_path))["path"][0].endswith("anim.gif")
    assert read_image(str(comp / "train" / "anim.gif")).shape == (16, 16, 3)


# --- 4. files that would run code -------------------------------------------------------------------
class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {_RunsCode.marker}",))


def test_a_crafted_checkpoint_is_refused_not_run(tmp_path):
    _RunsCode.marker = tmp_path / "pwned"
    path = tmp_path / "fold0" / "best.pt"
    path.parent.mkdir()
    torch.save({"model": {}, "cfg": {}, "payload": _RunsCode()}, path)
    with pytest.raises(ValueError, match="not loaded: it holds objects other than weights"):
        artifacts.load_checkpoint(path)
    assert not _RunsCode.marker.exists()
    from helpers.predict import main

    assert main([str(tmp_path), "--image", str(path)]) == 2  # the CLI: a message, no command run
    assert not _RunsCode.marker.exists()


def test_checkpoints_round_trip_without_pickled_objects(tmp_path):
    state = {"epoch": 2, "best_preds": np.random.rand(3, 2), "history": [{"epoch": 1, "metric": np.float64(0.5)}]}
    artifacts.save_checkpoint({"model": {"w": torch.ones(2)}, "cfg": CFG().__dict__, "classes": ["a", "b"], "state": state},
                              tmp_path / "last.pt")
    back = artifacts.load_checkpoint(tmp_path / "last.pt")  # weights_only=True
    np.testing.assert_allclose(np.asarray(back["state"]["best_preds"]), state["best_preds"])
    assert back["classes"] == ["a", "b"] and back["state"]["history"][0]["metric"] == 0.5


# --- 5. names the project uses itself ---------------------------------------------------------------
@pytest.mark.parametrize("names, shown", [
    (["ensemble"], "the project's ensemble folder"),
    (["a", "a_lgbm"], "experiment 'a''s stacker and experiment 'a_lgbm' would share the folder"),
    (["Results.csv"], "results table"),
    (["run", "Run"], "experiment 'run' and experiment 'Run' would share"),
])
def test_an_experiment_named_like_the_projects_own_folders_is_refused(comp, tmp_path, capsys, names, shown):
    config = write_config(tmp_path, comp, experiments={n: {} for n in names})
    assert check.main(["--config", str(config), "--no-images"]) == 1
    assert shown in capsys.readouterr().out
    assert pipeline.main(["--config", str(config)]) == 2  # before any work
    assert shown in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").rglob("*.ipynb"))


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden"])
def test_an_experiment_name_is_a_plain_folder_name(name):
    with pytest.raises(ValueError, match="config key 'experiment'"):
        load_cfg(overrides={"competition_dir": "c", "experiment": name})


# --- 6. the same key twice --------------------------------------------------------------------------
def test_the_same_experiment_or_key_twice_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("competition_dir: x\nexperiments:\n  a: {model_name: resnet18}\n  b: {}\n  a:\n    model_name: resnet34\n")
    with pytest.raises(ValueError, match=r"key 'experiments.a' is given twice, on line 3 and on line 5"):
        read_yaml(path)
    path.write_text("competition_dir: x\nepochs: 3\nlr: 0.1\nepochs: 4\n")
    with pytest.raises(ValueError, match=r"key 'epochs' is given twice, on line 2 and on line 4"):
        load_cfg(path)
    with pytest.raises(ValueError, match="gives config key 'epochs' twice"):
        parse_set(["epochs=1", "epochs=2"])


@pytest.mark.parametrize("items, shown", [(["epochs"], "--set expects key=value, got 'epochs'"),
                                          (["folds=[0"], "--set folds: not valid YAML")])
def test_a_bad_set_is_a_message_not_a_traceback(comp, tmp_path, capsys, items, shown):
    config = write_config(tmp_path, comp)
    assert pipeline.main(["--config", str(config), "--set", *items]) == 2
    assert shown in capsys.readouterr().err
    assert check.main(["--config", str(config), "--set", *items]) == 1
    assert shown in capsys.readouterr().out


# --- 7. labels that look like missing values ---------------------------------------------------------
def test_labels_named_na_none_null_are_labels(comp, tmp_path):
    train = pd.read_csv(comp / "train.csv", dtype=str)
    mapping = {"zero": "NA", "one": "None", "two": "null", "three": "nan"}
    train["label"] = train["label"].replace(mapping)
    train.to_csv(comp / "train.csv", index=False)
    cfg = cfg_for(comp, tmp_path)
    assert check.check(cfg, images=False) == []  # was "NaN in target column"
    df = read_train(cfg)
    assert {"NA", "None", "null", "nan"} <= set(df["label"])
    folds = get_folds(cfg, df)
    assert set(artifacts.read_folds(cfg)["label"]) == set(df["label"])  # read back as text too
    from helpers.submission import create_submission
    from helpers.tasks import task_of

    classes = task_of(cfg).classes(df, cfg)
    test = read_test(cfg)
    sub = create_submission(cfg, test["id"], np.eye(len(classes))[np.arange(len(test)) % len(classes)], classes)
    assert {"NA", "None"} <= set(sub["label"])
    oof = artifacts.frame_predictions(folds["id"], np.eye(len(classes))[folds["target"]], cfg, task_of(cfg).pred_columns(classes))
    oof.insert(1, "label", folds["label"].to_numpy())
    artifacts.write_predictions(cfg, "oof", oof)
    y_true, _ = task_of(cfg).oof_targets(cfg, artifacts.read_predictions(cfg, "oof"))
    np.testing.assert_array_equal(y_true, folds["target"].to_numpy())


def test_only_an_empty_cell_is_a_missing_label_and_look_alikes_are_named(comp, tmp_path):
    train = pd.read_csv(comp / "train.csv", dtype=str, keep_default_na=False)
    train.loc[3, "label"] = ""
    train.loc[[5, 8], "label"] = train.loc[7, "label"] + " "  # 'seven' and 'seven ': two classes, silently
    train.to_csv(comp / "train.csv", index=False)
    problems = "\n".join(check.check(cfg_for(comp, tmp_path), images=False))
    assert "empty cell(s) in target column 'label' (rows 5)" in problems
    label = train.loc[7, "label"]
    assert f"'{label}'" in problems and f"'{label} '" in problems and "of 'label' differ only in spaces" in problems
    assert f"'{label} ' on rows 7, 10" in problems


def test_numeric_classes_keep_their_order(tmp_path):
    from helpers.tasks import sort_labels

    assert sort_labels(["10", "2", "1", "0"]) == ["0", "1", "2", "10"]
    assert sort_labels(["b", "a", "10"]) == ["10", "a", "b"]


# --- 8. multi-label shapes ---------------------------------------------------------------------------
@pytest.fixture
def ml_comp(tmp_path):
    return write_multilabel_digits(tmp_path / "ml", n=120, size=16, n_labels=4)


def ml_cfg(comp, tmp_path, **kw) -> CFG:
    return cfg_for(comp, tmp_path, target_col="labels", task="multilabel", metric="f1_micro", **kw)


def test_a_per_label_sample_submission_is_checked_not_crashed(ml_comp, tmp_path):
    test = pd.read_csv(ml_comp / "test.csv")
    pd.DataFrame({"id": test["id"], **{n: 0 for n in NAMES[:4]}}).to_csv(ml_comp / "sample_submission.csv", index=False)
    assert check.check(ml_cfg(ml_comp, tmp_path), images=False) == []  # was TypeError: 'NoneType' object is not iterable
    pd.DataFrame({"id": test["id"], **{n: 0 for n in NAMES[:4] + ["unicorn"]}}).to_csv(ml_comp / "sample_submission.csv",
                                                                                       index=False)
    problems = "\n".join(check.check(ml_cfg(ml_comp, tmp_path), images=False))
    assert "column(s) ['unicorn'] name no training label" in problems  # found before the training, not in 05_ensemble


def test_a_label_that_holds_the_separator_says_why(ml_comp, tmp_path):
    problems = "\n".join(check.check(ml_cfg(ml_comp, tmp_path, labels=["zero", "one", "two three"]), images=False))
    assert "config key 'labels' has label(s) ['two three'] that hold label_sep ' '" in problems
    assert "0 positive row(s)" not in problems


# --- 9. found late or as a traceback ----------------------------------------------------------------
def test_a_batch_that_does_not_split_among_ddp_processes_is_a_config_error():
    with pytest.raises(ValueError, match=r"'batch_size' \(10\) must split evenly among the ddp=4 processes"):
        load_cfg(overrides={"competition_dir": "c", "batch_size": 10, "ddp": 4})


def test_more_ddp_processes_than_cores_is_found_by_the_check(comp, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _: {0, 1})
    problems = check.check_all([cfg_for(comp, tmp_path, ddp=8, batch_size=64)], images=False)
    assert any("config key 'ddp' (8) asks for more processes than the 2 CPU core(s)" in p for p in problems)


def test_executor_ray_without_ray_stops_before_any_notebook(comp, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert pipeline.main(["--config", str(write_config(tmp_path, comp)), "--executor", "ray"]) == 2
    assert "--executor ray needs Ray" in capsys.readouterr().err
    assert not (tmp_path / "models" / "exp" / "notebooks").exists()


def test_a_second_runner_on_the_same_models_folder_stops_at_once(comp, tmp_path, capsys):
    config = write_config(tmp_path, comp)
    with executors.run_lock([tmp_path / "models"], "first.yaml"):  # a run in progress
        assert pipeline.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "another run is using" in err and "config first.yaml" in err
    assert not (tmp_path / "models" / "exp" / "notebooks").exists()
    with executors.run_lock([tmp_path / "models"], "again.yaml"):  # released when the first ended
        pass


def test_solution_labels_the_training_never_saw_give_no_local_lb(comp, tmp_path, caplog):
    from helpers.submission import create_submission, local_lb
    from helpers.tasks import task_of

    cfg = cfg_for(comp, tmp_path)
    solution = pd.read_csv(comp / "solution.csv", dtype=str)
    solution.loc[0, "label"] = "eleven"
    solution.to_csv(comp / "solution.csv", index=False)
    classes = task_of(cfg).classes(read_train(cfg), cfg)
    test = read_test(cfg)
    sub = create_submission(cfg, test["id"], np.eye(len(classes))[np.arange(len(test)) % len(classes)], classes)
    with caplog.at_level(logging.WARNING):
        assert local_lb(cfg, sub, classes) is None  # was a crash: Input y_true contains NaN
    assert "labels ['eleven'] are not among the training classes" in caplog.text


def test_an_older_versions_checkpoint_is_trained_again_saying_why(comp, tmp_path, caplog):
    """A best.pt of the previous version (pickled numpy objects beside the weights) is not loaded
    (it could run code): the fold, up to date by its stamp, trains again and says why."""
    from helpers.train import train_fold

    cfg = cfg_for(comp, tmp_path)
    folds = get_folds(cfg, read_train(cfg))
    train_fold(cfg, folds, 0, None)
    path = artifacts.checkpoint_path(cfg, 0)
    old = artifacts.load_checkpoint(path)
    torch.save({**old, "state": {"best_preds": np.zeros((2, 2))}}, path)  # what the previous version wrote
    assert freshness.stale(cfg, "train", 0) is None  # its stamp still matches: only loading it tells
    with caplog.at_level(logging.INFO):
        result = train_fold(cfg, folds, 0, None)
    assert "skipped" not in result and "holds objects other than weights" in caplog.text
    assert "state" not in artifacts.load_checkpoint(path)  # a checkpoint of this version now
