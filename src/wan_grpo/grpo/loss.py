"""PPO-clip policy loss and the KL penalty to a reference policy. Pure tensor functions."""

from __future__ import annotations

import torch


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-transition loss max(-A r, -A clip(r, 1-e, 1+e)), shape (M,), and detached stats (M,)."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    stats = {
        "ratio": ratio.detach(),
        "clipfrac": ((ratio - 1.0).abs() > clip_range).float().detach(),
        "approx_kl": (0.5 * log_ratio**2).detach(),
    }
    return loss, stats


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(N(mean, std^2) || N(ref_mean, std^2)) per element, averaged over non-batch dims (or over
    ``mask`` == 1 positions, the sampled ones, as the log-probs): (M,)."""
    safe = torch.where(std == 0, torch.ones_like(std), std)
    kl = (mean - ref_mean) ** 2 / (2 * safe**2)
    dims = tuple(range(1, mean.ndim))
    if mask is None:
        return kl.mean(dim=dims)
    mask = mask.to(kl.dtype).expand_as(kl)
    return (kl * mask).sum(dim=dims) / mask.sum(dim=dims)
