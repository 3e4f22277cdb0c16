"""diffusers' WanPipeline on the tiny checkpoint, for tests that load exported LoRAs into it."""

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline


def tiny_pipeline(ckpt, shift: float = 5.0) -> WanPipeline:
    pipe = WanPipeline.from_pretrained(ckpt)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_latents(pipe: WanPipeline, prompt: str, *, steps: int = 8, seed: int = 0) -> torch.Tensor:
    """Final latents of a 64*48, 5-frame video with guidance (4, 3), as the tests' runs sample."""
    return pipe(prompt=prompt, height=48, width=64, num_frames=5, num_inference_steps=steps, guidance_scale=4.0,
                guidance_scale_2=3.0, output_type="latent", generator=torch.Generator("cpu").manual_seed(seed)).frames
