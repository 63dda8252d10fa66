"""Data-parallel training across processes with torch DDP (one process per GPU, or N CPU processes).

Every rank holds the same seeded generator, so every rank draws the same global batch plan; rank r
trains on the r-th contiguous share of each global batch and DDP averages the gradients. The loss
is a batch mean of per-sample losses and the DPA networks have no BatchNorm (model/networks.py),
so N ranks × B/N take the same step as one process × B, up to float rounding: no batch statistics
to synchronise, hence no SyncBatchNorm. All ranks hold the same state, so rank 0 alone checkpoints.
The processes are started by torchrun (tasks/training/distributed_training.py); `gloo` on CPU, `nccl` on CUDA.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    """This process's place in the training job; one process without a job is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    joined: bool = False
    """Inside a process group (torchrun): gradients go through DDP, even with a single rank."""

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), True)
        return cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous part of a global batch (all of it in one process)."""
        n = len(batch) // self.size
        return batch[self.rank * n : (self.rank + 1) * n]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a per-rank batch mean: the global batch's value, the same on every rank."""
        if not self.joined:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)  # SUM: gloo has no AVG
        return total / self.size


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join the torchrun job (env:// rendezvous) for training on `device`; leave it afterwards.
    On CUDA each rank takes the GPU of its local rank."""
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield World.current()
    finally:
        dist.destroy_process_group()


class _StageLoss(nn.Module):
    """DDP hooks the gradients of what a module's forward computes: the DPA's training loss as one."""

    def __init__(self, dpa: nn.Module):
        super().__init__()
        self.dpa = dpa

    def forward(self, *args) -> torch.Tensor:
        return self.dpa.stage_loss(*args)


def data_parallel(dpa: nn.Module, multi_resolution: bool) -> DistributedDataParallel:
    """The DPA's stage loss under DDP. With progressive growing a stage leaves some resolutions'
    heads unused, which DDP must be told to look for; the frozen VGG and the statistics buffers
    are constant, so nothing is broadcast per step."""
    return DistributedDataParallel(_StageLoss(dpa), find_unused_parameters=multi_resolution,
                                   **no_buffer_sync(DistributedDataParallel.__init__))


def no_buffer_sync(ddp_init: Callable) -> dict[str, bool]:
    """DDP's switch for not syncing buffers every forward: `forward_sync_buffers` since torch 2.12,
    `broadcast_buffers` before (deprecated since). GPU images ship older torch than our pin (2.11)."""
    if "forward_sync_buffers" in inspect.signature(ddp_init).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}
