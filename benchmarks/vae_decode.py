"""VAE decoding of a rollout's videos: wan-grpo's decode_latents against diffusers' own decode, same work.

Both decode the same latents in calls of the same batch, with decode_latents' normalisation and rounding to
uint8; diffusers' is AutoencoderKLWan.decode as WanPipeline calls it (channels-first weights), ours runs the
decoder's convolutions channels-last on CPU (wan_grpo.models.vae.channels_last_convs). Ratio = our time /
diffusers' time (below 1: we are faster). Also printed: how many uint8 values differ, and by how much.
The VAEs: the shipped Shapes VAE (64 latents of 16 x 3 x 8 x 8: one rollout of 8 prompts x 8 videos, decoded
16 per call as --task shapes does) and the random tiny VAE (`--task tiny`, mid-block attention).
"""

from __future__ import annotations

import torch
from _common import device_from, parser, record, timed
from diffusers import AutoencoderKLWan

from wan_grpo.models.tiny import build_tiny_components
from wan_grpo.models.vae import decode_latents, latent_stats, to_frames
from wan_grpo.tasks.shapes import BASE_DIR


def channels_first(vae, latents: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """decode_latents' arithmetic around diffusers' plain decode."""
    mean, std = latent_stats(vae, device=latents.device)
    out = []
    with torch.no_grad():
        for chunk in latents.split(micro_batch):
            out.append(to_frames(vae.decode(chunk * std + mean, return_dict=False)[0]))
    return torch.cat(out)


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=64)
    p.add_argument("--micro_batch", type=int, default=16)
    args = p.parse_args()
    if args.smoke:
        args.videos, args.micro_batch, args.repeats = 2, 2, 1
    device = device_from(args)
    vaes = {"Shapes (shipped)": (AutoencoderKLWan.from_pretrained(str(BASE_DIR / "vae")), 3, 8),
            "tiny (random, mid-block attention)": (build_tiny_components(0).vae, 2, 8)}
    lines = [f"{args.videos} videos, {args.micro_batch} per decode call", "",
             "| VAE | latents per video | diffusers decode, s | decode_latents, s | ours / diffusers | "
             "uint8 values that differ | largest difference |", "|---|---|---|---|---|---|---|"]
    for name, (vae, frames, side) in vaes.items():
        vae = vae.to(device).eval()
        latents = torch.randn(args.videos, vae.config.z_dim, frames, side, side,
                              generator=torch.Generator().manual_seed(0)).to(device)
        theirs = channels_first(vae, latents, args.micro_batch)
        ours = decode_latents(vae, latents, micro_batch=args.micro_batch)
        differ = (ours.int() - theirs.int()).abs()
        t_theirs = timed(lambda: channels_first(vae, latents, args.micro_batch), args.repeats)
        t_ours = timed(lambda: decode_latents(vae, latents, micro_batch=args.micro_batch), args.repeats)
        lines.append(f"| {name} | {vae.config.z_dim} x {frames} x {side} x {side} | {t_theirs:.2f} | {t_ours:.2f} | "
                     f"{t_ours / t_theirs:.2f} | {int((differ > 0).sum())} of {differ.numel()} | "
                     f"{int(differ.max())} |")
    title = "channels-last" if device.type == "cpu" else "channels-first on CUDA too"
    record(f"VAE decoding: {title} against diffusers' decode", device, lines, args)


if __name__ == "__main__":
    main()
