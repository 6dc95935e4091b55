"""Shared code of the notebooks: config, data, folds, models, training, stacking, ensembling.

Every notebook starts with `cfg, logger = setup(config_path, experiment, overrides)`.
"""
from __future__ import annotations

import logging
import os

# albumentations asks PyPI for a newer version on every import, in every DataLoader worker too:
# offline (a Kaggle kernel with internet off, the GPU machine here) the name lookup can stall
# each import for seconds. Set NO_ALBUMENTATIONS_UPDATE=0 to have the check.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from .config import CFG, ROOT, experiment_names, load_cfg


def setup(config_path: str, experiment: str = "", overrides: dict | None = None,
          log_name: str = "train.log") -> tuple[CFG, logging.Logger]:
    """Resolve the config (YAML + overrides), seed everything, open the experiment's logger
    and save the config snapshot. Builds the demo competition on first use."""
    from . import artifacts
    from .runtime import seed_everything
    from .utils import check_versions, get_logger

    check_versions()
    from .budget import apply_plan

    cfg = apply_plan(load_cfg(config_path, experiment, overrides))  # time_limit: the run's planned image size and folds
    names = artifacts.name_problems([cfg, *_siblings(config_path, cfg.experiment, overrides)])
    if names:
        raise ValueError("\n".join(names))
    problems = artifacts.unwritable(cfg)
    if problems:
        raise PermissionError("\n".join(problems))
    if not cfg.path(cfg.train_csv).exists() and cfg.path("") == ROOT / "inputs" / "digits":
        from .tools.demo import write_digits

        write_digits(cfg.path(""))
    if not cfg.path(cfg.train_csv).exists() and cfg.path("") == ROOT / "inputs" / "digits_multilabel":
        from .tools.demo import write_multilabel_digits

        write_multilabel_digits(cfg.path(""))
    seed_everything(cfg.seed)
    logger = get_logger("kaggle", artifacts.log_path(cfg, log_name))
    artifacts.save_config(cfg)
    return cfg, logger


def _siblings(config_path: str, experiment: str, overrides: dict | None) -> list[CFG]:
    """The YAML's other experiments (those that load: their own problems are the check's), whose
    folders this one's must not collide with."""
    out = []
    for name in experiment_names(config_path) if config_path else []:
        if name != experiment:
            try:
                out.append(load_cfg(config_path, name, overrides))
            except (KeyError, TypeError, ValueError):
                continue
    return out


__all__ = ["CFG", "ROOT", "load_cfg", "setup"]
