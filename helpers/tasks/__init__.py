"""Tasks as objects: classification, binary probability, regression and multi-label each own
their target's encoding and checks, output width, loss, predictions, prediction columns,
score, submission shapes, stacker heads and thresholds. The rest of the code asks the task:

    task = task_of(cfg)                 # cfg.task's object
    task = task_of(cfg, sample, classes)  # with the submission's shape (a binary task scored on
                                          # ranking submits the positive class's probability)

Adding a task is one new module here, registered below (and its metrics in
helpers.config.TASK_METRICS, which the config validates)."""
from __future__ import annotations

import pandas as pd

from ..config import CFG
from .base import Task
from .binary import BinaryProbability, positive_index, positive_probability
from .classification import Classification, blank_label, sort_labels
from .multilabel import MultiLabel, joined_labels, label_matrix, label_sets
from .regression import Regression

TASKS: dict[str, Task] = {t.name: t for t in (Classification(), Regression(), MultiLabel())}
BINARY = BinaryProbability()


def create_criterion(cfg: CFG, train_targets, n_outputs: int, labels: list | None = None):
    """The loss cfg.loss names for cfg's task ('auto': ce for classification, mse for
    regression, bce for multi-label); multi-label `labels` name the outputs, for label_pos_weight."""
    return TASKS[cfg.task].criterion(cfg, train_targets, n_outputs, labels)


def task_of(cfg: CFG, sample: pd.DataFrame | None = None, classes: list | None = None) -> Task:
    """cfg.task's object; with sample_submission and the classes, the binary task when a
    classification's submission is its positive class's probability."""
    task = TASKS[cfg.task]
    if sample is not None and isinstance(task, Classification) and positive_probability(cfg, sample, classes):
        return BINARY
    return task


__all__ = ["TASKS", "Task", "task_of", "create_criterion", "blank_label", "sort_labels", "label_sets", "label_matrix", "joined_labels",
           "positive_index", "positive_probability"]
