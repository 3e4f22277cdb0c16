"""Process groups and the few collectives the trainer needs (torch.distributed underneath).

Work division (global batch of N = batch_size * num_generations samples, W ranks):

    global sample g:   0 1 2 3 | 4 5 6 7 | ...      prompt p = g // num_generations
    rank r holds:      g in [d*N/D, (d+1)*N/D)       (a group may span ranks)

with D = W / ulysses_size data-parallel slots and d = r // ulysses_size: the ranks of one
context-parallel group (--ulysses_size) hold the same samples and split each one's sequence.

Every sample's noise is seeded by g, rewards are all-gathered so every rank computes the same
advantages, and each rank replays only its own samples, the same number of passes per expert.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    cp_size: int = 1  # ranks per context-parallel group (--ulysses_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(*, device_type: str, need_group: bool, cp_size: int = 1) -> DistInfo:
    """Join torchrun's group (nccl on CUDA, gloo on CPU); a single process gets a 1-rank group only
    when ``need_group`` (FSDP2 needs one). ``cp_size``: ranks per context-parallel group."""
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), cp_size)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not under_torchrun and not need_group:
        return DistInfo(cp_size=cp_size)
    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(minutes=30)
    if under_torchrun:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # a private 1-rank group; the environment is left alone for child processes
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, cp_size)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors of all ranks along dim 0, in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_samples(t: torch.Tensor, cp_size: int = 1) -> torch.Tensor:
    """All ranks' samples in global order; a context-parallel group's copies are counted once."""
    parts = all_gather_cat(t).chunk(world_size()) if world_size() > 1 else (t,)
    return torch.cat(parts[::cp_size])


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
