"""The same training code single-process or under `torchrun` (one process per GPU, or per CPU
share with gloo), on one node or many.

Plain torch.distributed + DistributedDataParallel rather than Lightning Fabric: our loop already
owns what Fabric would add (checkpoints with optimiser/RNG state, resume, precision, devices), so
DDP is the few calls below and no new dependency.

    ctx = Distributed.from_env(placement)   # reads RANK/WORLD_SIZE/LOCAL_RANK that torchrun sets
    model = ctx.wrap(model)                  # DDP: gradients all-reduced (averaged) every step
    if ctx.is_main: save(...)                # rank 0 alone writes checkpoints, lineage, reports

Batches: every rank draws the same global batch (same seed) and keeps its contiguous share
(`shard`), so N ranks with batch B/N each average to exactly the gradient of one process with
batch B; a lazy DataLoader shards its crops by rank instead (ground.data.lazy).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ground.errors import ConfigError


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, placement=None) -> "Distributed":
        """The process group torchrun describes in the environment (joined once), or a single process.
        Under CUDA each process takes the GPU of its LOCAL_RANK (nccl); on the CPU gloo."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        # without a placement (e.g. labelling before training): the backend the machine's GPUs want
        cuda = placement.cuda if placement is not None else torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        if placement is not None and placement.cuda:
            placement.device = torch.device("cuda", local)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
        return cls(rank, world, local)

    def wrap(self, model: torch.nn.Module, placement=None) -> torch.nn.Module:
        """DDP around `model` (already on its device); BatchNorm synchronised across GPUs (SyncBatchNorm
        runs on CUDA only: on the CPU each rank normalises its own share)."""
        if not self.enabled:
            return model
        cuda = placement is not None and placement.cuda
        if cuda:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[self.local_rank] if cuda else None)

    def shard(self, batch: int) -> slice:
        """This rank's contiguous share of a global batch of `batch` items."""
        if batch % self.world_size:
            raise ConfigError(f"train.batch {batch} must divide evenly over {self.world_size} processes")
        n = batch // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def average_gradients(self, params) -> None:
        """All-reduce (mean) the gradients of parameters DDP does not own (e.g. feature adapters)."""
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a float over all ranks (losses for logging, validation scores)."""
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def broadcast(self, obj):
        """Rank 0's Python object on every rank (e.g. the early-stopping decision)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP (what checkpoints save and evaluation runs)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
