"""The one place where FSDP2 is applied: each transformer block, then the root, per expert."""

from __future__ import annotations

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def shard_expert(model: torch.nn.Module, *, bf16: bool) -> torch.nn.Module:
    """FSDP2 over ``model``'s ``_no_split_modules`` blocks and its root.

    With ``bf16`` (--mixed_precision bf16, any device) parameters are all-gathered in bf16 and
    gradients reduced in float32; else everything stays as stored. Call after LoRA adapters are added.
    """
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules to shard")
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model
