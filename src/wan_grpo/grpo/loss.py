"""PPO-clip policy loss, GRPO-Guard's ratio normalisation and step weights, and the KL penalty to a
reference policy. Pure tensor functions."""

from __future__ import annotations

import torch

from wan_grpo.sampling.sde import sde_mean_std


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float, *, log_ratio: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-transition loss max(-A r, -A clip(r, 1-e, 1+e)), shape (M,), and detached stats (M,).
    ``log_ratio`` replaces log_prob - old_log_prob (GRPO-Guard's normalised one)."""
    if log_ratio is None:
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


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    dims = tuple(range(1, x.ndim))
    if mask is None:
        return x.mean(dim=dims)
    mask = mask.to(x.dtype).expand_as(x)
    return (x * mask).sum(dim=dims) / mask.sum(dim=dims)


def ratio_norm_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor,
                         old_mean: torch.Tensor, std: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO-Guard's RatioNorm (arXiv 2510.22319, Eq. 8): s (log p - log p_old) + mse / (2 s), (M,).

    s is the step's std (per sample) and mse the mean of (mean - old_mean)^2 over the positions the
    log-probs average. For a transition sampled from the old policy, x' = old_mean + s xi, this is
    mean(xi (mean - old_mean)): the always-negative -mse / (2 s^2) bias of the plain log-ratio is
    removed and its 1/s growth at low noise is gone, so one clip range fits every step.
    """
    s = std.reshape(std.shape[0])
    mse = _masked_mean((mean - old_mean) ** 2, mask)
    return s * (log_prob - old_log_prob) + mse / (2 * s)


def guard_step_weight(sigma: torch.Tensor, sigma_next: torch.Tensor, *, kind: str, noise_level: float,
                      sigma_max: float | None = None) -> torch.Tensor:
    """GRPO-Guard's per-step loss weight (Eq. 12): 1 / |d mean / d v| of each step (T,), unnormalised.

    Under RatioNorm a step's policy gradient is mean(xi d mean/d v dv), so its scale is the step's
    |d mean / d v|: dt (1 + a^2 / 2) for flow (so the weight is the paper's 1/|dt| up to a constant),
    dt beta_t with beta_t = 1 + a^2 (1 - t) / (2 t) for dance, and the rotation's velocity coefficient
    for cps. Dividing by it gives every step the same gradient scale, as the paper intends. The mean
    is affine in v, so the coefficient is mean(v = 1) - mean(v = 0).
    """
    s, s_next = sigma.reshape(-1, 1).double(), sigma_next.reshape(-1, 1).double()
    zero = torch.zeros_like(s)
    with_v, _ = sde_mean_std(torch.ones_like(s), zero, s, s_next, kind=kind, noise_level=noise_level,
                             sigma_max=sigma_max)
    without, _ = sde_mean_std(zero, zero, s, s_next, kind=kind, noise_level=noise_level, sigma_max=sigma_max)
    return (1.0 / (with_v - without).abs()).flatten().to(sigma.dtype)
