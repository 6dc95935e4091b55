"""helpers.utils: get_score against scikit-learn, is_better, the idempotent logger."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn import metrics

from helpers.metrics import HIGHER_IS_BETTER, get_score, is_better
from helpers.utils import get_logger


@pytest.fixture
def multiclass():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 2, 1, 0, 2, 1, 0, 2, 1, 1])
    logits = rng.normal(size=(len(y), 3)) + 1.5 * np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba


def test_accuracy(multiclass):
    y, proba = multiclass
    assert get_score("accuracy", y, proba) == pytest.approx(metrics.accuracy_score(y, proba.argmax(1)))
    assert get_score("accuracy", y, np.eye(3)[y]) == 1.0
    assert get_score("accuracy", [0, 1], [[0.2, 0.8], [0.9, 0.1]]) == 0.0


def test_f1_macro(multiclass):
    y, proba = multiclass
    expected = metrics.f1_score(y, proba.argmax(1), average="macro")
    assert get_score("f1_macro", y, proba) == pytest.approx(expected)
    # macro is not accuracy when classes are imbalanced
    y2 = np.array([0, 0, 0, 0, 1])
    p2 = np.eye(2)[[0, 0, 0, 0, 0]]
    assert get_score("f1_macro", y2, p2) == pytest.approx(metrics.f1_score(y2, [0] * 5, average="macro"))
    assert get_score("f1_macro", y2, p2) < get_score("accuracy", y2, p2)


def test_rmse():
    y = np.array([1.0, 2.0, 3.0, 4.5])
    pred = np.array([1.5, 2.0, 2.0, 5.0])
    expected = np.sqrt(metrics.mean_squared_error(y, pred))
    assert get_score("rmse", y, pred) == pytest.approx(expected)
    assert get_score("rmse", y, pred.reshape(-1, 1)) == pytest.approx(expected)  # [n, 1] model outputs
    assert get_score("rmse", y, y) == 0.0


def test_roc_auc_binary():
    y = np.array([0, 1, 1, 0, 1, 0, 1, 0])
    p1 = np.array([0.1, 0.8, 0.6, 0.4, 0.3, 0.2, 0.9, 0.5])
    proba = np.stack([1 - p1, p1], 1)
    assert get_score("roc_auc", y, proba) == pytest.approx(metrics.roc_auc_score(y, p1))


def test_roc_auc_multiclass(multiclass):
    y, proba = multiclass
    expected = metrics.roc_auc_score(y, proba, multi_class="ovr")
    assert get_score("roc_auc", y, proba) == pytest.approx(expected)


def test_scores_are_plain_floats(multiclass):
    y, proba = multiclass
    for m in ("accuracy", "f1_macro", "roc_auc"):
        assert type(get_score(m, y, proba)) is float
    assert type(get_score("rmse", [1.0, 2.0], [1.0, 1.0])) is float


def test_unknown_metric():
    with pytest.raises(ValueError, match="logloss"):
        get_score("logloss", [0, 1], [[0.5, 0.5], [0.5, 0.5]])


def test_is_better_direction():
    assert HIGHER_IS_BETTER["rmse"] is False
    assert is_better("rmse", 0.5, 0.7)
    assert not is_better("rmse", 0.7, 0.5)
    assert not is_better("rmse", 0.5, 0.5)
    for m in ("accuracy", "f1_macro", "roc_auc"):
        assert is_better(m, 0.9, 0.8)
        assert not is_better(m, 0.8, 0.9)
        assert not is_better(m, 0.8, 0.8)
    assert is_better("rmse", 123.0, None) and is_better("accuracy", 0.0, None)


def test_get_logger_twice_logs_once(tmp_path, capsys):
    log_file = tmp_path / "logs" / "train.log"
    get_logger("test_metrics_logger", log_file)
    logger = get_logger("test_metrics_logger", log_file)  # a re-run notebook cell
    logger.info("the one and only line")
    for h in logger.handlers:
        h.flush()
    assert log_file.read_text().count("the one and only line") == 1
    assert capsys.readouterr().out.count("the one and only line") == 1
    assert len(logger.handlers) == 2  # console + file, not four
    assert logger.propagate is False
    for h in list(logger.handlers):  # release the file
        logger.removeHandler(h)
        h.close()


def test_get_logger_without_file(capsys):
    logger = get_logger("test_metrics_console")
    get_logger("test_metrics_console")
    logger.info("console only")
    assert capsys.readouterr().out.count("console only") == 1
    assert len(logger.handlers) == 1 and logger.level == logging.INFO
    for h in list(logger.handlers):
        logger.removeHandler(h)
