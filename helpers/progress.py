"""Live progress of the runner's training: while 02_train notebooks run, a thread reads their
folds' metrics.jsonl (one row per finished epoch, each with the epochs its fold is planned for)
and shows the fold, its epochs done of planned, its last validation score, and the time left for
the stage and for the whole run (from the time_limit plan when there is one, else from the
epochs so far). On a terminal one tqdm bar that updates in place; where the output is not a
terminal (papermill's and a Kaggle kernel's logs, CI) a line per finished epoch, at most one
every EVERY_S seconds (and every fold's last)."""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import artifacts, budget
from .config import CFG

EVERY_S = 5.0  # without a terminal: at most one line this often (a fold's last epoch always has one)
POLL_S = 1.0


@dataclass
class Part:
    """One model a watched job trains: its experiment's config, its fold (or the refit), the
    epochs it is planned for before its first row says."""

    cfg: CFG
    fold: int | str
    planned: int

    @property
    def name(self) -> str:
        return f"{self.cfg.experiment} {'refit' if self.fold == artifacts.REFIT else f'fold {self.fold}'}"

    @property
    def path(self) -> Path:
        return artifacts.fold_dir(self.cfg, self.fold) / "metrics.jsonl"


def planned_epochs(cfg: CFG, fold: int | str) -> int:
    """The epochs a fold (or the refit) is planned for: the time_limit plan's, else `epochs`."""
    ledger = budget.read_ledger(cfg) if cfg.time_limit else None
    plan = (ledger or {}).get("plan") or {}
    key = "refit_epochs" if fold == artifacts.REFIT and cfg.experiment in plan.get("refit_epochs", {}) else "expected_epochs"
    expected = plan.get(key, {}).get(cfg.experiment)
    return max(1, min(cfg.epochs, round(expected))) if expected else cfg.epochs


def parts_of(cfg: CFG, folds) -> list[Part]:
    """The models a 02_train job trains, in order (its `fold` parameter: one, or a list)."""
    return [Part(cfg, k, planned_epochs(cfg, k)) for k in (folds if isinstance(folds, list) else [folds])]


def read_rows(path: Path, since: float) -> list[dict]:
    """A fold's metrics rows, [] while its file is older than `since` (an earlier run's, until
    this run's first epoch rewrites it whole) or not there."""
    try:
        if path.stat().st_mtime < since:
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):  # not written yet, or caught between two writes
        return []


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


@dataclass
class State:
    """What the rows say at one moment: the part training now, its epochs done and planned,
    its last score, the seconds an epoch takes, and the epochs left for the job."""

    part: Part
    done: int
    planned: int
    score: float | None
    epoch_s: float | None
    epochs_left: float


def state_of(parts: list[Part], since: float) -> State:
    rows = [read_rows(p.path, since) for p in parts]
    current = max((i for i, r in enumerate(rows) if r), default=0)  # the parts train in order: the last with rows
    part, mine = parts[current], rows[current]
    planned = _planned(part, mine)
    paced = [r["time_s"] for r in (mine[1:] or mine) if "time_s" in r] or [r["time_s"] for rs in rows for r in rs if "time_s" in r]
    epochs_left = max(0, planned - len(mine)) + sum(_planned(p, []) * _rows_share(p) for p in parts[current + 1:])
    score = next((r["metric"] for r in reversed(mine) if r.get("metric") is not None and part.fold != artifacts.REFIT), None)
    return State(part, len(mine), planned, score, sum(paced) / len(paced) if paced else None, epochs_left)


def _planned(part: Part, rows: list[dict]) -> int:
    """The last row's plan (time_limit plans a fold after its first epoch), else the part's."""
    return int(rows[-1].get("epochs", part.planned)) if rows else part.planned


def _rows_share(part: Part) -> float:
    """An epoch of the refit trains on every row, a fold's on (k-1)/k of them."""
    return part.cfg.n_folds / max(part.cfg.n_folds - 1, 1) if part.fold == artifacts.REFIT else 1.0


class Watch:
    """The progress of one 02_train job (its parts), shown while it runs: `with Watch(...):`.
    `later_epochs`: the epochs of the training jobs after this one (the run's estimate without
    time_limit); `stream`: where it is shown (a terminal gets a bar)."""

    def __init__(self, parts: list[Part], later_epochs: float = 0.0, stream=None, every_s: float = EVERY_S,
                 poll_s: float = POLL_S, tty: bool | None = None):
        self.parts, self.later, self.every_s, self.poll_s = parts, later_epochs, every_s, poll_s
        self.stream = stream or sys.stdout
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.since, self.stop, self.bar = time.time() - 1.0, threading.Event(), None
        self.shown: tuple | None = None
        self.last_line = 0.0
        cfg = parts[0].cfg
        ledger = budget.read_ledger(cfg) if cfg.time_limit else None
        self.deadline = time.time() + ledger["limit_s"] - budget.spent_s(ledger) if ledger else None

    def __enter__(self) -> Watch:
        self.thread = threading.Thread(target=self._loop, daemon=True, name="train-progress")
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self._safely(final=True)
        if self.bar is not None:
            self.bar.close()

    def _loop(self) -> None:
        while not self.stop.wait(self.poll_s):
            self._safely()

    def _safely(self, final: bool = False) -> None:
        """update(), whose failure is said once and never stops the job or hides its own error."""
        try:
            self.update(final)
        except Exception as e:  # noqa: BLE001 - progress is a view: the notebook's result is what counts
            if not getattr(self, "failed", False):
                self.failed = True
                print(f"    (progress not shown: {type(e).__name__}: {e})", file=self.stream, flush=True)

    def left(self, s: State) -> tuple[float | None, float | None]:
        """Seconds left for the stage and for the run."""
        stage = s.epochs_left * s.epoch_s if s.epoch_s else None
        if self.deadline is not None:
            return stage, self.deadline - time.time()
        return stage, (stage + self.later * s.epoch_s) if stage is not None else None

    def describe(self, s: State) -> str:
        stage, run = self.left(s)
        score = f", {s.part.cfg.metric} {s.score:.4f}" if s.score is not None else ""
        pace = f", {s.epoch_s:.1f}s/epoch" if s.epoch_s else ""
        whole = "the run" if self.deadline is not None else "the run's training"
        return f"{s.part.name}: epoch {s.done}/{s.planned}{score}{pace}; this stage ~{_duration(stage)} left, {whole} ~{_duration(run)}"

    def update(self, final: bool = False) -> None:
        s = state_of(self.parts, self.since)
        now = time.time()
        if self.tty:
            self._bar(s)
            return
        key = (s.part.name, s.done)
        due = now - self.last_line >= self.every_s or s.done >= s.planned or final
        if s.done and key != self.shown and due:
            print(f"    {self.describe(s)}", file=self.stream, flush=True)
            self.shown, self.last_line = key, now

    def _bar(self, s: State) -> None:
        from tqdm.auto import tqdm

        if self.bar is None or self.bar.desc != f"    {s.part.name}":
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=s.planned, desc=f"    {s.part.name}", unit="epoch", file=self.stream, leave=True,
                            dynamic_ncols=True)
        self.bar.total = s.planned
        self.bar.n = s.done
        stage, run = self.left(s)
        self.bar.set_postfix_str((f"{s.part.cfg.metric} {s.score:.4f}, " if s.score is not None else "")
                                 + f"stage ~{_duration(stage)}, run ~{_duration(run)}", refresh=True)
