"""Group-relative advantages (GRPO) and best-of-n selection. Pure tensor functions.

Samples are prompt-major: rewards of shape (N,) view as (G, n) with n = group size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Advantages:
    values: torch.Tensor  # (N,) combined, clipped advantages
    keep: torch.Tensor  # (N,) bool: samples that are trained
    dropped_groups: int  # groups skipped for zero reward variance


def normalize_in_groups(rewards: torch.Tensor, group_size: int, *, global_std: bool = False,
                        eps: float = 1e-4, valid_groups: torch.Tensor | None = None) -> torch.Tensor:
    """(r - mean_group) / (std + eps); std is the group's, or the whole batch's with ``global_std``
    (over ``valid_groups`` only when given: groups without rewards must not enter it).

    std is the population std (ddof 0), as Flow-GRPO computes it with numpy.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.double().view(-1, group_size)  # (G, n)
    mean = r.mean(dim=1, keepdim=True)
    if global_std:
        pool = r if valid_groups is None or not bool(valid_groups.any()) else r[valid_groups]
        std = pool.std(dim=None, unbiased=False)
    else:
        std = r.std(dim=1, unbiased=False, keepdim=True)
    return ((r - mean) / (std + eps)).view(-1).to(rewards.dtype)


def group_advantages(
    rewards: dict[str, torch.Tensor],
    coefs: dict[str, float],
    *,
    group_size: int,
    global_std: bool = False,
    drop_zero_std_groups: bool = False,
    clip_max: float = 5.0,
    eps: float = 1e-4,
    valid_groups: torch.Tensor | None = None,
) -> Advantages:
    """Normalise each component within its group, combine with ``coefs``, clip to +-clip_max.

    ``valid_groups`` (G,) bool marks groups that have rewards; the others get advantage 0, are not
    kept, and enter neither the global std nor the zero-variance count.
    """
    names = [k for k, c in coefs.items() if c != 0]
    if not names:
        raise ValueError("every reward coefficient is 0: nothing to optimise")
    n = rewards[names[0]].numel()
    combined = torch.zeros(n, dtype=torch.float32)
    zero_std = torch.ones(n // group_size, dtype=torch.bool)
    for name in names:
        r = rewards[name].float()
        combined += coefs[name] * normalize_in_groups(r, group_size, global_std=global_std, eps=eps,
                                                      valid_groups=valid_groups)
        zero_std &= r.view(-1, group_size).std(dim=1, unbiased=False) == 0
    valid = torch.ones_like(zero_std) if valid_groups is None else valid_groups.bool()
    keep = valid.repeat_interleave(group_size)
    combined = torch.where(keep, combined, torch.zeros_like(combined))
    dropped = 0
    if drop_zero_std_groups:
        keep = keep & (~zero_std).repeat_interleave(group_size)
        dropped = int((zero_std & valid).sum())
    return Advantages(values=combined.clamp(-clip_max, clip_max), keep=keep, dropped_groups=dropped)


def best_of_n(advantages: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
    """(N,) bool: the top n/2 and bottom n/2 of each group by advantage (DanceGRPO's selection)."""
    if n <= 0 or n >= group_size:
        return torch.ones_like(advantages, dtype=torch.bool)
    if n % 2:
        raise ValueError(f"--best_of_n must be even (top n/2 + bottom n/2), got {n}")
    a = advantages.view(-1, group_size)
    order = torch.argsort(a, dim=1, stable=True)
    chosen = torch.cat([order[:, : n // 2], order[:, -(n // 2):]], dim=1)
    keep = torch.zeros_like(a, dtype=torch.bool).scatter_(1, chosen, True)
    return keep.view(-1)
