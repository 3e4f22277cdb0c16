"""DiffusionNFT (Zheng et al., ICLR 2026): reinforcement on the forward process. Pure tensor functions.

Notation as docs/math.md: x0 a clean sample of the old (sampling) policy, t the noise level,
x_t = (1 - t) x0 + t eps, v the current policy's velocity at (x_t, t), v_old the old policy's.

- ``reward_weight``: r = clamp(clip(A, -c, c) / c / 2 + 1/2, 0, 1), the optimality probability
  of a sample from its group advantage A (c = --adv_clip_max).
- ``nft_loss``: the implicit positive and negative policies v+ = b v + (1 - b) v_old and
  v- = (1 + b) v_old - b v predict x0+- = x_t - t v+-; each branch's loss is the squared error
  to x0 over its detached per-sample mean absolute error (the reference's adaptive weighting), and
  loss = c (r L+ + (1 - r) L-) / b, as NVlabs/DiffusionNFT scripts/train_nft_sd3.py scales it.
- ``old_decay``: after each rollout's update, old <- d old + (1 - d) new with d from the
  reference's schedules (type 0: d = 0; 1: min(0.001 k, 0.5); 2: 0 for k < 75, then
  min(0.0075 (k - 75), 0.999); k = optimizer steps taken).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DECAY_TYPES = (0, 1, 2)


def reward_weight(advantages: torch.Tensor, clip_max: float) -> torch.Tensor:
    return (advantages.clamp(-clip_max, clip_max) / clip_max / 2 + 0.5).clamp(0, 1)


@dataclass
class NFTLoss:
    loss: torch.Tensor  # (B,) per sample, already scaled by c / b
    positive: torch.Tensor  # (B,) L+ (detached)
    negative: torch.Tensor  # (B,) L- (detached)
    old_deviation: torch.Tensor  # (B,) mean (v - v_old)^2 (detached)


def _weighted_x0_error(x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        weight = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp_min(1e-5)
    return ((x0_pred - x0) ** 2 / weight.to(x0_pred.dtype)).mean(dim=dims)


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, *, beta: float, clip_max: float) -> NFTLoss:
    """``v`` (B, ...) carries the gradient; ``v_old``, ``x_t``, ``x0`` (B, ...) and ``t``, ``r`` (B,) do not."""
    v_old = v_old.detach()
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(v.dtype)
    positive = _weighted_x0_error(x_t - t * (beta * v + (1 - beta) * v_old), x0)
    negative = _weighted_x0_error(x_t - t * ((1 + beta) * v_old - beta * v), x0)
    r = r.to(v.dtype)
    loss = (r * positive + (1 - r) * negative) / beta * clip_max
    deviation = ((v.detach() - v_old) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    return NFTLoss(loss=loss, positive=positive.detach(), negative=negative.detach(), old_deviation=deviation)


def old_decay(optimizer_steps: int, decay_type: int) -> float:
    if decay_type == 0:
        return 0.0
    if decay_type == 1:
        return min(0.001 * optimizer_steps, 0.5)
    if decay_type == 2:
        return 0.0 if optimizer_steps < 75 else min(0.0075 * (optimizer_steps - 75), 0.999)
    raise ValueError(f"unknown --nft_decay_type {decay_type}; use one of {DECAY_TYPES}")
