"""Denoising loops: plain sampling (unipc / dpm++ / euler / sde) and recorded group rollouts for GRPO.

A rollout records, per sample, the T+1 latents once (in a chosen dtype and device) and the
log-prob of every transition; model predictions are never stored, training recomputes them.
Sigmas, timesteps and the expert of each step are shared by all samples of a rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

from wan_grpo.errors import UserError
from wan_grpo.sampling.schedule import MULTISTEP, SOLVERS, flow_match_schedule, multistep_scheduler, sde_window_mask
from wan_grpo.sampling.sde import SDE_KINDS, gaussian_log_prob, sde_mean_std, sde_step
from wan_grpo.seeding import INITIAL_NOISE, SDE_NOISE, stream


@dataclass
class SamplerConfig:
    solver: str = "sde"  # unipc | dpm++ | euler | sde
    steps: int = 20
    shift: float = 5.0
    sde_type: str = "flow"  # flow | dance | cps
    noise_level: float = 0.7
    sde_window: tuple[int, int] | None = None  # [start, end) step indices taking SDE steps

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise UserError(f"unknown solver {self.solver!r}; use --sample_solver one of {', '.join(SOLVERS)}")
        if self.sde_type not in SDE_KINDS or self.sde_type == "ode":
            raise UserError(f"unknown --sde_type {self.sde_type!r}; use one of flow, dance, cps")
        if self.steps < 1:
            raise UserError(f"--sampling_steps must be >= 1, got {self.steps}")
        if self.sde_window is not None:
            start, end = self.sde_window
            if not (0 <= start < end <= self.steps):
                raise UserError(
                    f"--sde_window {start}:{end} must satisfy 0 <= start < end <= --sampling_steps ({self.steps})"
                )


@dataclass(frozen=True)
class StepPlan:
    """What every step of a rollout does, known before any model runs."""

    sigmas: torch.Tensor  # (T+1,)
    timesteps: torch.Tensor  # (T,)
    experts: torch.Tensor  # (T,) long: the expert slot that runs each step
    stochastic: torch.Tensor  # (T,) bool: an SDE step with std > 0, so recorded with a density and trainable


def plan_steps(config: SamplerConfig, expert_index) -> StepPlan:
    """``expert_index(t) -> slot`` is ``MoEDenoiser.expert_index`` or ``models.denoiser.route`` bound to a
    checkpoint's facts. Steps outside ``config.sde_window``, every step of ``euler``, and steps whose
    std is 0 (noise_level 0, cps into sigma 0) are deterministic."""
    schedule = flow_match_schedule(config.steps, shift=config.shift)
    sigmas, timesteps = schedule.sigmas, schedule.timesteps
    stochastic = sde_window_mask(config.steps, config.sde_window) & (config.solver == "sde")
    if config.solver == "sde":
        s, s_next = sigmas[:-1].double(), sigmas[1:].double()
        zero = torch.zeros_like(s)
        _, std = sde_mean_std(zero, zero, s, s_next, kind=config.sde_type, noise_level=config.noise_level,
                              sigma_max=float(sigmas[1]) if len(sigmas) > 1 else None)
        stochastic &= std.expand_as(s) > 0
    experts = torch.tensor([expert_index(float(t)) for t in timesteps], dtype=torch.long)
    return StepPlan(sigmas=sigmas, timesteps=timesteps, experts=experts, stochastic=stochastic)


@dataclass
class Trajectory:
    latents: torch.Tensor  # (B, T+1, C, F, H, W) in the storage dtype/device
    log_probs: torch.Tensor  # (B, T) float32; 0 on deterministic steps
    sigmas: torch.Tensor  # (T+1,)
    timesteps: torch.Tensor  # (T,)
    experts: torch.Tensor  # (T,) long: 0 = high-noise (transformer), 1 = low-noise (transformer_2)
    trainable: torch.Tensor  # (T,) bool: stochastic steps (SDE window and std > 0)
    sde_type: str = "flow"
    noise_level: float = 0.7
    means: torch.Tensor | None = None  # (B, T, C, F, H, W) float32: each step's Gaussian mean (--ratio_norm)

    @property
    def num_samples(self) -> int:
        return self.latents.shape[0]

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[1]) if len(self.sigmas) > 1 else 1.0

    @property
    def final_latents(self) -> torch.Tensor:
        return self.latents[:, -1]

    @staticmethod
    def concat(parts: list["Trajectory"]) -> "Trajectory":
        first = parts[0]
        return Trajectory(
            latents=torch.cat([p.latents for p in parts]),
            log_probs=torch.cat([p.log_probs for p in parts]),
            sigmas=first.sigmas, timesteps=first.timesteps, experts=first.experts, trainable=first.trainable,
            sde_type=first.sde_type, noise_level=first.noise_level,
            means=None if first.means is None else torch.cat([p.means for p in parts]),
        )


def latent_shape(components, *, width: int, height: int, frame_num: int, batch: int = 1) -> tuple[int, ...]:
    """(B, z, (F-1)//4+1, H//8, W//8) as diffusers' WanPipeline, after validating the size."""
    validate_video_size(components, width=width, height=height, frame_num=frame_num)
    s, tstride = components.vae_scale_factor_spatial, components.vae_scale_factor_temporal
    z = int(components.vae.config.z_dim)
    return (batch, z, (frame_num - 1) // tstride + 1, height // s, width // s)


def validate_video_size(components, *, width: int, height: int, frame_num: int) -> None:
    s, tstride = components.vae_scale_factor_spatial, components.vae_scale_factor_temporal
    patch = components.any_transformer.config.patch_size
    mh, mw = s * patch[1], s * patch[2]
    if width <= 0 or height <= 0 or width % mw or height % mh:
        raise UserError(
            f"--size {width}*{height} is not divisible by the VAE stride times patch size ({mw}*{mh}); "
            f"use e.g. {max(mw, width // mw * mw)}*{max(mh, height // mh * mh)}"
        )
    if frame_num < 1 or (frame_num - 1) % tstride:
        fixed = max(1, (frame_num - 1) // tstride * tstride + 1)
        raise UserError(f"--frame_num {frame_num} is not {tstride}k+1; use e.g. {fixed}")


def initial_noise(shape: tuple[int, ...], *, generator: torch.Generator | None, device) -> torch.Tensor:
    """float32 noise drawn as WanPipeline.prepare_latents draws it."""
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=torch.float32)


@torch.no_grad()
def sample_multistep(denoiser, noise, prompt_embeds, negative_embeds, *, config: SamplerConfig, scheduler_config=None,
                     image=None):
    """Deterministic UniPC or DPM++ sampling (flow prediction, diffusers' schedulers), for evaluation,
    plain sampling and NFT rollouts: no transition densities."""
    scheduler = multistep_scheduler(config.solver, shift=config.shift, base_config=scheduler_config)
    scheduler.set_timesteps(config.steps, device=noise.device)
    scheduler.set_begin_index(0)
    latents = noise
    for t in scheduler.timesteps:
        v = denoiser.predict_velocity(latents, float(t), prompt_embeds, negative_embeds, image=image)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    return latents if image is None else image.keep_generated(latents)


@torch.no_grad()
def rollout(
    denoiser,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    *,
    config: SamplerConfig,
    generator: torch.Generator | list[torch.Generator] | None = None,
    record: bool = True,
    storage_dtype: torch.dtype = torch.float32,
    storage_device: torch.device | str | None = None,
    image=None,
    record_means: bool = False,
) -> tuple[torch.Tensor, Trajectory | None]:
    """Euler/SDE sampling from ``noise`` (B, C, F, H, W). Returns final latents and the trajectory.

    Steps outside ``config.sde_window`` (and every step for ``euler``) are Euler steps. With
    ``record``, each sampled latent is rounded to ``storage_dtype`` before its log-prob is taken
    and before the next step starts, so re-evaluating the stored transition reproduces it.
    ``image`` (an ImageCondition with B rows) conditions every call; for TI2V's kept first frame
    the conditioned positions hold the image latent throughout and are left out of the log-probs.
    ``record_means`` also keeps each step's Gaussian mean in float32 (GRPO-Guard's RatioNorm needs it).
    """
    if config.solver in MULTISTEP:
        raise ValueError(f"{config.solver} has no transition density; use sample_multistep for plain sampling")
    plan = plan_steps(config, denoiser.expert_index)
    sigmas, timesteps, experts, stochastic = plan.sigmas, plan.timesteps, plan.experts, plan.stochastic
    storage_device = torch.device(storage_device) if storage_device is not None else noise.device

    latents = noise.float()
    mask = None
    if image is not None:
        latents, mask = image.keep_generated(latents), image.generated
    if record:  # the model must see exactly what is stored, the noise included
        latents = latents.to(storage_dtype).float()
    stored = [latents.to(storage_device, storage_dtype)] if record else None
    log_probs, means = [], []
    for i in range(config.steps):
        v = denoiser.predict_velocity(latents, float(timesteps[i]), prompt_embeds, negative_embeds,
                                      expert=int(experts[i]), image=image)
        kind = config.sde_type if stochastic[i] else "ode"
        out = sde_step(v, latents, float(sigmas[i]), float(sigmas[i + 1]), kind=kind,
                       noise_level=config.noise_level, generator=generator, sigma_max=float(sigmas[1]), mask=mask)
        next_latents, log_prob = out.next_latents, out.log_prob
        if image is not None:  # the kept frame is never sampled (and is outside the log-prob's mask)
            next_latents = image.keep_generated(next_latents)
        if record and storage_dtype != next_latents.dtype:
            next_latents = next_latents.to(storage_dtype).float()
            log_prob = gaussian_log_prob(next_latents, out.mean, out.std, mask)
        if record:
            stored.append(next_latents.to(storage_device, storage_dtype))
            log_probs.append(log_prob.float().cpu())
            if record_means:
                means.append(out.mean.float().to(storage_device))
        latents = next_latents
    if not record:
        return latents, None
    traj = Trajectory(
        latents=torch.stack(stored, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        sigmas=sigmas,
        timesteps=timesteps,
        experts=experts,
        trainable=stochastic.clone(),
        sde_type=config.sde_type,
        noise_level=config.noise_level,
        means=torch.stack(means, dim=1) if record_means else None,
    )
    return latents, traj


def _group_inputs(latent_shape_one, seeds, noise_seeds, negative_embeds, *, device):
    """Each sample's initial noise (from its noise seed's stream) and the negative prompt per sample."""
    noise_seeds = list(seeds) if noise_seeds is None else list(noise_seeds)
    noise = torch.cat([initial_noise((1, *latent_shape_one[1:]), generator=stream(s, INITIAL_NOISE),
                                     device=device) for s in noise_seeds])
    uncond = None if negative_embeds is None else negative_embeds[:1].expand(len(seeds), -1, -1)
    return noise, uncond


def rollout_groups(
    denoiser,
    prompt_embeds: torch.Tensor,  # (P, L, D): one row per sample's prompt, P = len(seeds)
    negative_embeds: torch.Tensor | None,  # (1, L, D): one negative prompt for all
    *,
    latent_shape_one: tuple[int, ...],
    seeds: list[int],
    noise_seeds: list[int] | None = None,
    config: SamplerConfig,
    micro_batch: int = 0,
    storage_dtype: torch.dtype = torch.float32,
    storage_device=None,
    progress=None,
    image=None,
    record_means: bool = False,
) -> Trajectory:
    """One recorded sample per seed. Sample k's SDE noise comes from its own generator seeded with
    ``seeds[k]``, its initial noise from ``noise_seeds[k]`` (default: the same seed; give samples of a
    group one noise seed to share initial noise). ``micro_batch`` (0 = all) bounds a model call.
    """
    device = prompt_embeds.device
    total = len(seeds)
    if prompt_embeds.shape[0] != total:
        raise ValueError(f"{prompt_embeds.shape[0]} prompt rows for {total} samples")
    noise, uncond = _group_inputs(latent_shape_one, seeds, noise_seeds, negative_embeds, device=device)
    step = micro_batch if micro_batch > 0 else total
    parts = []
    for start in range(0, total, step):
        sl = slice(start, min(start + step, total))
        gens = [stream(s, SDE_NOISE) for s in seeds[sl]]
        _, traj = rollout(denoiser, noise[sl], prompt_embeds[sl], None if uncond is None else uncond[sl],
                          config=config, generator=gens, storage_dtype=storage_dtype, storage_device=storage_device,
                          image=None if image is None else image[sl], record_means=record_means)
        parts.append(traj)
        if progress is not None:
            progress(sl.stop - sl.start)
    return Trajectory.concat(parts)


@torch.no_grad()
def sample_groups(
    denoiser,
    prompt_embeds: torch.Tensor,  # (P, L, D): one row per sample's prompt, P = len(seeds)
    negative_embeds: torch.Tensor | None,  # (1, L, D)
    *,
    latent_shape_one: tuple[int, ...],
    seeds: list[int],
    noise_seeds: list[int] | None = None,
    config: SamplerConfig,
    scheduler_config: dict | None = None,
    micro_batch: int = 0,
    progress=None,
    image=None,
) -> torch.Tensor:
    """Final latents (P, C, F, H, W) of one sample per seed with any solver and no trajectory (NFT's
    rollouts), noise drawn from the same per-sample streams as ``rollout_groups``."""
    device = prompt_embeds.device
    total = len(seeds)
    noise, uncond = _group_inputs(latent_shape_one, seeds, noise_seeds, negative_embeds, device=device)
    step = micro_batch if micro_batch > 0 else total
    parts = []
    for start in range(0, total, step):
        sl = slice(start, min(start + step, total))
        neg = None if uncond is None else uncond[sl]
        img = None if image is None else image[sl]
        if config.solver in MULTISTEP:
            parts.append(sample_multistep(denoiser, noise[sl], prompt_embeds[sl], neg, config=config,
                                      scheduler_config=scheduler_config, image=img))
        else:
            gens = [stream(s, SDE_NOISE) for s in seeds[sl]]
            parts.append(rollout(denoiser, noise[sl], prompt_embeds[sl], neg, config=config, generator=gens,
                                 record=False, image=img)[0])
        if progress is not None:
            progress(sl.stop - sl.start)
    return torch.cat(parts)
