"""The pre-flight check reports every problem at once, each naming its file, row, column or key."""
from __future__ import annotations

import pandas as pd
import pytest
import yaml

from helpers import freshness
from helpers import check
from helpers.config import CFG
from helpers.tools.demo import write_digits


@pytest.fixture
def bad_comp(tmp_path):
    comp = write_digits(tmp_path / "comp", size=16, n=100, string_labels=True, metadata=True)
    train = pd.read_csv(comp / "train.csv")
    images = {i: comp / "train" / f"{i}.png" for i in train["id"]}
    ids = train["id"].tolist()
    images[ids[0]].unlink()  # row 2: missing
    images[ids[1]].write_bytes(b"")  # row 3: zero bytes
    images[ids[2]].write_bytes(b"this is not an image")  # row 4: unreadable
    data = images[ids[3]].read_bytes()
    images[ids[3]].write_bytes(data[: len(data) // 2])  # row 5: truncated
    train.loc[5, "label"] = None  # row 7: NaN target
    train.loc[6, "id"] = ids[7]  # rows 8 and 9 share an id
    train = pd.concat([train, pd.DataFrame({"id": [ids[8]], "label": ["unicorn"], "ink": [0.1]})], ignore_index=True)
    train.to_csv(comp / "train.csv", index=False)
    sample = pd.read_csv(comp / "sample_submission.csv").iloc[1:]  # first test id missing from it
    sample.to_csv(comp / "sample_submission.csv", index=False)
    return comp


def test_every_problem_is_reported_at_once(bad_comp, tmp_path):
    cfg = CFG(competition_dir=str(bad_comp), metadata_cols=["ink", "age"], model_name="resnet181", n_folds=2)
    problems = check.check(cfg)
    text = "\n".join(problems)
    train_csv = bad_comp / "train.csv"
    assert f"{train_csv}: missing column 'age'" in text
    assert "train.csv row 2 id=img_" in text and "image not found" in text
    assert "row 3" in text and "zero-byte file" in text
    assert "row 4" in text and "unreadable image" in text
    assert "row 5" in text and "truncated PNG" in text
    assert f"{train_csv}: empty cell(s) in target column 'label' (rows 7)" in text
    dup = "\n".join(p for p in problems if "share an id" in p)
    assert "4 rows share an id in 'id':" in dup and "on rows 8, 9;" in dup and "on rows 10, 82" in dup  # 82: the unicorn row
    assert "class 'unicorn' of 'label' has 1 row(s), fewer than n_folds=2" in text
    assert "test id(s) missing from sample_submission.csv" in text
    assert "unknown timm model 'resnet181'" in text and "resnet18" in text
    assert len(problems) >= 11


def test_clean_data_has_no_problems(tmp_path):
    comp = write_digits(tmp_path / "comp", size=16, n=60)
    assert check.check(CFG(competition_dir=str(comp), n_folds=2)) == []


def test_empty_test_set_and_missing_target_column(tmp_path):
    comp = write_digits(tmp_path / "comp", size=16, n=60)
    pd.read_csv(comp / "test.csv").iloc[:0].to_csv(comp / "test.csv", index=False)
    problems = check.check(CFG(competition_dir=str(comp), target_col="class", n_folds=2), images=False)
    assert any("test.csv: the test set is empty" in p for p in problems)
    assert any("train.csv: missing column 'class'" in p for p in problems)


def test_cli_reports_config_keys_and_data(bad_comp, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"competition_dir": str(bad_comp), "n_folds": 2, "epoch": 3, "lr": "fast",
                                      "models_dir": str(tmp_path / "models")}))
    assert check.main(["--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "unknown config key 'epoch' (did you mean epochs" in out
    assert "config key 'lr' expects float" in out
    assert "zero-byte file" in out and "empty cell(s) in target column" in out


def test_run_check_raises_then_remembers_a_pass(tmp_path):
    comp = write_digits(tmp_path / "comp", size=16, n=60)
    cfg = CFG(competition_dir=str(comp), models_dir=str(tmp_path / "models"), n_folds=2, pretrained=False)
    check.run_check(cfg)
    assert freshness.stale(cfg, "check") is None  # the pass is recorded
    (comp / "test" / sorted(p.name for p in (comp / "test").iterdir())[0]).write_bytes(b"")
    pd.read_csv(comp / "test.csv").to_csv(comp / "test.csv", index=False)  # data changed: checked again
    with pytest.raises(check.DataError, match="zero-byte file"):
        check.run_check(cfg)
