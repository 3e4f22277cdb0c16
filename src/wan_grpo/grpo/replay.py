"""Re-evaluate recorded transitions under the current weights (the policy's new log-probs)."""

from __future__ import annotations

import torch

from wan_grpo.sampling.rollout import Trajectory
from wan_grpo.sampling.sde import SDEStepOutput, sde_step


def replay_transitions(
    denoiser,
    traj: Trajectory,
    sample_idx: torch.Tensor,  # (M,) long
    step_idx: torch.Tensor,  # (M,) long; all steps must belong to ``expert``
    prompt_embeds: torch.Tensor,  # (M, L, D)
    negative_embeds: torch.Tensor | None,  # (M, L, D) or None
    *,
    expert: int,
    device: torch.device,
    image=None,  # ImageCondition with M rows, or None
) -> SDEStepOutput:
    """Velocity from ``expert`` (with the rollout's CFG) and the log-prob of each stored x_{i+1}."""
    if not bool((traj.experts[step_idx] == expert).all()):
        raise ValueError("every replayed step must belong to the expert that replays it")
    lat_s, lat_t = sample_idx.to(traj.latents.device), step_idx.to(traj.latents.device)
    x = traj.latents[lat_s, lat_t].to(device, torch.float32)
    x_next = traj.latents[lat_s, lat_t + 1].to(device, torch.float32)
    t = traj.timesteps[step_idx].to(device)
    v = denoiser.predict_velocity(x, t, prompt_embeds, negative_embeds, expert=expert, image=image)
    return sde_step(v, x, traj.sigmas[step_idx].to(device), traj.sigmas[step_idx + 1].to(device),
                    kind=traj.sde_type, noise_level=traj.noise_level, next_latents=x_next,
                    sigma_max=traj.sigma_max, mask=None if image is None else image.generated)
