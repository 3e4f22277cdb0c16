"""Flow-matching supervised fine-tuning: timestep density, noising and loss. Pure tensor functions.

Notation as sampling: t in (0, 1) is the noise level (1 = noise), x_t = (1 - t) x0 + t eps, and the
model predicts the velocity v = eps - x0 at timestep 1000 t. Training t follows the sampler's own
shifted schedule: u ~ Uniform(lo, hi), t = shift u / (1 + (shift - 1) u), the map
FlowMatchEulerDiscreteScheduler applies to uniform sigmas, so the experts train on the noise levels
they sample at. Its density is p(t) = shift / (shift - (shift - 1) t)^2 on (0, 1).
"""

from __future__ import annotations

import torch


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The shifted noise level of uniform ``u`` in [0, 1]."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(t: float, shift: float) -> float:
    """The inverse of ``shift_sigma``: the u whose shifted level is ``t``."""
    return t / (shift - (shift - 1) * t)


def sample_timesteps(generators: list[torch.Generator], *, shift: float, lo: float = 0.0,
                     hi: float = 1.0) -> torch.Tensor:
    """(B,) float32 noise levels, one per generator, from the shifted density restricted to the
    levels in [lo, hi) (e.g. one expert's range), by inverting the shift of a uniform draw."""
    u_lo, u_hi = unshift_sigma(lo, shift), unshift_sigma(hi, shift)
    if not generators:
        return torch.zeros(0)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    return shift_sigma(u_lo + (u_hi - u_lo) * u, shift).float()


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with ``t`` (B,) broadcast over the latent dims."""
    t = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def flow_matching_loss(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """(B,) mean over latent elements of ||v - (noise - x0)||^2."""
    return ((velocity.float() - (noise - x0).float()) ** 2).flatten(1).mean(dim=1)


def expert_balanced_timesteps(generators: list[torch.Generator], *, shift: float, boundary: float,
                              high_share: float) -> torch.Tensor:
    """(B,) noise levels: the first round(high_share * B) in the high-noise expert's range [boundary, 1),
    the rest in [0, boundary), each from the shifted density restricted to its range. The experts are
    separate networks, so this moves samples between them without changing what either one learns."""
    n_high = round(high_share * len(generators))
    return torch.cat([sample_timesteps(generators[:n_high], shift=shift, lo=boundary, hi=1.0),
                      sample_timesteps(generators[n_high:], shift=shift, lo=0.0, hi=boundary)])
