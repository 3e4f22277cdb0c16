"""One stochastic step of a flow-matching sampler, with the exact Gaussian log-density.

Notation (docs/math.md): x are the latents at noise level s (1 = noise, 0 = data),
s' < s the next level, dt = s' - s < 0, v the (CFG-combined) velocity, a the noise level.

Every kind defines x' = mean + std * eps with eps ~ N(0, I), so the log-prob of a recorded
transition is the Gaussian density of x' under N(mean, std^2). It is reduced by MEAN over all
non-batch dims, as Flow-GRPO and DanceGRPO do; this is why clip ranges of 1e-4..1e-3 work.

- ``flow``  (Flow-GRPO):  std_t = a sqrt(s / (1 - s));
                          mean = x (1 + std_t^2 dt / (2 s)) + v (1 + std_t^2 (1 - s) / (2 s)) dt;
                          std = std_t sqrt(-dt).  At s = 1 the schedule's second sigma
                          (``sigma_max``) replaces s in the denominator of std_t.
- ``dance`` (DanceGRPO):  x0 = x - s v; score = -(x - (1 - s) x0) / s^2;
                          mean = x + dt v - a^2 score dt / 2; std = a sqrt(s - s').
- ``cps``   (coefficient preserving): std = s' sin(a pi / 2); x0 = x - s v; x1 = x + (1 - s) v;
                          mean = x0 (1 - s') + x1 sqrt(s'^2 - std^2). Unlike flow_grpo's CPS
                          code, which drops the normaliser, the log-prob is the true density.
- ``ode``   (Euler):      mean = x + dt v, std = 0, log_prob = 0.

Where std is 0 (ode, noise_level 0, or cps at s' = 0) the step is deterministic: next_latents
is the mean and log_prob is 0. Such steps carry no policy gradient and are never trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

SDE_KINDS = ("flow", "dance", "cps", "ode")


@dataclass
class SDEStepOutput:
    next_latents: torch.Tensor  # (B, C, F, H, W), dtype of the input latents
    log_prob: torch.Tensor  # (B,) float32 (float64 if the inputs are float64)
    mean: torch.Tensor  # (B, C, F, H, W), compute dtype
    std: torch.Tensor  # broadcastable to latents: (B, 1, 1, 1, 1), compute dtype


def _per_sample(value: float | torch.Tensor, *, batch: int, ndim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A float or a [B] tensor as a (B, 1, ..., 1) tensor that broadcasts against the latents."""
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"sigma must be a float or a tensor of shape [{batch}], got shape {tuple(t.shape)}")
    return t.view(batch, *([1] * (ndim - 1)))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """log N(x; mean, std^2) averaged over all non-batch dims (or over ``mask`` == 1 positions only,
    e.g. the generated frames of an image-conditioned video); 0 for samples whose std is 0."""
    deterministic = std == 0
    safe_std = torch.where(deterministic, torch.ones_like(std), std)
    log_density = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    log_density = torch.where(deterministic, torch.zeros_like(log_density), log_density)
    dims = tuple(range(1, x.ndim))
    if mask is None:
        return log_density.mean(dim=dims)
    mask = mask.to(log_density.dtype).expand_as(log_density)
    return (log_density * mask).sum(dim=dims) / mask.sum(dim=dims)


def sde_mean_std(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    kind: str,
    noise_level: float,
    sigma_max: float | torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the Gaussian transition; sigma tensors already broadcast to (B, 1, ...)."""
    x, v, s, s_next = latents, velocity, sigma, sigma_next
    dt = s_next - s
    a = noise_level
    if kind == "ode":
        return x + dt * v, torch.zeros_like(s)
    if kind == "flow":
        if sigma_max is None:
            denom_sigma = s
        else:
            sm = torch.as_tensor(sigma_max, dtype=s.dtype, device=s.device)
            denom_sigma = torch.where(s >= 1, sm, s)
        std_t = a * torch.sqrt(s / (1 - denom_sigma))
        mean = x * (1 + std_t**2 * dt / (2 * s)) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        return mean, std_t * torch.sqrt(-dt)
    if kind == "dance":
        x0 = x - s * v
        score = -(x - (1 - s) * x0) / s**2
        mean = x + dt * v - 0.5 * a**2 * score * dt
        return mean, a * torch.sqrt(s - s_next)
    if kind == "cps":
        std = s_next * math.sin(a * math.pi / 2)
        x0 = x - s * v
        x1 = x + (1 - s) * v
        mean = x0 * (1 - s_next) + x1 * torch.sqrt((s_next**2 - std**2).clamp_min(0))
        return mean, std
    raise ValueError(f"unknown SDE kind {kind!r}; choose one of {', '.join(SDE_KINDS)}")


def sde_step(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    *,
    kind: str = "flow",
    noise_level: float = 0.7,
    generator: torch.Generator | list[torch.Generator] | None = None,
    next_latents: torch.Tensor | None = None,
    sigma_max: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> SDEStepOutput:
    """Take (or, given ``next_latents``, evaluate) one step from sigma to sigma_next.

    Arithmetic runs in float32 (float64 if the latents are float64) whatever the model's dtype:
    the log-density of a 1e-4 ratio cannot be resolved in bf16. ``sigma``/``sigma_next`` are
    floats or [B] tensors. With ``next_latents`` given nothing is sampled and its log-prob is
    returned: this is how training recomputes the log-prob of a recorded transition. ``mask``
    (broadcastable to the latents, 1 = sampled) restricts the log-prob's mean to those positions.
    """
    if kind not in SDE_KINDS:
        raise ValueError(f"unknown SDE kind {kind!r}; choose one of {', '.join(SDE_KINDS)}")
    compute_dtype = torch.float64 if latents.dtype == torch.float64 else torch.float32
    batch, ndim, device = latents.shape[0], latents.ndim, latents.device
    s = _per_sample(sigma, batch=batch, ndim=ndim, dtype=compute_dtype, device=device)
    s_next = _per_sample(sigma_next, batch=batch, ndim=ndim, dtype=compute_dtype, device=device)
    x = latents.to(compute_dtype)
    v = velocity.to(compute_dtype)

    mean, std = sde_mean_std(v, x, s, s_next, kind=kind, noise_level=noise_level, sigma_max=sigma_max)
    if next_latents is None:
        if kind == "ode" or bool((std == 0).all()):
            sample = mean
        else:
            noise = randn_tensor(x.shape, generator=generator, device=device, dtype=compute_dtype)
            sample = mean + std * noise
        next_latents = sample.to(latents.dtype)
    if kind == "ode" or bool((std == 0).all()):
        log_prob = torch.zeros(batch, dtype=compute_dtype, device=device)  # deterministic: skip the density
    else:
        log_prob = gaussian_log_prob(next_latents.to(compute_dtype), mean, std, mask)
    return SDEStepOutput(next_latents=next_latents, log_prob=log_prob, mean=mean, std=std)
