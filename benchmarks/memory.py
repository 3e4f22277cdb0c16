"""Bytes stored per trajectory vs the lower bound (T+1 latents in the storage dtype), and the peak
RSS a group rollout adds. CPU memory; on CUDA also the peak allocated accelerator memory."""

from __future__ import annotations

import resource

import torch
from _common import components, device_from, parser, record

from wan_grpo.models.denoiser import MoEDenoiser
from wan_grpo.sampling.rollout import SamplerConfig, latent_shape, rollout_groups
from wan_grpo.seeding import sample_seed


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--size", default="128*128")
    p.add_argument("--frame_num", type=int, default=17)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--videos", type=int, default=4)
    args = p.parse_args()
    if args.smoke:
        args.size, args.frame_num, args.steps, args.videos = "64*64", 5, 2, 2
    device = device_from(args)
    c = components(layers=2, heads=4, head_dim=32, device=device)
    w, h = (int(x) for x in args.size.split("*"))
    shape = latent_shape(c, width=w, height=h, frame_num=args.frame_num)
    den = MoEDenoiser(c, guidance_scale=4.0, guidance_scale_2=3.0)
    text_dim = c.text_encoder.config.d_model
    cond, uncond = torch.randn(args.videos, 512, text_dim, device=device), torch.randn(1, 512, text_dim, device=device)
    seeds = [sample_seed(0, 0, g) for g in range(args.videos)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        before = peak_rss_mib()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        traj = rollout_groups(den, cond, uncond, latent_shape_one=shape, seeds=seeds, storage_dtype=dtype,
                              config=SamplerConfig(solver="sde", steps=args.steps, shift=5.0))
        stored = sum(t.numel() * t.element_size() for t in (traj.latents, traj.log_probs, traj.sigmas,
                                                            traj.timesteps, traj.experts, traj.trainable))
        per_traj = stored / args.videos
        bound = (args.steps + 1) * torch.Size(shape[1:]).numel() * torch.empty((), dtype=dtype).element_size()
        gpu = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device.type == "cuda" else "-"
        rows.append(f"| {str(dtype).removeprefix('torch.')} | {per_traj / 2**20:.3f} | {bound / 2**20:.3f} | "
                    f"{per_traj / bound:.3f} | {peak_rss_mib() - before:.0f} | {gpu} |")
    lines = [f"{args.size} x {args.frame_num} frames, {args.steps} steps, {args.videos} videos", "",
             "| storage dtype | stored per trajectory (MiB) | lower bound (MiB) | ratio | peak RSS added (MiB) "
             "| peak GPU (MiB) |", "|---|---|---|---|---|---|", *rows]
    record("Trajectory memory", device, lines, args)


if __name__ == "__main__":
    main()
