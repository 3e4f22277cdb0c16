"""Group rollout with SDE log-probs (wan-grpo) vs diffusers' WanPipeline denoising loop, same work.

Same random two-expert model, prompt embeddings, initial noise, steps, guidance (4.0/3.0) and
number of videos; latents out (no VAE). Ratio = our time / diffusers' time (below 1: we are faster).
"""

from __future__ import annotations

import torch
from _common import add_model_args, components, device_from, parser, record, timed
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from wan_grpo.models.denoiser import MoEDenoiser
from wan_grpo.sampling.rollout import SamplerConfig, initial_noise, latent_shape, rollout, rollout_groups
from wan_grpo.seeding import sample_seed


def main():
    p = parser(__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--videos", type=int, default=4)
    args = p.parse_args()
    if args.smoke:
        args.layers, args.steps, args.videos, args.frame_num, args.repeats = 1, 2, 2, 5, 1
    device = device_from(args)
    c = components(layers=args.layers, heads=args.heads, head_dim=args.head_dim, device=device)
    w, h = (int(x) for x in args.size.split("*"))
    shape = latent_shape(c, width=w, height=h, frame_num=args.frame_num)
    text_dim = c.text_encoder.config.d_model
    cond = torch.randn(1, 512, text_dim, device=device)
    uncond = torch.randn(1, 512, text_dim, device=device)
    noise = torch.cat([initial_noise(shape, generator=torch.Generator().manual_seed(i), device=device)
                       for i in range(args.videos)])
    pipe = WanPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=c.transformer,
                       transformer_2=c.transformer_2, boundary_ratio=0.875)
    pipe.set_progress_bar_config(disable=True)
    den = MoEDenoiser(c, guidance_scale=4.0, guidance_scale_2=3.0)
    group_cond, group_uncond = cond.expand(args.videos, -1, -1), uncond.expand(args.videos, -1, -1)

    def theirs():
        with torch.no_grad():
            return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=h, width=w,
                        num_frames=args.frame_num, num_inference_steps=args.steps, guidance_scale=4.0,
                        guidance_scale_2=3.0, num_videos_per_prompt=args.videos, latents=noise.clone(),
                        output_type="latent").frames

    def ours_euler():
        cfg = SamplerConfig(solver="euler", steps=args.steps, shift=5.0)
        return rollout(den, noise, group_cond, group_uncond, config=cfg, record=False)[0]

    def ours_sde():
        cfg = SamplerConfig(solver="sde", steps=args.steps, shift=5.0)
        return rollout_groups(den, group_cond, uncond, latent_shape_one=shape, config=cfg,
                              seeds=[sample_seed(0, 0, g) for g in range(args.videos)])

    torch.testing.assert_close(ours_euler(), theirs(), rtol=1e-3, atol=1e-3)
    base = timed(theirs, args.repeats)
    t_euler, t_sde = timed(ours_euler, args.repeats), timed(ours_sde, args.repeats)
    lines = [f"{args.layers} layers, width {args.heads * args.head_dim}, {args.size} x {args.frame_num} frames, "
             f"{args.videos} videos of one prompt, {args.steps} steps, CFG on both experts", "",
             "| | seconds | ours / diffusers |", "|---|---|---|",
             f"| diffusers WanPipeline (latents out) | {base:.3f} | 1.00 |",
             f"| wan-grpo Euler, batched CFG | {t_euler:.3f} | {t_euler / base:.2f} |",
             f"| wan-grpo group rollout: SDE + log-probs + stored trajectory | {t_sde:.3f} | {t_sde / base:.2f} |"]
    record("Rollout vs WanPipeline", device, lines, args)


if __name__ == "__main__":
    main()
