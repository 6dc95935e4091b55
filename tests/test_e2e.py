"""End to end: every notebook through the runner (papermill) on a tiny generated competition
with string labels and a metadata column, 2 folds, 1 epoch, two models."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers import pipeline
from helpers.demo import build_digits


def write_config(tmp_path: Path, comp: Path, **extra) -> Path:
    config = {
        "competition_dir": str(comp), "models_dir": str(tmp_path / "models"),
        "submissions_dir": str(tmp_path / "submissions"), "metadata_cols": ["ink"],
        "n_folds": 2, "epochs": 1, "img_size": 32, "batch_size": 32, "num_workers": 0,
        "lgbm_n_estimators": 30, "submission_name": "tiny_sub",
        "experiments": {"tiny_cnn": {"model_name": "resnet18"},
                        "tiny_hybrid": {"arch": "hybrid", "patch_size": 8, "emb_dim": 16, "num_heads": 2}},
        **extra,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    comp = build_digits(tmp / "comp", size=24, n=160, string_labels=True, metadata=True)
    config = write_config(tmp, comp)
    rc = pipeline.main(["--config", str(config)])
    return tmp, comp, rc


def test_runner_runs_every_notebook(tiny_run):
    tmp, comp, rc = tiny_run
    assert rc == 0
    models = tmp / "models"
    executed = sorted(p.name for p in (models / "tiny_cnn" / "notebooks").glob("*.ipynb"))
    assert executed == ["00_eda.ipynb", "01_folds.ipynb", "02_train_fold0.ipynb", "02_train_fold1.ipynb",
                        "03_features.ipynb", "04_stacking.ipynb"]
    assert (models / "ensemble" / "notebooks" / "05_ensemble.ipynb").exists()
    for exp in ("tiny_cnn", "tiny_hybrid"):
        d = models / exp
        assert (d / "config.yaml").exists() and (d / "folds.csv").exists()
        for k in (0, 1):
            assert (d / f"fold{k}" / "best.pt").exists() and (d / f"fold{k}" / "last.pt").exists()
            lines = (d / f"fold{k}" / "metrics.jsonl").read_text().splitlines()
            assert set(json.loads(lines[0])) == {"epoch", "train_loss", "valid_loss", "metric", "lr", "time_s", "mem_MiB"}
        oof = pd.read_csv(d / "oof.csv")
        assert len(oof) == len(pd.read_csv(comp / "train.csv")) and set(oof["fold"]) == {0, 1}
        assert (d / "features" / "train_fold0.npy").exists()
        stack = pd.read_csv(models / f"{exp}_lgbm" / "oof.csv")
        assert len(stack) == len(oof)
        assert "ink" in set(pd.read_csv(models / f"{exp}_lgbm" / "importance.csv")["feature"])
    for png in ("eda/sample_grid.png", "eda/target_balance.png", "folds.png", "fold0/learning_curves.png"):
        assert (models / "tiny_cnn" / png).exists(), png
    assert (models / "tiny_cnn_lgbm" / "importance.png").exists()
    assert (models / "ensemble" / "scores.png").exists() and (models / "ensemble" / "correlation.png").exists()


def test_submission_matches_sample_submission(tiny_run):
    tmp, comp, _ = tiny_run
    sample = pd.read_csv(comp / "sample_submission.csv")
    for name in ("submission.csv", "tiny_sub.csv"):
        sub = pd.read_csv(tmp / "submissions" / name)
        assert list(sub.columns) == list(sample.columns)
        assert sub["id"].tolist() == sample["id"].tolist()
        assert not sub.isna().any().any()
        train_labels = set(pd.read_csv(comp / "train.csv")["label"])
        assert set(sub["label"]) <= train_labels  # decoded back to the string labels
    score = json.loads((tmp / "models" / "ensemble" / "score.json").read_text())
    assert 0 <= score["held_out"] <= 1 and score["local_lb"] is not None
    assert len(score["weights"]) == 4  # two CNNs and two stackers
    results = pd.read_csv(tmp / "models" / "results.csv")
    assert {"tiny_cnn", "tiny_cnn_lgbm", "tiny_hybrid", "tiny_hybrid_lgbm",
            "ensemble (hill, in-sample)", "ensemble (hill, held-out)"} == set(results["experiment"])
    assert results.loc[results["experiment"] == "tiny_cnn", "wall_s"].iloc[0] > 0


def test_rerun_skips_finished_stages_and_redoes_only_what_is_missing(tiny_run, capsys):
    tmp, comp, _ = tiny_run
    capsys.readouterr()
    assert pipeline.main(["--config", str(tmp / "tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 12
    # as if fold 1 of tiny_cnn had been killed: no done marker, no OOF file yet
    (tmp / "models" / "tiny_cnn" / "notebooks" / "02_train_fold1.done.json").unlink()
    (tmp / "models" / "tiny_cnn" / "oof_fold1.csv").unlink()
    assert pipeline.main(["--config", str(tmp / "tiny.yaml")]) == 0
    out = capsys.readouterr().out
    ran = [line.split("] ", 1)[1].split(" ...")[0] for line in out.splitlines()
           if line.startswith("[") and "skipped" not in line]
    assert ran == ["02_train fold 1 [tiny_cnn]", "03_features [tiny_cnn]", "04_stacking [tiny_cnn]", "05_ensemble [tiny_cnn]"]
    assert (tmp / "models" / "tiny_cnn" / "oof_fold1.csv").exists()
    assert (tmp / "submissions" / "submission.csv").exists()


def test_folds_train_in_parallel_one_process_per_gpu(tiny_run, capsys):
    tmp, comp, _ = tiny_run
    capsys.readouterr()
    rc = pipeline.main(["--config", str(tmp / "tiny.yaml"), "--experiments", "tiny_hybrid", "--stages", "02_train",
                        "--force", "--gpus", "2"])  # on a CPU machine each process simply sees no GPU
    out = capsys.readouterr().out
    assert rc == 0
    assert "02_train fold 0 [tiny_hybrid] ... on GPU 0 (parallel)" in out
    assert "02_train fold 1 [tiny_hybrid] ... on GPU 1 (parallel)" in out
    assert "2 folds in parallel" in out
    for k in (0, 1):
        assert (tmp / "models" / "tiny_hybrid" / "notebooks" / f"02_train_fold{k}.done.json").exists()


def test_runner_reports_the_failing_notebook_and_cell(tmp_path, capsys):
    comp = build_digits(tmp_path / "comp", size=16, n=60, string_labels=True)
    missing = sorted((comp / "train").glob("*.png"))[3]
    missing.unlink()
    config = write_config(tmp_path, comp, metadata_cols=[])
    rc = pipeline.main(["--config", str(config), "--stages", "00_eda"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "notebook 00_eda.ipynb failed" in err and "at cell" in err
    assert "FileNotFoundError" in err and missing.stem in err
    assert str(tmp_path / "models" / "tiny_cnn" / "notebooks" / "00_eda.ipynb") in err
    assert (tmp_path / "models" / "tiny_cnn" / "notebooks" / "00_eda.ipynb").exists()


def test_runner_rejects_an_unknown_config_key_before_running(tmp_path, capsys):
    comp = tmp_path / "comp"
    config = write_config(tmp_path, comp)
    rc = pipeline.main(["--config", str(config), "--set", "epoch=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown config key 'epoch'" in err and "epochs" in err
    assert not (tmp_path / "models").exists()
