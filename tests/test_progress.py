"""The runner's live progress (helpers.progress): each fold's epochs done of planned, its last
score and the time left, read from metrics.jsonl while the notebook runs; lines where the output
is not a terminal, one bar where it is."""
from __future__ import annotations

import io
import os
import re
import time

from helpers import artifacts, budget, progress
from helpers.config import CFG


def rows(cfg: CFG, fold, n: int, planned: int, seconds: float = 2.0) -> None:
    artifacts.write_metrics(cfg, fold, [{"epoch": e, "metric": 0.5 + 0.1 * e, "time_s": seconds, "epochs": planned}
                                        for e in range(1, n + 1)])


def test_the_progress_lines_follow_each_fold_and_say_what_is_left(tmp_path):
    cfg = CFG(competition_dir=str(tmp_path), models_dir=str(tmp_path / "models"), experiment="e", epochs=4, n_folds=4,
              metric="accuracy")
    rows(cfg, 0, 2, 3, seconds=9.0)  # an earlier run's file: older than the watch, not this run's progress
    old = time.time() - 60
    os.utime(artifacts.metrics_path(cfg, 0), (old, old))
    out = io.StringIO()
    parts = progress.parts_of(cfg, [0, 1, artifacts.REFIT])
    assert [p.planned for p in parts] == [4, 4, 4]  # no time_limit: `epochs`
    with progress.Watch(parts, later_epochs=8, stream=out, every_s=0.0, poll_s=0.05) as watch:
        assert progress.state_of(parts, watch.since).done == 0
        rows(cfg, 0, 1, 4)
        time.sleep(0.3)
        rows(cfg, 0, 3, 3)  # the plan of a time_limit run says 3 after the first epoch
        rows(cfg, 1, 1, 3)
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0].strip() == ("e fold 0: epoch 1/4, accuracy 0.6000, 2.0s/epoch; this stage ~25s left, "
                                "the run's training ~41s")  # (3 + 4 + 4 x 4/3 epochs) x 2 s, then 8 more
    assert "e fold 1: epoch 1/3, accuracy 0.6000" in lines[-1]  # the fold now training, at its own plan
    assert not any("9.0s/epoch" in line for line in lines)  # the earlier run's rows were never shown


def test_a_time_limited_run_plans_from_the_ledger(tmp_path):
    cfg = CFG(competition_dir=str(tmp_path), models_dir=str(tmp_path / "models"), experiment="e", epochs=1000,
              time_limit="10min", folds=[0], refit="alone")
    ledger = budget.read_ledger(cfg) or {}
    ledger.update(limit_s=600.0, spent={"e/00_eda": 100.0},
                  plan={"expected_epochs": {"e": 3.0}, "refit_epochs": {"e": 4.8}})
    budget.write_ledger(cfg, ledger)
    assert [p.planned for p in progress.parts_of(cfg, [0, artifacts.REFIT])] == [3, 5]
    out = io.StringIO()
    with progress.Watch(progress.parts_of(cfg, [0, artifacts.REFIT]), stream=out, every_s=0.0, poll_s=0.05):
        rows(cfg, 0, 3, 3)
        time.sleep(0.3)
    line = out.getvalue().splitlines()[-1]
    assert "e fold 0: epoch 3/3" in line and re.search(r"the run ~8m(19|20)s", line)  # 600 s less the 100 spent: the ledger's
    assert "this stage ~12s left" in line  # the refit's 5 epochs on 5/4 of a fold's rows, at 2 s


def test_a_terminal_gets_one_bar(tmp_path):
    cfg = CFG(competition_dir=str(tmp_path), models_dir=str(tmp_path / "models"), experiment="e", epochs=5)
    out = io.StringIO()
    with progress.Watch(progress.parts_of(cfg, 0), stream=out, poll_s=0.05, tty=True) as watch:
        rows(cfg, 0, 2, 5)
        time.sleep(0.3)
        assert watch.bar is not None and (watch.bar.n, watch.bar.total) == (2, 5)
    assert "e fold 0" in out.getvalue() and "2/5" in out.getvalue()
