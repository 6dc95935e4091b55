"""The runner: execute the notebooks in order with papermill, headlessly.

    python -m helpers.pipeline --config configs/digits.yaml [--set key=value ...]
                               [--experiments NAME ...] [--stages 02_train 05_ensemble]

00_eda runs once; 01_folds, 02_train (one run per fold, then the refit on all rows when
`refit` is set), 03_features and 04_stacking run for every experiment of the config;
05_ensemble runs once at the end. Folds that train one after another on one device share one
02_train run (one kernel start for them all). Each executed notebook is
saved under models/<experiment>/notebooks/. A stage runs only when its output is not up to
date (helpers.artifacts.stale: a config key it depends on, an input file or an upstream output
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
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import artifacts
from .config import CFG, ROOT, config_layers, experiment_names, load_cfg, parse_set

NOTEBOOKS = ROOT / "notebooks"
STAGES = ["00_eda", "01_folds", "02_train", "03_features", "04_stacking", "05_ensemble"]


@dataclass
class Job:
    stage: str
    cfg: CFG
    parameters: dict = field(default_factory=dict)
    output: Path = Path()

    @property
    def label(self) -> str:
        fold = self.parameters.get("fold")
        if isinstance(fold, list):  # several folds (and the refit) in one kernel
            folds = [k for k in fold if k != artifacts.REFIT]
            part = (f" folds {', '.join(map(str, folds))}" if len(folds) > 1 else f" fold {folds[0]}" if folds else "") + (
                f"{' +' if folds else ''} refit (all rows)" if artifacts.REFIT in fold else "")
        else:
            part = "" if fold is None else " refit (all rows)" if fold == artifacts.REFIT else f" fold {fold}"
        return f"{self.stage}{part} [{self.cfg.experiment}]"


class NotebookFailed(RuntimeError):
    pass


def plan(config: str, overrides: dict, experiments: list[str] | None = None, stages: list[str] | None = None) -> list[Job]:
    """All notebook runs, in order. Every experiment's config is resolved and its model
    settings checked before anything runs."""
    from .models import model_problems

    from .budget import apply_plan

    names = experiments or experiment_names(config)
    cfgs = [apply_plan(load_cfg(config, name, overrides)) for name in names]  # time_limit: the planned size and folds
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

    def add(stage: str, cfg: CFG, name: str, experiment: str, **extra) -> None:
        if stage in stages:
            params = {"config_path": config_path, "experiment": experiment, "overrides": overrides, **extra}
            jobs.append(Job(stage, cfg, params, artifacts.notebook_path(cfg, name, ensemble=stage == "05_ensemble")))

    add("00_eda", cfgs[0], "00_eda", names[0])
    for name, cfg in zip(names, cfgs):
        add("01_folds", cfg, "01_folds", name)
        for k in cfg.fold_ids:
            add("02_train", cfg, f"02_train_fold{k}", name, fold=k)
        if artifacts.refit_on(cfg):  # after every fold: it trains for their mean best epoch
            add("02_train", cfg, "02_train_refit", name, fold=artifacts.REFIT)
        add("03_features", cfg, "03_features", name)
        add("04_stacking", cfg, "04_stacking", name)
    add("05_ensemble", cfgs[0], "05_ensemble", names[0], experiments=names)
    return jobs


def stale(job: Job) -> str | None:
    """Why the job's outputs must be (re)made, or None when they are up to date."""
    with artifacts.decision():
        return _stale(job)


def _stale(job: Job) -> str | None:
    cfg, fold = job.cfg, job.parameters.get("fold")
    if job.stage == "00_eda":
        return artifacts.stale(cfg, "eda")
    if job.stage == "01_folds":
        return artifacts.stale(cfg, "folds")
    if job.stage == "02_train" and isinstance(fold, list):
        return next((why for k in fold if (why := _stale(Job(job.stage, cfg, {**job.parameters, "fold": k}))) is not None), None)
    if job.stage == "02_train" and fold == artifacts.REFIT:
        return artifacts.stale(cfg, "refit") or artifacts.stale(cfg, "refit_test")
    if job.stage == "02_train":
        return artifacts.stale(cfg, "train", fold) or artifacts.stale(cfg, "test", fold)
    if job.stage == "03_features":
        parts = [None] if cfg.features_from == "pretrained" else cfg.fold_ids
        reasons = [artifacts.stale(cfg, "features", k) for k in parts]
        if cfg.features_from == "folds":
            reasons.insert(0, artifacts.stale(cfg, "cv"))
        return next((r for r in reasons if r), None)
    if job.stage == "04_stacking":
        return artifacts.stale(cfg, "stacking")
    return artifacts.stale(cfg, "ensemble")


def one_kernel(jobs: list[Job], force: bool) -> list[Job]:
    """The folds of an experiment that must be trained one after another on one device, run in
    one notebook (one kernel start and its imports, about 8 s on a 2-core machine, instead of
    one per fold): consecutive 02_train jobs of one experiment that are not up to date become
    one job whose `fold` lists them (the refit last). Up-to-date folds stay single jobs (and
    are skipped)."""
    out: list[Job | list[Job]] = []  # a list: a run of folds to merge
    for job in jobs:
        if job.stage != "02_train" or job.parameters.get("fold") is None or not (force or stale(job)):
            out.append(job)
        elif out and isinstance(out[-1], list) and out[-1][0].cfg.experiment == job.cfg.experiment:
            out[-1].append(job)
        else:
            out.append([job])

    def merge(group: list[Job]) -> Job:
        parts = [j.parameters["fold"] for j in group]
        name = "02_train_" + "_".join(artifacts.fold_name(k) for k in parts)
        return Job(group[0].stage, group[0].cfg, {**group[0].parameters, "fold": parts}, artifacts.notebook_path(group[0].cfg, name))

    return [j if isinstance(j, Job) else j[0] if len(j) == 1 else merge(j) for j in out]


def execute(job: Job) -> float:
    """Run one notebook with papermill; raise NotebookFailed with a clear message on error."""
    import papermill as pm

    job.output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        pm.execute_notebook(str(NOTEBOOKS / f"{job.stage}.ipynb"), str(job.output), parameters=job.parameters,
                            cwd=str(NOTEBOOKS), progress_bar=False, kernel_name="python3")
    except pm.PapermillExecutionError as e:
        raise NotebookFailed(
            f"notebook {job.stage}.ipynb failed ({job.label}) at cell {e.cell_index} (execution count {e.exec_count}):\n"
            f"  {e.ename}: {e.evalue}\n  executed copy with the traceback: {job.output}"
        ) from None
    return time.perf_counter() - start


def _failure(job: Job, fallback: str) -> NotebookFailed:
    """NotebookFailed from the executed copy that a papermill subprocess left behind."""
    import nbformat

    try:
        nb = nbformat.read(job.output, as_version=4)
        for index, cell in enumerate(nb.cells):
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error":
                    return NotebookFailed(
                        f"notebook {job.stage}.ipynb failed ({job.label}) at cell {index} (execution count "
                        f"{cell.get('execution_count')}):\n  {out['ename']}: {out['evalue']}\n"
                        f"  executed copy with the traceback: {job.output}")
    except (OSError, ValueError):
        pass
    return NotebookFailed(f"notebook {job.stage}.ipynb failed ({job.label}): {fallback[-2000:]}")


def prepare_folds(cfgs: list[CFG]) -> None:
    """Before folds run side by side: build each experiment's image caches once, here, rather
    than in every fold process at the same time."""
    from .cache import create_cache
    from .data import read_test, read_train

    for cfg in cfgs:
        if cfg.cache:
            create_cache(cfg, read_train(cfg)["path"].tolist())
            create_cache(cfg, read_test(cfg)["path"].tolist())


def share_workers(job: Job, processes: int) -> Job:
    """The job with DataLoader workers divided among the processes running side by side (the
    machine's cores are shared: 4 on a Kaggle kernel for 2 GPUs)."""
    per_process = max(1, (os.cpu_count() or 1) // processes)
    workers = min(job.cfg.num_workers, per_process)
    params = {**job.parameters, "overrides": {**job.parameters.get("overrides", {}), "num_workers": workers}}
    return Job(job.stage, job.cfg, params, job.output)


def execute_on_gpus(jobs: list[Job], gpus: list[str]) -> list[float]:
    """Run jobs (the folds of 02_train) at once, one per GPU: each a papermill process that
    sees only its GPU (CUDA_VISIBLE_DEVICES) and its share of the CPU cores for DataLoader
    workers. Returns their times; raises on the first failure."""
    jobs = [share_workers(job, min(len(gpus), len(jobs))) for job in jobs]
    import queue
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    import yaml

    free: queue.Queue = queue.Queue()
    for gpu in gpus:
        free.put(gpu)

    def run(job: Job) -> float:
        gpu = free.get()
        try:
            job.output.parent.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "papermill", str(NOTEBOOKS / f"{job.stage}.ipynb"), str(job.output),
                   "--cwd", str(NOTEBOOKS), "-k", "python3", "--no-progress-bar", "-y", yaml.safe_dump(job.parameters)]
            proc = subprocess.run(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}, capture_output=True, text=True)
            if proc.returncode != 0:
                raise _failure(job, proc.stderr)
            return time.perf_counter() - start
        finally:
            free.put(gpu)

    with ThreadPoolExecutor(max_workers=len(gpus)) as pool:
        return list(pool.map(run, jobs))


def start_ray(address: str | None):
    """Ray for --executor ray: the cluster at `address` ('auto': the one this machine joined),
    or a local one. Ray is an optional extra (requirements-ray.txt)."""
    try:
        import ray
    except ImportError:
        raise ImportError("--executor ray needs Ray: pip install -r requirements-ray.txt") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    return ray


def _run_on_node(job: Job) -> float:
    """A job's notebook on whichever Ray node got it (the same code as locally)."""
    return execute(job)


def execute_on_ray(jobs: list[Job], address: str | None) -> list[float]:
    """Run jobs at once as Ray tasks, each asking for its GPUs (ddp of them) when the cluster
    has GPUs, else for one CPU; outputs go to models_dir, which every node must reach (a
    shared path). Returns their times; raises NotebookFailed, with its notebook and cell, on
    the first failure."""
    ray = start_ray(address)
    gpus = ray.cluster_resources().get("GPU", 0)
    env = {"env_vars": {artifacts.OUTPUT_ROOT_ENV: str(artifacts.output_root())}}
    remote = ray.remote(_run_on_node)
    refs = [remote.options(num_gpus=job.cfg.ddp if gpus else 0, num_cpus=0 if gpus else 1, runtime_env=env,
                           max_retries=0).remote(job) for job in jobs]
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        raise NotebookFailed(str(cause) if isinstance(cause, NotebookFailed) else str(e)) from None


def choose_gpus(count: int | None) -> list[str]:
    """The GPUs to run folds on: the first `count` of those CUDA_VISIBLE_DEVICES lets this
    process see (all of them by default). Without CUDA, `count` processes that see no GPU."""
    visible = visible_gpus()
    if count is None:
        return visible
    if not visible:
        return [str(g) for g in range(count)]
    if count > len(visible):
        raise ValueError(f"--gpus {count}: only {len(visible)} GPU(s) are visible ({', '.join(visible)})")
    return visible[:count]


def gpu_slots(gpus: list[str], ddp: int) -> list[str]:
    """What each fold process gets: one GPU, or, with `ddp: N`, N of them ("0,1"), whose
    processes train that fold together."""
    if ddp <= 1 or not visible_gpus():
        return gpus
    if len(gpus) < ddp:
        raise ValueError(f"ddp: {ddp} needs {ddp} GPUs per fold; {len(gpus)} are visible ({', '.join(gpus)})")
    return [",".join(gpus[i:i + ddp]) for i in range(0, len(gpus) - ddp + 1, ddp)]


def visible_gpus() -> list[str]:
    """The CUDA devices this process sees (as CUDA_VISIBLE_DEVICES ids)."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [i.strip() for i in listed.split(",") if i.strip()] if listed else [str(i) for i in range(torch.cuda.device_count())]
    return ids[: torch.cuda.device_count()]


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
    from .budget import time_imports
    from .utils import version_problems

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


class RunLocked(RuntimeError):
    """Another runner is using the models folder."""


@contextlib.contextmanager
def run_lock(roots: list[Path], config: str):
    """Hold the models folders for this run: a second runner on the same folder stops at once,
    saying which run holds it, instead of repeating its work and failing it. The lock is the
    operating system's (flock): a killed run releases it with its process."""
    import fcntl
    import socket
    from datetime import datetime

    held = []
    try:
        for root in sorted(set(roots)):
            try:
                root.mkdir(parents=True, exist_ok=True)
                f = open(root / ".runner.lock", "a+")
            except OSError:
                continue  # a folder this process cannot write: the checks before any work name it
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise RunLocked(f"another run is using {root} ({holder}); wait for it to end, or give this run another "
                                f"models_dir") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {datetime.now():%Y-%m-%d %H:%M:%S}, config {config}\n")
            f.flush()
            held.append(f)
        yield
    finally:
        for f in held:
            f.close()  # closing releases the lock


def run(args: argparse.Namespace, jobs: list[Job]) -> int:
    """The checks before any work, then every job that is not up to date, in order."""
    try:
        gpus = gpu_slots(choose_gpus(args.gpus), max(job.cfg.ddp for job in jobs))
    except ValueError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    cfgs = list({job.cfg.experiment: job.cfg for job in jobs}.values())
    if not args.dry_run:
        problems = [p for cfg in cfgs for p in artifacts.unwritable(cfg)]
        try:
            from .check import run_check

            if problems:
                raise PermissionError("\n  ".join(dict.fromkeys(problems)))
            run_check(cfgs)
            if len(gpus) > 1 and any(job.stage == "02_train" and stale(job) for job in jobs):
                prepare_folds(cfgs)
        except (PermissionError, ValueError, KeyError, FileNotFoundError) as e:  # DataError is a ValueError
            print(f"nothing ran: {e.args[0] if e.args else e}", file=sys.stderr)
            return 2
        if cfgs[0].time_limit:
            jobs = plan_budget(args, cfgs, start, gpus)
            cfgs = list({job.cfg.experiment: job.cfg for job in jobs}.values())
        if args.executor == "local" and len(gpus) <= 1:  # one fold after another: one kernel for them
            jobs = one_kernel(jobs, args.force)
    ran = False  # a stage ran (or would run): the ensemble, made from every experiment, runs too
    pending: list[tuple[int, Job]] = []  # 02_train folds waiting to run side by side, one per GPU

    ray = args.executor == "ray"

    def flush() -> None:
        if not pending:
            return
        batch = [job for _, job in pending]
        seconds = execute_on_ray(batch, args.address) if ray else execute_on_gpus(batch, gpus)
        if batch[0].cfg.time_limit:
            from . import budget

            for job, s in zip(batch, seconds):
                budget.spend(job.cfg, budget_key(job), s)
        print(f"    {len(pending)} folds in parallel{' (Ray tasks)' if ray else ''}: {', '.join(f'{s:.1f}s' for s in seconds)}",
              flush=True)
        pending.clear()

    try:
        for i, job in enumerate(jobs, 1):
            refit = job.parameters.get("fold") == artifacts.REFIT
            if job.stage != "02_train" or refit:
                flush()  # the folds running side by side finish before anything made from them
            why = "--force" if args.force else stale(job)
            if why is None and job.stage == "05_ensemble" and ran and args.dry_run:
                why = "experiments will be remade"
            if why is None:
                print(f"[{i}/{len(jobs)}] {job.label} ... up to date, skipped", flush=True)
                continue
            ran = True
            if args.dry_run:
                print(f"[{i}/{len(jobs)}] {job.label} ... would run ({why})", flush=True)
                continue
            if job.stage == "02_train" and not refit and (ray or len(gpus) > 1):
                where = "as a Ray task" if ray else f"on GPU {gpus[len(pending) % len(gpus)]}"
                print(f"[{i}/{len(jobs)}] {job.label} ... {where} (parallel) ({why})", flush=True)
                pending.append((i, job))
                continue
            print(f"[{i}/{len(jobs)}] {job.label} ... ({why})", end=" ", flush=True)
            merged = isinstance(job.parameters.get("fold"), list)
            if job.cfg.time_limit:
                from . import budget

                if merged:  # its folds count its start, spent before they record a second
                    budget.kernel_started(job.cfg, budget_keys(job))
            seconds = execute_on_ray([job], args.address)[0] if ray else execute(job)
            print(f"{seconds:.1f}s", flush=True)
            if job.cfg.time_limit and merged:  # the folds recorded their own time: the kernel's start is the rest
                budget.kernel_ended(job.cfg, seconds)
            elif job.cfg.time_limit:
                budget.spend(job.cfg, budget_key(job), seconds)
        flush()
    except NotebookFailed as e:
        print("FAILED")
        print(str(e), file=sys.stderr)
        return 1
    if args.dry_run:
        return 0
    print(f"\nall {len(jobs)} notebooks ran in {time.perf_counter() - start:.0f}s\n")
    if cfgs[0].time_limit and any(job.stage == "05_ensemble" for job in jobs):  # a run of some stages: not finished
        from . import budget

        ledger = budget.finish(cfgs[0])
        used = budget.spent_s(ledger)
        print(f"time_limit {cfgs[0].time_limit}: {used:.0f}s of {ledger['limit_s']:.0f}s spent "
              f"({100 * used / ledger['limit_s']:.0f}%); the plan and each stage's seconds: {budget.ledger_path(cfgs[0])}\n")
    print(summary(cfgs))
    return 0


def budget_keys(job: Job) -> list[str]:
    """The ledger's keys for what a job of several folds makes."""
    from . import budget

    return [budget.train_key(job.cfg, k) for k in job.parameters["fold"]]


def budget_key(job: Job) -> str:
    """The ledger's key for what a job makes."""
    from . import budget

    fold = job.parameters.get("fold")
    return budget.train_key(job.cfg, fold) if fold is not None else f"{job.cfg.experiment}/{job.stage}"


def plan_budget(args: argparse.Namespace, cfgs: list[CFG], start: float, gpus: list[str]) -> list[Job]:
    """time_limit: open the run's ledger (a restarted run goes on with the time it has left),
    plan the image size and folds of each experiment from a probe of its model, and return
    the jobs of that plan."""
    from . import budget
    from .data import get_classes, read_test, read_train
    from .train import num_outputs

    overrides = parse_set(args.set) | ({"retrain": True} if args.force else {})
    cfgs = [load_cfg(args.config, c.experiment, overrides) for c in cfgs]  # as written: what the plan is made for
    train = read_train(cfgs[0])
    rows = (len(train), len(read_test(cfgs[0])))
    n_outs = [num_outputs(c, None if c.task == "regression" else get_classes(train, c)) for c in cfgs]
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
    plan = budget.plan_run(cfgs, rows, n_outs)  # logs each change it makes
    print(f"time_limit {cfgs[0].time_limit}: {budget.spent_s(budget.read_ledger(cfgs[0])):.0f}s of "
          f"{ledger['limit_s']:.0f}s spent; "
          + "; ".join(f"{name}: {plan['img_size'][name]} px, folds {plan['folds'][name]}, about "
                      f"{plan['expected_epochs'][name]:.1f} epochs per fold"
                      + (f" and {plan['refit_epochs'][name]:.1f} for its refit" if name in plan.get("refit_epochs", {}) else "")
                      for name in plan["img_size"]), flush=True)
    jobs = globals()["plan"](args.config, overrides, args.experiments, args.stages)
    ledger = budget.read_ledger(cfgs[0])
    ledger["train_jobs"] = [budget_key(j) for j in jobs if j.stage == "02_train" and (args.force or stale(j))]  # to train
    budget.write_ledger(cfgs[0], ledger)
    return jobs


if __name__ == "__main__":
    sys.exit(main())
