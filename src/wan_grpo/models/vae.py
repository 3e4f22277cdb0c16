"""Latents <-> uint8 frames with the Wan VAE, normalised exactly as WanPipeline decodes them."""

from __future__ import annotations

from contextlib import contextmanager

import torch


def latent_stats(vae, *, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE config's per-channel latents_mean and latents_std, shaped (1, z, 1, 1, 1)."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, device=device, dtype=dtype).view(1, z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=device, dtype=dtype).view(1, z, 1, 1, 1)
    return mean, std


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, *, micro_batch: int = 1) -> torch.Tensor:
    """(B, z, F', H', W') latents -> (B, F, H, W, 3) uint8 frames on CPU, ``micro_batch`` videos per
    decode call. Every call has that batch shape (a short last chunk is padded): convolution kernels
    are chosen by shape, so a video's pixels then never depend on which videos share its call."""
    device = next(vae.parameters()).device
    mean, std = latent_stats(vae, device=device, dtype=vae.dtype)
    videos = []
    with channels_last_convs(vae.decoder, vae.post_quant_conv, enabled=device.type == "cpu"):
        for chunk in latents.split(micro_batch):
            n = len(chunk)
            if n < micro_batch:
                chunk = torch.cat([chunk, chunk[-1:].expand(micro_batch - n, *chunk.shape[1:])])
            x = chunk.to(device, vae.dtype) * std + mean
            videos.append(to_frames(vae.decode(x, return_dict=False)[0][:n]))
    return torch.cat(videos)


def to_frames(video: torch.Tensor) -> torch.Tensor:
    """A VAE's (B, 3, F, H, W) pixels in [-1, 1] -> (B, F, H, W, 3) uint8 frames on CPU."""
    video = ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu()


@contextmanager
def channels_last_convs(*modules: torch.nn.Module, enabled: bool = True):
    """Within the block, every Conv3d weight of ``modules`` is stored channels-last (NDHWC), and so are the
    activations the convolutions hand on; the weights are restored after, so the modules still save as
    safetensors (which refuses non-contiguous tensors). On CPU this about halves the decode of the Shapes and
    tiny Wan VAEs: oneDNN's convolutions run faster and the decoder's RMS norms over channels read contiguous
    memory instead of a stride of D*H*W (docs/benchmarks.md, "VAE decoding: channels-last against diffusers'
    decode"). Pixels may differ from the channels-first decode by one level (measured: 1 value in 25000 to
    50000). Restoring puts the original tensors back, so it undoes any change made to the weights inside the
    block (a move to another device, a load): keep the block to decoding."""
    convs = [m for module in modules for m in module.modules() if isinstance(m, torch.nn.Conv3d)] if enabled else []
    saved = [conv.weight.data for conv in convs]
    try:
        for conv in convs:
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
        yield
    finally:
        for conv, weight in zip(convs, saved):
            conv.weight.data = weight


@torch.no_grad()
def encode_videos(vae, videos: torch.Tensor, *, micro_batch: int = 4) -> torch.Tensor:
    """(B, F, H, W, 3) uint8 frames -> (B, z, F', H', W') float32 latents on CPU, normalised with the
    VAE config's latents_mean/std (the inverse of ``decode_latents``), from the posterior's mode."""
    device = next(vae.parameters()).device
    mean, std = latent_stats(vae, device=device, dtype=torch.float32)
    out = []
    for chunk in videos.split(max(1, micro_batch)):
        x = chunk.permute(0, 4, 1, 2, 3).to(device, torch.float32) / 127.5 - 1.0  # (b, 3, F, H, W) in [-1, 1]
        z = vae.encode(x.to(vae.dtype), return_dict=False)[0].mode().float()
        out.append(((z - mean) / std).cpu())
    return torch.cat(out)
