"""What the fold loop does besides training, as small callbacks (the way fastai's callbacks and
Lightning's Timer / ModelCheckpoint / EarlyStopping do it): the time-limit pacer, early stopping,
checkpoints, EMA bookkeeping, metrics.jsonl and the log line, Weights & Biases, the OOF writer.

The loop (helpers.train.FoldRun) calls, in the order of its list: `on_fit_start(run)` once it
has resumed, `on_row(run, row)` when an epoch's row of metrics is made (before its time is
taken), `on_epoch_end(run, row)` after it, and `on_fit_end(run)`. A callback reads and writes
the run's state (run.state: what last.pt keeps, so a killed run resumes with it)."""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from . import artifacts, budget
from .config import to_dict
from .freshness import digest
from .metrics import is_better

FoldRun = Any  # helpers.train.FoldRun: the fold's run, whose attributes and state the callbacks read and write


class Callback:
    def on_fit_start(self, run: FoldRun) -> None:
        pass

    def on_row(self, run: FoldRun, row: dict) -> None:
        pass

    def on_epoch_end(self, run: FoldRun, row: dict) -> None:
        pass

    def on_fit_end(self, run: FoldRun) -> None:
        pass


class Pacer(Callback):
    """time_limit: each epoch's seconds into the ledger; the fold's epochs planned after its
    first (from budget.fold_epochs), again after the second and the fifth at the mean pace of
    those after the first (the first pays for start-up: CUDA's context, cuDNN's autotuning, the
    workers; on a CPU the first pass over the cache: the recipe's refit took 9.9 s, then 8.9 and
    8.6 on average, and planned from the first it ended 27 s early). A refit the time left cuts
    below REFIT_MIN_SHARE of what the folds ran is skipped (NoTime): it has no score to catch it."""

    def on_fit_start(self, run: FoldRun) -> None:
        self.key = budget.train_key(run.cfg, run.fold)
        self.before = sum(r["time_s"] for r in run.state["history"]) + (time.perf_counter() - run.started)  # a resumed fold's
        self.process_start = time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.process_start

    def on_row(self, run: FoldRun, row: dict) -> None:
        row["time_limit_s"] = budget.limit_s(run.cfg)  # what a longer time_limit compares (budget.undertrained)

    def on_epoch_end(self, run: FoldRun, row: dict) -> None:
        state, done = run.state, run.state["epoch"]
        if run.procs.main:
            budget.spend(run.cfg, self.key, self.elapsed())
        again = done in budget.PLAN_AGAIN_AFTER and 0 < state.get("planned_after", 0) < done
        if state.get("planned_epochs") and not again:
            return
        pace = [r["time_s"] for r in state["history"][1:]] or [row["time_s"]]
        epoch_s = sum(pace) / len(pace)
        # its test predictions, at the validation's pace (the refit's: a third of a training step's)
        rows = max(len(run.train_df), 1) if run.refit else max(len(run.valid_df), 1)
        test_s = run.n_test * (epoch_s / 3 if run.refit else run.valid_s) / rows
        planned = budget.fold_epochs(run.cfg, run.fold, self.elapsed(), epoch_s, test_s, run.logger,
                                     epochs_done=done) if run.procs.main else None
        state["planned_epochs"] = int(run.procs.broadcast(planned))
        state["planned_after"] = done
        if done == 1:
            state["first_slow"] = bool(run.procs.broadcast(budget.started_up(run.cfg, run.fold, row["time_s"])
                                                           if run.procs.main else None))
        validated = budget.folds_epochs(run.cfg) if run.refit else 0.0  # what the CV ran (a holdout plan's refit plans more)
        if run.refit and state["planned_epochs"] < budget.REFIT_MIN_SHARE * validated and not (done == 1 and state["first_slow"]):
            artifacts.checkpoint_path(run.cfg, run.fold, "last").unlink(missing_ok=True)
            raise budget.NoTime(f"the time left gives it {state['planned_epochs']} epoch(s), less than "
                                f"{budget.REFIT_MIN_SHARE:.0%} of the {validated:.0f} the folds ran")
        run.set_epochs(state["planned_epochs"])


class EarlyStop(Callback):
    """Whether the epoch improved on the best CV score (the refit, with nothing held out: its
    last epoch is its best); `patience` epochs without improvement end the fold."""

    def on_epoch_end(self, run: FoldRun, row: dict) -> None:
        state = run.state
        run.improved = (state["epoch"] >= run.last_epoch) if run.refit else is_better(run.cfg.metric, run.score, state["best_score"])
        if run.improved:
            state.update(best_score=run.score, best_epoch=state["epoch"], bad_epochs=0, best_preds=run.preds,
                         best_logits=run.logits)
        elif not run.refit:
            state["bad_epochs"] += 1


class Checkpoints(Callback):
    """best.pt when the epoch improved (the weights validated: the EMA's when on, with the config,
    classes and history), last.pt after every epoch (a killed run resumes from it); at the end the
    best one gets the whole history, and last.pt goes unless keep_last (its optimizer and EMA
    state are many MB)."""

    def __init__(self, made_from: dict):
        self.made_from = made_from

    def on_epoch_end(self, run: FoldRun, row: dict) -> None:
        if not run.procs.main:
            return
        cfg, state = run.cfg, run.state
        if run.improved:
            artifacts.save_checkpoint({"model": run.eval_model.state_dict(), "cfg": to_dict(cfg), "classes": run.classes,
                                       "epoch": state["epoch"], "score": run.score, "history": state["history"],
                                       "num_features": run.model.num_features,
                                       "target_range": (run.scale.low, run.scale.high) if run.scale else None}, run.best_path)
        artifacts.save_checkpoint({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                                   "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
                                   "ema": run.ema.state_dict() if run.ema is not None else None, "state": state,
                                   "cfg": to_dict(cfg), "made_from": digest(self.made_from)}, run.last_path)

    def on_fit_end(self, run: FoldRun) -> None:
        if not run.procs.main:
            return
        best = artifacts.load_checkpoint(run.best_path)
        best["history"] = run.state["history"]
        artifacts.save_checkpoint(best, run.best_path)
        if not run.cfg.keep_last:
            run.last_path.unlink(missing_ok=True)


class EmaReport(Callback):
    """With EMA weights (and no time budget): the raw weights' score too, and the EMA's decay,
    in each row (metric_raw, metric_ema, ema_decay): is the EMA helping?"""

    def on_row(self, run: FoldRun, row: dict) -> None:
        _, raw_score, _, _ = run.validate(run.model)
        row.update(metric_raw=round(raw_score, 6), metric_ema=round(run.score, 6),
                   ema_decay=round(run.ema.get_decay(run.steps * row["epoch"]), 6))  # the decay after this epoch's steps


class MetricsLog(Callback):
    """metrics.jsonl (one line per epoch, rewritten whole: atomic) and the fold's log line."""

    def on_epoch_end(self, run: FoldRun, row: dict) -> None:
        row["epochs"] = run.epochs  # what the fold is planned for by now (time_limit plans it): the runner's progress
        if run.procs.main:
            artifacts.write_metrics(run.cfg, run.fold, run.state["history"])
        metric = "" if run.refit else (f"valid_loss {row['valid_loss']:.4f} {run.cfg.metric} {run.score:.5f}"
                                       f"{' *' if run.improved else ''} ")
        pace = [r["time_s"] for r in run.state["history"][1:]] or [row["time_s"]]  # the first pays for start-up
        left = (run.epochs - run.state["epoch"]) * sum(pace) / len(pace)
        run.logger.info(f"{run.name} epoch {run.state['epoch']}/{run.epochs}: train_loss {row['train_loss']:.4f} {metric}"
                        f"({row['time_s']:.1f}s" + (f", {run.name} ~{left:.0f}s left)" if left > 0 else ")"))


class WandbLog(Callback):
    """Each epoch's row to Weights & Biases (offline without WANDB_API_KEY)."""

    def on_fit_start(self, run: FoldRun) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("config key 'wandb' is on but wandb is not installed: pip install wandb") from e
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.wandb_run = wandb.init(project=run.cfg.wandb_project, name=f"{run.cfg.experiment}_{artifacts.fold_name(run.fold)}",
                                    config=to_dict(run.cfg), mode=mode, dir=str(artifacts.exp_dir(run.cfg)), reinit=True)

    def on_epoch_end(self, run: FoldRun, row: dict) -> None:
        self.wandb_run.log(row)

    def on_fit_end(self, run: FoldRun) -> None:
        self.wandb_run.finish()


class OofWriter(Callback):
    """The fold's OOF predictions (of its best epoch) with their targets, and their raw outputs."""

    def on_fit_end(self, run: FoldRun) -> None:
        if not run.procs.main:
            return
        cfg, valid_df = run.cfg, run.valid_df
        oof = artifacts.frame_predictions(valid_df[cfg.id_col], run.state["best_preds"], cfg, run.task.pred_columns(run.classes))
        oof.insert(1, cfg.target_col, valid_df[cfg.target_col].to_numpy())
        oof.insert(2, "fold", run.fold)
        logits = run.state.get("best_logits")  # None (resumed from a last.pt without them): no stale file
        artifacts.save_logits(cfg, None if logits is None else np.asarray(logits), run.fold)
        artifacts.write_predictions(cfg, "oof", oof, run.fold)
