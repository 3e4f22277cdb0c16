"""``wan-grpo sample``: one video from one prompt, with any solver."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import save_file

from wan_grpo.config import SampleConfig, check_ranges, parse_size
from wan_grpo.grpo.checkpoint import apply_checkpoint, check_trained_checkpoint
from wan_grpo.models.denoiser import MoEDenoiser
from wan_grpo.models.vae import decode_latents
from wan_grpo.runtime import autocast_dtype, describe_split, encode_all, load_model, place, resolve_device
from wan_grpo.sampling.conditioning import check_image, encode_images
from wan_grpo.sampling.rollout import SamplerConfig, initial_noise, latent_shape, rollout, sample_multistep
from wan_grpo.sampling.schedule import MULTISTEP
from wan_grpo.seeding import seed_everything
from wan_grpo.video import check_image_file, check_output_file, write_mp4

log = logging.getLogger("wan_grpo")


def sample_latents(cfg: SampleConfig, components, device, dtype) -> torch.Tensor:
    """Final latents (1, z, F', H', W') for ``cfg.prompt``, noise drawn as WanPipeline draws it."""
    width, height = parse_size(cfg.size)
    shape = latent_shape(components, width=width, height=height, frame_num=cfg.frame_num)
    check_image(components, cfg.image is not None)
    image = None
    if cfg.image is not None:
        image = encode_images(components, [cfg.image], width=width, height=height, frame_num=cfg.frame_num,
                              device=device)
    sampler = SamplerConfig(solver=cfg.sample_solver, steps=cfg.sampling_steps, shift=cfg.sample_shift,
                            sde_type=cfg.sde_type, noise_level=cfg.noise_level)
    cache = encode_all(components, [cfg.prompt], cfg.negative_prompt, device=device, dtype=dtype)
    place(components, device)
    denoiser = MoEDenoiser(components, guidance_scale=cfg.guidance_scale, guidance_scale_2=cfg.guidance_scale_2,
                           autocast_dtype=autocast_dtype(cfg.mixed_precision))
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    noise = initial_noise(shape, generator=generator, device=device)
    cond, uncond = cache.get([cfg.prompt]), cache.get([cfg.negative_prompt])
    if sampler.solver in MULTISTEP:
        return sample_multistep(denoiser, noise, cond, uncond, config=sampler,
                            scheduler_config=components.scheduler_config, image=image)
    latents, _ = rollout(denoiser, noise, cond, uncond, config=sampler, generator=generator, record=False,
                         image=image)
    return latents


def run_sample(cfg: SampleConfig) -> Path:
    check_ranges(cfg)
    check_output_file(cfg.output, "--output")
    if cfg.save_latents:
        check_output_file(cfg.save_latents, "--save_latents")
    if cfg.image is not None:
        check_image_file(cfg.image, "--image")
    if cfg.lora:
        check_trained_checkpoint(cfg.lora)
    resolve_device(cfg.device)
    seed_everything(cfg.seed)  # reward plug-ins and libraries that draw from the global RNGs
    components, cfg, device, dtype = load_model(cfg)
    if cfg.lora:
        log.info("applied %s from %s", ", ".join(apply_checkpoint(components, cfg.lora)), cfg.lora)
    log.info("sampling %s with %s: %s, %d frames, %d %s steps, shift %.1f, guidance %.1f/%.1f",
             cfg.task, components.source, cfg.size, cfg.frame_num, cfg.sampling_steps, cfg.sample_solver,
             cfg.sample_shift, cfg.guidance_scale, cfg.guidance_scale_2)
    log.info("schedule: %s", describe_split(components, steps=cfg.sampling_steps, shift=cfg.sample_shift,
                                            solver=cfg.sample_solver))
    latents = sample_latents(cfg, components, device, dtype)
    if cfg.save_latents:
        Path(cfg.save_latents).parent.mkdir(parents=True, exist_ok=True)
        save_file({"latents": latents.float().cpu().contiguous()}, cfg.save_latents)
        log.info("latents -> %s", cfg.save_latents)
    frames = decode_latents(components.vae, latents)[0]
    out = write_mp4(cfg.output, frames.numpy(), fps=cfg.fps)
    print(f"wrote {out} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]})")
    return out
