"""This process's place among those ``torchrun`` started, the CPU threads it may use, and sums over them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Processes:
    """This process's place among those ``torchrun`` started (one process without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    group: object = None  # the torch.distributed group these processes form (None: all of them)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Processes:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))


def default_threads(local_world_size: int) -> int:
    """The cores this process may use, shared among the processes on this machine.

    All cores is right only with ``OMP_WAIT_POLICY=PASSIVE``, which the ``bmojo`` command sets before torch loads
    (``bmojo.cli.set_thread_environment``): with spinning OpenMP threads, one other busy process makes every
    parallel region wait for the thread that shares its core. Seconds per step of the default run on 2 cores
    (``scripts/bench_threads.py``, median of 3, machine shared; README "CPU threads"):

    ====================  =====  ===============  ==================  ===============
    threads               alone  one busy core    alone, load 8-12    one busy core
    ====================  =====  ===============  ==================  ===============
    2, spinning           6.18   21.6             36.7                51.5
    1                     1.46   4.13             3.94                7.18
    2, passive (default)  1.39   3.53             4.13                2.90
    ====================  =====  ===============  ==================  ===============
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size)


def all_sum(values: torch.Tensor, procs: Processes) -> torch.Tensor:
    if procs.world_size > 1:
        dist.all_reduce(values, group=procs.group)
    return values
