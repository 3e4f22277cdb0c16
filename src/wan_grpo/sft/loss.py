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


def flow_matching_loss(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) mean over latent elements of ||v - (noise - x0)||^2; with ``weight`` (B, F', H', W'), the
    weighted mean over latent positions of the channels' mean squared error."""
    err = (velocity.float() - (noise - x0).float()) ** 2
    if weight is None:
        return err.flatten(1).mean(dim=1)
    weight = weight.to(err.device, torch.float32)
    return (err.mean(dim=1) * weight).flatten(1).sum(dim=1) / weight.flatten(1).sum(dim=1)


def pixel_gradient(x: torch.Tensor) -> torch.Tensor:
    """|dx| + |dy| of ``x`` over its last two dims (height, width), forward differences, 0 past the last
    row and column; the same shape as ``x``."""
    dx = torch.nn.functional.pad((x[..., :, 1:] - x[..., :, :-1]).abs(), (0, 1))
    dy = torch.nn.functional.pad((x[..., 1:, :] - x[..., :-1, :]).abs(), (0, 0, 0, 1))
    return dx + dy


def edge_weights(videos: torch.Tensor, *, time_stride: int, space_stride: int, strength: float) -> torch.Tensor:
    """(N, F', H', W') loss weights of latent positions, 1 + strength * e / mean(e), where e is the mean
    pixel-gradient magnitude (|dx| + |dy| of the RGB mean, in [0, 2]) over the pixels and frames a
    position encodes: the first frame alone, then groups of ``time_stride`` (Wan's causal VAEs), and
    ``space_stride`` squared pixels. ``videos``: (N, F, H, W, 3) uint8. The weights' mean over a video
    is 1 + strength (1 on a flat video): edges, where a small model blurs what it draws (corners,
    outlines), count more than flat areas."""
    x = videos.float().mean(dim=-1) / 255  # (N, F, H, W)
    e = torch.nn.functional.avg_pool2d(pixel_gradient(x), space_stride)  # (N, F, H', W'): frames as channels
    if time_stride > 1:
        n, f = e.shape[:2]
        if (f - 1) % time_stride:
            raise ValueError(f"{f} frames do not fill latent frames of {time_stride} after the first")
        e = torch.cat([e[:, :1], e[:, 1:].reshape(n, (f - 1) // time_stride, time_stride, *e.shape[2:]).mean(2)], 1)
    mean = e.flatten(1).mean(dim=1).view(-1, 1, 1, 1)
    return 1 + strength * torch.where(mean > 0, e / mean.clamp_min(1e-12), torch.zeros_like(e))


def expert_balanced_timesteps(generators: list[torch.Generator], *, shift: float, boundary: float,
                              high_share: float) -> torch.Tensor:
    """(B,) noise levels: the first round(high_share * B) in the high-noise expert's range [boundary, 1),
    the rest in [0, boundary), each from the shifted density restricted to its range. The experts are
    separate networks, so this moves samples between them without changing what either one learns."""
    n_high = round(high_share * len(generators))
    return torch.cat([sample_timesteps(generators[:n_high], shift=shift, lo=boundary, hi=1.0),
                      sample_timesteps(generators[n_high:], shift=shift, lo=0.0, hi=boundary)])
