"""Image conditioning for Wan2.2 I2V-A14B and TI2V-5B image mode, as WanImageToVideoPipeline.

- ``concat`` (I2V-A14B, transformer in_channels 36): every model call sees
  [latents (16), mask (4), image latent (16)] along channels. The image latent is the VAE encoding
  of [image, zeros x (F-1)]; the mask marks the first frame.
- ``first_frame`` (TI2V-5B, ``expand_timesteps``): the first latent frame is the image's latent and
  is never sampled. The model input is ``(1 - m) * image + m * latents`` with per-token timesteps
  ``m * t``; SDE noise, recorded latents and log-probs cover only the generated positions (m = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wan_grpo.errors import UserError
from wan_grpo.models.vae import latent_stats

KINDS = ("concat", "first_frame")


@dataclass
class ImageCondition:
    kind: str
    latents: torch.Tensor  # concat: (N, 4 + z, F, H, W); first_frame: (N, z, F, H, W), frame 0 meaningful
    mask: torch.Tensor | None = None  # first_frame: (1, 1, F, H, W), 0 on the kept first frame, 1 elsewhere

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown image condition kind {self.kind!r}")

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, idx) -> "ImageCondition":
        return ImageCondition(self.kind, self.latents[idx], self.mask)

    def to(self, device) -> "ImageCondition":
        return ImageCondition(self.kind, self.latents.to(device),
                              None if self.mask is None else self.mask.to(device))

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        cond = self.latents.to(latents.device, latents.dtype)
        if self.kind == "concat":
            return torch.cat([latents, cond], dim=1)
        mask = self.mask.to(latents.device, latents.dtype)
        return (1 - mask) * cond + mask * latents

    def timesteps(self, t: torch.Tensor, patch_size) -> torch.Tensor | None:
        """Per-token timesteps (B, seq) for ``first_frame``: 0 on the kept frame, t elsewhere."""
        if self.kind != "first_frame":
            return None
        m = self.mask[0, 0][:: patch_size[0], :: patch_size[1], :: patch_size[2]].flatten().to(t.device, t.dtype)
        return t[:, None] * m[None, :]

    def keep_generated(self, latents: torch.Tensor) -> torch.Tensor:
        """Put the conditioned positions back to the image latent (no-op for ``concat``)."""
        if self.kind != "first_frame":
            return latents
        return self.model_input(latents)

    @property
    def generated(self) -> torch.Tensor | None:
        """(1, 1, F, H, W) mask of sampled positions for the log-prob, or None (all positions)."""
        return self.mask if self.kind == "first_frame" else None


def image_mode(components) -> str:
    """'required' (I2V: the transformer takes mask + image channels), 'optional' (TI2V-5B) or 'none'."""
    in_channels = int(components.any_transformer.config.in_channels)
    z = int(components.vae.config.z_dim)
    if in_channels > z:
        return "required"
    return "optional" if components.expand_timesteps else "none"


def check_image(components, has_image: bool, *, flag: str = "--image") -> None:

    mode = image_mode(components)
    if mode == "required" and not has_image:
        raise UserError(f"this is an image-to-video model (transformer in_channels "
                        f"{components.any_transformer.config.in_channels}); pass {flag}")
    if mode == "none" and has_image:
        raise UserError(f"this text-to-video model takes no image; drop {flag} or use an I2V or TI2V checkpoint")


def check_prompt_images(components, images: list, flag: str) -> None:
    """A prompt set's 'image' fields suit the model: all present for I2V, all or none for TI2V."""

    if not images:
        return
    have = [im is not None for im in images]
    if any(have) and not all(have):
        raise UserError(f"{flag}: {sum(have)} of {len(have)} prompts have an 'image'; give every prompt one "
                        "(or none, for text-to-video)")
    check_image(components, all(have), flag=f"an 'image' field on every line of the {flag} .jsonl")


@torch.no_grad()
def encode_images(components, images: list, *, width: int, height: int, frame_num: int,
                  device=None) -> ImageCondition:
    """Condition rows for ``images`` (PIL images or paths), computed as WanImageToVideoPipeline does."""
    from diffusers.utils import load_image
    from diffusers.video_processor import VideoProcessor


    vae = components.vae
    s, ts = components.vae_scale_factor_spatial, components.vae_scale_factor_temporal
    processor = VideoProcessor(vae_scale_factor=s)
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    mean, std = latent_stats(vae)
    inv_std = 1.0 / std
    f_lat, h_lat, w_lat = (frame_num - 1) // ts + 1, height // s, width // s
    rows = []
    for image in images:
        image = load_image(str(image)) if not hasattr(image, "size") else image
        pixels = processor.preprocess(image, height=height, width=width).to(torch.float32).unsqueeze(2)
        if components.expand_timesteps:
            video = pixels
        else:
            video = torch.cat([pixels, pixels.new_zeros(1, pixels.shape[1], frame_num - 1, height, width)], dim=2)
        vae_device = next(vae.parameters()).device
        latent = vae.encode(video.to(vae_device, vae.dtype)).latent_dist.mode().float().cpu()
        rows.append((latent - mean) * inv_std)
    latents = torch.cat(rows)
    if components.expand_timesteps:
        mask = torch.ones(1, 1, f_lat, h_lat, w_lat)
        mask[:, :, 0] = 0
        return ImageCondition("first_frame", latents.to(device), mask.to(device))
    # The pipeline's mask: frame 0 repeated over the VAE's temporal stride, then grouped per latent frame.
    mask = torch.ones(1, 1, frame_num, h_lat, w_lat)
    mask[:, :, 1:] = 0
    mask = torch.cat([mask[:, :, :1].repeat_interleave(ts, dim=2), mask[:, :, 1:]], dim=2)
    mask = mask.view(1, -1, ts, h_lat, w_lat).transpose(1, 2)
    mask = mask.expand(len(images), -1, -1, -1, -1)
    return ImageCondition("concat", torch.cat([mask, latents], dim=1).to(device))
