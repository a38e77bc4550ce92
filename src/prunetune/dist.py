"""torch.distributed helpers (gloo on CPU, nccl on GPU); every one is a no-op in a single process.

A run launched with `torchrun --nproc_per_node N` or `accelerate launch` uses the same global batch as a
single-process run: each rank takes one shard of every global batch, gradients are averaged across ranks
before the importance scores and the optimizer step, and only rank 0 writes files.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .logs import log  # noqa: F401  (the short form call sites use: `from ..dist import log`)


def init_from_env() -> bool:
    """Join the process group described by torchrun/accelerate environment variables, if any."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return is_distributed()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0)
    return torch.device("cpu")


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def average_gradients(params) -> None:
    """Average .grad across ranks in one flat all-reduce."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class GlobalBatchSampler(Sampler):
    """Seeded shuffled global batches (a new permutation per epoch); each rank yields its shard of every
    global batch, so N ranks together see exactly the batches one process would."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch = 0
        self.skip = 0  # batches of the current epoch already consumed (resume)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _batches(self):
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
                 if self.shuffle else torch.arange(self.n))
        world = world_size()
        for i in range(0, self.n, self.batch_size):
            batch = order[i:i + self.batch_size]
            if len(batch) >= world:  # a last batch smaller than the world size is dropped
                yield batch

    def __iter__(self):
        world, r = world_size(), rank()
        for i, batch in enumerate(self._batches()):
            if i >= self.skip:
                yield torch.tensor_split(batch, world)[r].tolist()

    def __len__(self) -> int:
        return sum(1 for _ in self._batches())
