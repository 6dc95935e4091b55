"""One fold over several processes: DistributedDataParallel through torch.distributed.

`ddp: N` in the config trains a fold with N processes (one per GPU; gloo on the CPU). They are
started by torchrun's own launcher (`torch.distributed.launcher.api.elastic_launch`, what the
`torchrun` command runs), called from train_fold, so the same call works in a notebook
(Jupyter, a Kaggle 2xT4 kernel) and in the runner's papermill processes. Each process reads its
share of the rows (EpochSampler's rank and world: no row dropped or counted twice); the
validation predictions are gathered to rank 0, which scores them, tells the others, and alone
writes files. `batch_size` stays the global batch (each process takes batch_size / N), so a
recipe means the same with 1 or N processes, and a checkpoint resumes with any number.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import uuid

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from torch.nn.parallel import DistributedDataParallel


class Processes:
    """The process a fold trains in: rank 0 of 1 (no torch.distributed)."""

    rank, world = 0, 1

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def mean(self, value: float, weight: float) -> float:
        """The weighted mean of each process's value."""
        return value

    def gather_rows(self, array: np.ndarray) -> np.ndarray | None:
        """Rank 0: every process's rows in the order EpochSampler dealt them (row i from rank
        i % world); the others: None."""
        return array

    def broadcast(self, obj):
        return obj

    def barrier(self) -> None:
        pass


class DDPProcesses(Processes):
    """One of `world` processes of an initialised process group."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def mean(self, value: float, weight: float) -> float:
        t = torch.tensor([value * weight, weight], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t[0] / max(t[1], 1e-12))

    def gather_rows(self, array: np.ndarray) -> np.ndarray | None:
        parts = [None] * self.world
        dist.all_gather_object(parts, array)
        if not self.main:
            return None
        out = np.empty((sum(len(p) for p in parts), *array.shape[1:]), dtype=array.dtype)
        for r, part in enumerate(parts):
            out[r::self.world] = part
        return out

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(worker, processes: int, *args) -> None:
    """Run `worker(*args)` in `processes` processes with torchrun's launcher (rendezvous on
    this machine; a failed process fails the whole run with its traceback)."""
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=uuid.uuid4().hex[:8],
                          rdzv_backend="c10d", rdzv_endpoint=f"localhost:{_free_port()}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    elastic_launch(config, worker)(*args)


def start() -> DDPProcesses:
    """In a process torchrun's launcher started: join the group (NCCL on GPUs, gloo on the
    CPU), take this process's GPU and its share of the CPU threads. The launcher starts its
    processes with spawn, and a spawned process inherits spawn as its default start method:
    its DataLoader workers would then each import torch, timm and albumentations afresh (30 s
    and more before the first batch; on the H200 machine the first epoch had not ended after
    70 s). The platform's default again (fork on Linux, as under the torchrun command)."""
    multiprocessing.set_start_method(None, force=True)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return DDPProcesses(device)


def stop() -> None:
    """Leave the process group (the end of a process the launcher started)."""
    dist.destroy_process_group()


def quiet_logger(rank: int, logger: logging.Logger) -> logging.Logger:
    """Rank 0 logs; the other processes stay silent."""
    if rank == 0:
        return logger
    silent = logging.getLogger(f"kaggle.rank{rank}")
    silent.addHandler(logging.NullHandler())
    silent.propagate = False
    return silent
