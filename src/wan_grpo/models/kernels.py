"""Speed options of the experts: diffusers' attention backend and regional torch.compile."""

from __future__ import annotations

import logging
import shutil

from wan_grpo.errors import UserError

log = logging.getLogger("wan_grpo")


def attention_backends() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return sorted(b.value for b in AttentionBackendName)


def check_attention_backend(name: str | None) -> None:
    """Before anything loads: the name is one of diffusers' backends and its package is installed."""
    if name is None:
        return
    from diffusers.models import attention_dispatch

    names = attention_backends()
    if name.lower() not in names:
        raise UserError(f"--attention_backend {name!r} is not one of diffusers' backends: {', '.join(names)}")
    try:  # the same check set_attention_backend makes, so a missing package fails before the model loads
        attention_dispatch._check_attention_backend_requirements(attention_dispatch.AttentionBackendName(name.lower()))
    except (RuntimeError, ImportError) as exc:
        raise UserError(f"--attention_backend {name}: {str(exc).splitlines()[0]}") from None


def set_attention_backend(experts, name: str | None) -> None:
    """Every expert's attention runs through ``name`` (diffusers' ``set_attention_backend``)."""
    if name is None:
        return
    for expert in experts:
        try:
            expert.set_attention_backend(name.lower())
        except Exception as exc:  # ValueError, RuntimeError, a hub kernel's download error, ...
            raise UserError(f"--attention_backend {name}: {str(exc).splitlines()[0]}") from None


def check_context_parallel(name: str | None, ulysses_size: int) -> None:
    """Ulysses needs a backend that diffusers' context parallelism supports; say so before the model loads."""
    if name is None or ulysses_size <= 1:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    if not _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(name.lower())):
        supported = sorted(_AttentionBackendRegistry._supports_context_parallel)
        raise UserError(f"--attention_backend {name} does not support --ulysses_size > 1; use one of "
                        f"{', '.join(supported)}")


def check_compile(enabled: bool, device_type: str) -> None:
    """torch.compile's CPU code generation needs a C++ compiler; say so before anything loads."""
    if enabled and device_type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        raise UserError("--compile on CPU needs a C++ compiler (g++) for torch.compile's code generation; install "
                        "one or drop --compile")


def compile_blocks(experts) -> None:
    """Regional compilation: each transformer block is compiled on its first call (diffusers'
    ``compile_repeated_blocks``), so compile time is that of one block, not of the whole model; LoRA
    added later and FSDP2 sharding per block still apply."""
    for expert in experts:
        expert.compile_repeated_blocks()
    log.info("torch.compile: every transformer block of %d expert(s), compiled on first use", len(experts))
