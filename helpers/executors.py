"""How the runner's notebooks run: a job (a notebook, its parameters and where its executed copy
goes), executed with papermill here, side by side on several GPUs (one process each), or as Ray
tasks; the GPUs a run gets; and the lock that keeps a second runner off a models folder."""
from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import nbformat
import papermill as pm
import yaml

from . import artifacts
from .config import CFG, ROOT

NOTEBOOKS = ROOT / "notebooks"


@dataclass
class Job:
    stage: str
    cfg: CFG
    parameters: dict = field(default_factory=dict)
    output: Path = Path()
    why: str = ""  # a reason to run the runner found beyond freshness (time_limit: a fold it now plans more epochs for)

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


def execute(job: Job) -> float:
    """Run one notebook with papermill; raise NotebookFailed with a clear message on error."""
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
    free: queue.Queue = queue.Queue()
    for gpu in gpus:
        free.put(gpu)

    def run_one(job: Job) -> float:
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
        return list(pool.map(run_one, jobs))


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


class RunLocked(RuntimeError):
    """Another runner is using the models folder."""


@contextlib.contextmanager
def run_lock(roots: list[Path], config: str):
    """Hold the models folders for this run: a second runner on the same folder stops at once,
    saying which run holds it, instead of repeating its work and failing it. The lock is the
    operating system's (flock): a killed run releases it with its process."""
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
