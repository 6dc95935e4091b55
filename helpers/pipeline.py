"""The runner: execute the notebooks in order with papermill, headlessly.

    python -m helpers.pipeline --config configs/digits.yaml [--set key=value ...]
                               [--experiments NAME ...] [--stages 02_train 05_ensemble]

00_eda runs once; 01_folds, 02_train (one run per fold, then the refit on all rows when
`refit` is set), 03_features and 04_stacking run for every experiment of the config;
05_ensemble runs once at the end. Folds that train one after another on one device share one
02_train run (one kernel start for them all). Each executed notebook is
saved under models/<experiment>/notebooks/. A stage runs only when its output is not up to
date (helpers.freshness.stale: a config key it depends on, an input file or an upstream output
changed), and the runner says why; so a re-run after a kill redoes only what is missing (a
killed fold resumes from its last.pt), and a changed key redoes what depends on it.
--dry-run lists what would run and why; --force runs (and retrains) everything. With several
GPUs visible (or --gpus N), the folds of 02_train run in parallel, one papermill process per
GPU. The first failing cell stops the run with the notebook, the cell, the original error and
where the executed copy is. Ends with a table of the CV of every stage and the local
leaderboard score.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

from . import artifacts, budget, freshness, progress
from .config import CFG, ROOT, config_layers, experiment_names, load_cfg
from .configfile import parse_set
from .executors import Job, NotebookFailed, RunLocked, choose_gpus, execute, execute_on_gpus, execute_on_ray, gpu_slots, run_lock
from .stages import FINAL, NAMES, TRAIN, Stage
from .stages import STAGES as STAGE_GRAPH
from .utils import version_problems

STAGES = NAMES  # the notebooks, in order (helpers.stages)


def plan(config: str, overrides: dict, experiments: list[str] | None = None, stages: list[str] | None = None) -> list[Job]:
    """All notebook runs, in order. Every experiment's config is resolved and its model
    settings checked before anything runs."""
    from .models import model_problems


    names = experiments or experiment_names(config)
    cfgs = [budget.apply_plan(load_cfg(config, name, overrides)) for name in names]  # time_limit: the planned size and folds
    problems = [f"experiments.{cfg.experiment}: {p}" if len(cfgs) > 1 else p for cfg in cfgs for p in model_problems(cfg)]
    problems += artifacts.name_problems(cfgs)
    if problems:
        raise ValueError("\n  ".join(problems))
    stages = stages or STAGES
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {STAGES}")
    config_path = str(Path(config).resolve() if Path(config).exists() else ROOT / config)
    jobs: list[Job] = []

    def add(stage: Stage, cfg: CFG, experiment: str, fold=None, **extra) -> None:
        if stage.name in stages:
            params = {"config_path": config_path, "experiment": experiment, "overrides": overrides, **extra}
            name = stage.name if fold is None else f"{stage.name}_{artifacts.fold_name(fold)}"
            jobs.append(Job(stage.name, cfg, params | ({} if fold is None else {"fold": fold}),
                            artifacts.notebook_path(cfg, name, ensemble=stage.scope == "run" and stage.after_training)))

    for stage in STAGE_GRAPH:  # the graph's order: once before the experiments, per experiment, once after them
        if stage.scope == "run" and not stage.after_training:
            add(stage, cfgs[0], names[0])
    for name, cfg in zip(names, cfgs):
        for stage in (s for s in STAGE_GRAPH if s.scope != "run"):
            if stage.scope == "experiment":
                add(stage, cfg, name)
                continue
            for k in cfg.fold_ids + ([artifacts.REFIT] if artifacts.refit_on(cfg) else []):  # the refit after every fold
                add(stage, cfg, name, fold=k)
    for stage in STAGE_GRAPH:
        if stage.scope == "run" and stage.after_training:
            add(stage, cfgs[0], names[0], experiments=names)
    return jobs


def stale(job: Job) -> str | None:
    """Why the job's outputs must be (re)made (its stage's outputs, from the stage graph), or None
    when they are up to date."""
    if job.why:
        return job.why
    fold = job.parameters.get("fold")
    with freshness.decision():
        return next((why for k in (fold if isinstance(fold, list) else [fold])
                     if (why := freshness.stage_stale(job.cfg, job.stage, k)) is not None), None)


def one_kernel(jobs: list[Job], force: bool) -> list[Job]:
    """The folds of an experiment that must be trained one after another on one device, run in
    one notebook (one kernel start and its imports, about 8 s on a 2-core machine, instead of
    one per fold): consecutive 02_train jobs of one experiment that are not up to date become
    one job whose `fold` lists them (the refit last). Up-to-date folds stay single jobs (and
    are skipped)."""
    out: list[Job | list[Job]] = []  # a list: a run of folds to merge
    for job in jobs:
        if job.stage != TRAIN or job.parameters.get("fold") is None or not (force or stale(job)):
            out.append(job)
        elif out and isinstance(out[-1], list) and out[-1][0].cfg.experiment == job.cfg.experiment:
            out[-1].append(job)
        else:
            out.append([job])

    def merge(group: list[Job]) -> Job:
        parts = [j.parameters["fold"] for j in group]
        name = f"{TRAIN}_" + "_".join(artifacts.fold_name(k) for k in parts)
        first = next((j for j in group if j.why), group[0])  # one retrained for more epochs: the kernel retrains (the others are stale)
        return Job(first.stage, first.cfg, {**first.parameters, "fold": parts}, artifacts.notebook_path(first.cfg, name), first.why)

    return [j if isinstance(j, Job) else j[0] if len(j) == 1 else merge(j) for j in out]


def prepare_folds(cfgs: list[CFG]) -> None:
    """Before folds run side by side: build each experiment's image caches once, here, rather
    than in every fold process at the same time."""
    from .cache import create_cache
    from .data import read_test, read_train

    for cfg in cfgs:
        if cfg.cache:
            create_cache(cfg, read_train(cfg)["path"].tolist())
            create_cache(cfg, read_test(cfg)["path"].tolist())


def summary(cfgs: list[CFG]) -> str:
    """The CV of every stage (each experiment and its stacker) and the ensemble's scores."""
    lines = [f"{'stage':<34} {'metric':<9} {'CV':>9} {'fold mean ± std':>20}"]
    seen = set()
    for cfg in cfgs:
        for folder in (artifacts.exp_dir(cfg), artifacts.exp_dir(artifacts.stack_cfg(cfg))):
            s = artifacts.read_score(folder, missing_ok=True)
            if s is not None and folder not in seen:
                seen.add(folder)
                lines.append(f"{s['experiment']:<34} {s['metric']:<9} {s['cv']:>9.5f} {s['cv_mean']:>11.5f} ± {s['cv_std']:.5f}")
    s = artifacts.read_ensemble_score(cfgs[0])
    for cfg in cfgs:  # the refits the ensemble blended in
        mode = (s or {}).get("refit", {}).get(artifacts.exp_dir(cfg).name)
        if mode:
            epochs = len(artifacts.read_metrics(cfg, artifacts.REFIT))
            lines.append(f"{cfg.experiment + ' refit (all rows)':<34} {'-':<9} {'no CV':>9}   {epochs} epochs; "
                         f"test predictions: {'alone' if mode == 'alone' else 'half of the experiment'}")
    if s is not None:
        lines.append(f"{'ensemble (' + s['method'] + ', in-sample)':<34} {s['metric']:<9} {s['in_sample']:>9.5f}")
        lines.append(f"{'ensemble (' + s['method'] + ', held-out)':<34} {s['metric']:<9} {s['held_out']:>9.5f}")
        if s.get("local_lb") is not None:
            lines.append(f"{'local leaderboard (solution.csv)':<34} {s['metric']:<9} {s['local_lb']:>9.5f}")
        lines.append(f"submission: {s['submission']}; all results: {artifacts.results_path(cfgs[0])}")
        report = Path(s["submission"]).parent / "report.html"
        if report.is_file():
            lines.append(f"the run's report (open it in a browser): {report}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config in configs/")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    parser.add_argument("--experiments", nargs="*", help="only these experiments of the config")
    parser.add_argument("--stages", nargs="*", help=f"only these stages, of {STAGES}")
    parser.add_argument("--force", action="store_true", help="run every stage and retrain, also what is up to date")
    parser.add_argument("--dry-run", action="store_true", help="list what would run and why, run nothing")
    parser.add_argument("--gpus", type=int, help="train folds in parallel on this many GPUs (default: every visible GPU)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: this machine (folds in parallel, one per GPU); ray: every notebook as a Ray task")
    parser.add_argument("--address", help="with --executor ray: the cluster to join ('auto', or host:port); default a local Ray")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command that goes on after Ctrl-C
    if version_problems():
        print("\n".join(version_problems()), file=sys.stderr)
        return 2
    args.imports_s = None  # seconds this runner took to import what the notebooks import (time_limit plans with it)
    try:
        overrides = parse_set(args.set)
        if args.force:
            overrides["retrain"] = True
        # time_limit is a run-level key (the YAML's shared settings or --set): read without
        # resolving the config, whose quality presets import torch
        if not args.dry_run and any(layer.get("time_limit") for _, layer in config_layers(args.config, "", overrides)):
            args.imports_s = time_imports()  # before anything imports them: most of a notebook's start here
        jobs = plan(args.config, overrides, args.experiments, args.stages)
        if args.executor == "ray":  # every experiment's folds at once, then their later stages
            jobs = sorted(jobs, key=lambda job: (STAGES.index(job.stage), job.parameters.get("fold") == artifacts.REFIT))
    except (KeyError, TypeError, ValueError, FileNotFoundError) as e:
        print(f"config error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    if args.executor == "ray":
        try:
            import ray  # noqa: F401 - found missing now, not after the first notebook
        except ImportError:
            print("config error: --executor ray needs Ray, which is not installed: pip install -r requirements-ray.txt "
                  "(or run without --executor ray)", file=sys.stderr)
            return 2
    previous = os.environ.get(artifacts.OUTPUT_ROOT_ENV)
    os.environ[artifacts.OUTPUT_ROOT_ENV] = str(artifacts.output_root())  # the notebooks' kernels write where we read
    try:
        with contextlib.nullcontext() if args.dry_run else run_lock([artifacts.models_root(j.cfg) for j in jobs], args.config):
            return run(args, jobs)
    except RunLocked as e:
        print(f"nothing ran: {e}", file=sys.stderr)
        return 2
    finally:
        if previous is None:
            os.environ.pop(artifacts.OUTPUT_ROOT_ENV, None)
        else:
            os.environ[artifacts.OUTPUT_ROOT_ENV] = previous


def run(args: argparse.Namespace, jobs: list[Job]) -> int:
    """The checks before any work, then every job that is not up to date, in order."""
    try:
        gpus = gpu_slots(choose_gpus(args.gpus), max(job.cfg.ddp for job in jobs))
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        if not args.dry_run:
            try:
                jobs = before_work(args, jobs, gpus, start)  # the checks, the cache, time_limit's probes: minutes, maybe
            except (PermissionError, ValueError, KeyError, FileNotFoundError) as e:  # DataError is a ValueError
                print(f"nothing ran: {e.args[0] if e.args else e}", file=sys.stderr)
                return 2
        Runner(args, jobs, gpus).run()
    except KeyboardInterrupt:
        return stopped(args)
    except NotebookFailed as e:
        if "KeyboardInterrupt" in str(e):  # Ctrl-C reached the notebook's kernel first
            return stopped(args)
        print("FAILED")
        print(str(e), file=sys.stderr)
        return 1
    if not args.dry_run:
        report(jobs, start)
    return 0


def stopped(args: argparse.Namespace) -> int:
    """Ctrl-C: what finished is kept (every stage's outputs, each epoch's last.pt); the same
    command goes on from there."""
    again = shlex.join(["python", "-m", "helpers.pipeline", *(a for a in args.argv or [] if a != "--force")])  # not redone
    print(f"\nstopped (Ctrl-C). Nothing finished is lost: each finished stage is kept, and a fold stopped mid-way "
          f"resumes from its last finished epoch (last.pt). To go on: {again}", file=sys.stderr, flush=True)
    return 130


def before_work(args: argparse.Namespace, jobs: list[Job], gpus: list[str], start: float) -> list[Job]:
    """The output folders writable and the pre-flight check passed (or an error, before any
    work), the caches built once for folds side by side, the time budget's plan, and the folds
    that train one after another put in one kernel."""
    from .check import run_check  # the data's checks import torch: after the runner timed its imports

    cfgs = list({job.cfg.experiment: job.cfg for job in jobs}.values())
    problems = [p for cfg in cfgs for p in artifacts.unwritable(cfg)]
    if problems:
        raise PermissionError("\n  ".join(dict.fromkeys(problems)))
    run_check(cfgs)
    if len(gpus) > 1 and any(job.stage == TRAIN and stale(job) for job in jobs):
        prepare_folds(cfgs)
    if cfgs[0].time_limit:
        jobs = plan_budget(args, cfgs, start, gpus)
    if args.executor == "local" and len(gpus) <= 1:  # one fold after another: one kernel for them
        jobs = one_kernel(jobs, args.force)
    return jobs


class Runner:
    """Runs the jobs in order: each that is not up to date (or all, with --force); the folds of
    02_train side by side when there are several GPUs or Ray, the rest one after another; the
    time ledger told what each took."""

    def __init__(self, args: argparse.Namespace, jobs: list[Job], gpus: list[str]):
        self.args, self.jobs, self.gpus = args, jobs, gpus
        self.ray = args.executor == "ray"
        self.ran = False  # a stage ran (or would run): the ensemble, made from every experiment, runs too
        self.pending: list[Job] = []  # 02_train folds waiting to run side by side, one per GPU

    def run(self) -> None:
        for i, job in enumerate(self.jobs, 1):
            refit = job.parameters.get("fold") == artifacts.REFIT
            if job.stage != TRAIN or refit:
                self.flush()  # the folds running side by side finish before anything made from them
            why = "--force" if self.args.force else stale(job)
            if why is None and job.stage == FINAL and self.ran and self.args.dry_run:
                why = "experiments will be remade"
            head = f"[{i}/{len(self.jobs)}] {job.label} ..."
            if why is None:
                print(f"{head} up to date, skipped", flush=True)
                continue
            self.ran = True
            if self.args.dry_run:
                print(f"{head} would run ({why})", flush=True)
            elif job.stage == TRAIN and not refit and (self.ray or len(self.gpus) > 1):
                where = "as a Ray task" if self.ray else f"on GPU {self.gpus[len(self.pending) % len(self.gpus)]}"
                print(f"{head} {where} (parallel) ({why})", flush=True)
                self.pending.append(job)
            else:
                print(f"{head} ({why})", end="\n" if job.stage == TRAIN else " ", flush=True)
                self.one(job, i)
        self.flush()

    def later_epochs(self, i: int) -> float:
        """The epochs of the training jobs after the i-th (1-based) that are not up to date: the
        run's time left without time_limit, at this job's pace."""
        return sum(p.planned for job in self.jobs[i:] if job.stage == TRAIN and (self.args.force or stale(job))
                   for p in progress.parts_of(job.cfg, job.parameters.get("fold")))

    def one(self, job: Job, i: int) -> None:
        """A job alone, a training job with its progress shown (helpers.progress); a kernel of
        several folds marks its start in the ledger (its folds count it)."""
        merged = isinstance(job.parameters.get("fold"), list)
        if job.cfg.time_limit and merged:  # its folds count its start, spent before they record a second
            budget.kernel_started(job.cfg, budget_keys(job))
        watch = progress.Watch(progress.parts_of(job.cfg, job.parameters.get("fold")), self.later_epochs(i)) \
            if job.stage == TRAIN else contextlib.nullcontext()
        with watch:
            seconds = execute_on_ray([job], self.args.address)[0] if self.ray else execute(job)
        print(f"    {job.label} took {seconds:.1f}s" if job.stage == TRAIN else f"{seconds:.1f}s", flush=True)
        if job.cfg.time_limit and merged:  # the folds recorded their own time: the kernel's start is the rest
            budget.kernel_ended(job.cfg, seconds)
        elif job.cfg.time_limit:
            budget.spend(job.cfg, budget_key(job), seconds)

    def flush(self) -> None:
        """The folds waiting to run side by side, run."""
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        with contextlib.ExitStack() as watching:  # each fold's progress, as lines (several bars would fight)
            for job in batch:
                watching.enter_context(progress.Watch(progress.parts_of(job.cfg, job.parameters.get("fold")), tty=False))
            seconds = execute_on_ray(batch, self.args.address) if self.ray else execute_on_gpus(batch, self.gpus)
        if batch[0].cfg.time_limit:
            for job, s in zip(batch, seconds):
                budget.spend(job.cfg, budget_key(job), s)
        print(f"    {len(batch)} folds in parallel{' (Ray tasks)' if self.ray else ''}: "
              f"{', '.join(f'{s:.1f}s' for s in seconds)}", flush=True)


def report(jobs: list[Job], start: float) -> None:
    """The run's time (against time_limit, when set) and the scores of every stage."""
    cfgs = list({job.cfg.experiment: job.cfg for job in jobs}.values())
    print(f"\nall {len(jobs)} notebooks ran in {time.perf_counter() - start:.0f}s\n")
    if cfgs[0].time_limit and any(job.stage == FINAL for job in jobs):  # a run of some stages: not finished
        ledger = budget.finish(cfgs[0])
        used = budget.spent_s(ledger)
        print(f"time_limit {cfgs[0].time_limit}: {used:.0f}s of {ledger['limit_s']:.0f}s spent "
              f"({100 * used / ledger['limit_s']:.0f}%); the plan and each stage's seconds: {budget.ledger_path(cfgs[0])}\n")
    print(summary(cfgs))


# --- what a notebook's start and the stages after training cost --------------------------------
def time_imports() -> float | None:
    """Seconds this process takes to import what the notebooks import (torch, timm,
    albumentations, matplotlib, seaborn, the helpers): with KERNEL_S, a notebook's start on this
    machine (11-12 s on an H100 machine, 6 s on the 2-core CPU). None when they are imported
    already (the runner called from Python)."""
    if "torch" in sys.modules:
        return None
    start = time.perf_counter()
    import timm  # noqa: F401  (the notebooks that train or embed import it)

    from . import data, models, plots, train  # noqa: F401  (what the notebooks import)
    return time.perf_counter() - start


def budget_keys(job: Job) -> list[str]:
    """The ledger's keys for what a job of several folds makes."""
    return [budget.train_key(job.cfg, k) for k in job.parameters["fold"]]


def budget_key(job: Job) -> str:
    """The ledger's key for what a job makes."""
    fold = job.parameters.get("fold")
    return budget.train_key(job.cfg, fold) if fold is not None else f"{job.cfg.experiment}/{job.stage}"


def plan_budget(args: argparse.Namespace, cfgs: list[CFG], start: float, gpus: list[str]) -> list[Job]:
    """time_limit: open the run's ledger (a restarted run goes on with the time it has left),
    plan the image size and folds of each experiment from a probe of its model, and return
    the jobs of that plan."""
    from .data import read_test, read_train  # torch, timm and the probe: imported once the run is timed
    from .planning import plan_run
    from .tasks import task_of
    from .train import num_outputs

    overrides = parse_set(args.set) | ({"retrain": True} if args.force else {})
    cfgs = [load_cfg(args.config, c.experiment, overrides) for c in cfgs]  # as written: what the plan is made for
    train = read_train(cfgs[0])
    rows = (len(train), len(read_test(cfgs[0])))
    n_outs = [num_outputs(c, task_of(c).classes(train, c)) for c in cfgs]
    ledger = budget.open_ledger(cfgs, [budget.train_key(c, k) for c in cfgs
                                       for k in c.fold_ids + ([artifacts.REFIT] if artifacts.refit_on(c) else [])])
    ledger["parallel"] = len(gpus) if len(gpus) > 1 and args.executor == "local" else 1
    ledger["kernels"] = "per_experiment" if len(gpus) <= 1 and args.executor == "local" else "per_job"  # one_kernel
    imports_s = getattr(args, "imports_s", None)
    if imports_s is not None:  # a notebook's start on this machine, until the run's first notebooks measure it
        ledger["notebook_s"] = round(imports_s + budget.KERNEL_S, 2)
        ledger["spent"]["runner/imports"] = round(ledger["spent"].get("runner/imports", 0.0) + imports_s, 2)  # before the clock
    budget.write_ledger(cfgs[0], ledger)
    budget.add(cfgs[0], "runner/checks", time.perf_counter() - start)
    planning = time.perf_counter()
    plan = plan_run(cfgs, rows, n_outs)  # logs each change it makes
    print(f"time_limit {cfgs[0].time_limit}: {budget.spent_s(budget.read_ledger(cfgs[0])):.0f}s of "
          f"{ledger['limit_s']:.0f}s spent; "
          + "; ".join(f"{name}: {plan['img_size'][name]} px, folds {plan['folds'][name]}, about "
                      f"{plan['expected_epochs'][name]:.1f} epochs per fold"
                      + (f" and {plan['refit_epochs'][name]:.1f} for its refit" if name in plan.get("refit_epochs", {}) else "")
                      for name in plan["img_size"]), flush=True)
    jobs = [more_epochs(job, plan) for job in globals()["plan"](args.config, overrides, args.experiments, args.stages)]
    ledger = budget.read_ledger(cfgs[0])
    ledger["train_jobs"] = [budget_key(j) for j in jobs if j.stage == TRAIN and (args.force or stale(j))]  # to train
    # the plan's own probes (each cut probes again) and LightGBM timing: spent before the first notebook, so the
    # folds' epochs, planned from the time left, leave room for it (on the fine-tuning benchmark, 15 s of 300)
    ledger["spent"]["runner/plan"] = round(ledger["spent"].get("runner/plan", 0.0) + time.perf_counter() - planning, 2)
    budget.write_ledger(cfgs[0], ledger)
    return jobs


def more_epochs(job: Job, plan: dict) -> Job:
    """An up-to-date fold (or refit) the plan now gives materially more epochs than it trained
    (time_limit raised since): trained again, saying why (budget.undertrained); else as it is."""
    fold = job.parameters.get("fold")
    if job.stage != TRAIN or fold is None or stale(job):
        return job
    name = job.cfg.experiment
    planned = (plan.get("refit_epochs", {}).get(name) if fold == artifacts.REFIT else None) or plan["expected_epochs"].get(name)
    why = budget.undertrained(job.cfg, fold, planned) if planned else None
    if why is None:
        return job
    params = {**job.parameters, "overrides": {**job.parameters["overrides"], "retrain": True}}
    return dataclasses.replace(job, cfg=dataclasses.replace(job.cfg, retrain=True), parameters=params, why=why)


if __name__ == "__main__":
    sys.exit(main())
