"""Ulysses sequence parallelism (--ulysses_size K) through diffusers' context parallelism.

The ranks are laid out on a (dp, ring=1, ulysses=K) DeviceMesh: rank r is context-parallel peer
r % K of data-parallel slot r // K. diffusers' ``enable_parallelism(ContextParallelConfig(
ulysses_degree=K, mesh=...))`` splits every expert's token sequence over the K peers (attention
runs head-parallel after an all-to-all) and gathers the output, so every peer sees the full
velocity. FSDP2 shards over all ranks and averages gradients over them; each peer's gradient is
its part of the sequence's, so the update divides sample counts by K (grpo/update.py).

diffusers needs an accelerator here (it takes ``rank % torch.accelerator.device_count()``): on CPU
it is refused, except for the test suite, which sets WAN_GRPO_CPU_CONTEXT_PARALLEL=1 and runs the
same code over gloo through a shim that reports one accelerator (tests/cpu_context_parallel.py).
"""

from __future__ import annotations

import os

from wan_grpo.errors import UserError

CPU_TEST_ENV = "WAN_GRPO_CPU_CONTEXT_PARALLEL"


def check_device(cp_size: int, *, world_size: int, device_type: str) -> None:
    """Before anything loads: CUDA (or the CPU test switch) and a process count K divides."""
    if cp_size < 1:
        raise UserError(f"--ulysses_size {cp_size} must be >= 1")
    if cp_size == 1:
        return
    if device_type != "cuda" and os.environ.get(CPU_TEST_ENV) != "1":
        raise UserError(f"--ulysses_size {cp_size} needs CUDA GPUs (diffusers' context parallelism, diffusers >= "
                        "0.36); use --ulysses_size 1 on CPU")
    if world_size % cp_size:
        raise UserError(f"--ulysses_size {cp_size} does not divide the {world_size} processes; launch a multiple "
                        f"of {cp_size} with torchrun")


def check_model(cp_size: int, *, heads: int, tokens: int) -> None:
    """Ulysses splits attention heads and the token sequence K ways: both must divide."""
    if cp_size == 1:
        return
    if heads % cp_size:
        raise UserError(f"--ulysses_size {cp_size} must divide the transformer's {heads} attention heads")
    if tokens % cp_size:
        raise UserError(f"--ulysses_size {cp_size} must divide the {tokens} tokens of a video; change --size or "
                        "--frame_num")


def enable(experts, *, cp_size: int, device_type: str) -> None:
    """Turn on Ulysses for every expert (after FSDP2 wrapping), sharing one mesh."""
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh(device_type, (world // cp_size, 1, cp_size), mesh_dim_names=("dp", "ring", "ulysses"))
    for expert in experts:
        expert.enable_parallelism(config=ContextParallelConfig(ulysses_degree=cp_size, mesh=mesh))
