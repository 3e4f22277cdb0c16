"""Denoising time of wan-grpo against diffusers' WanPipeline on the same random Wan2.2 model and work.

Both sides get precomputed prompt embeddings and return latents (no text encoder, no VAE), so
the timed work is the same: N steps over both experts with CFG. Prints seconds and ratios.

    python benchmarks/sampling_vs_diffusers.py [--layers 4] [--dim_head 32] [--heads 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from wan_grpo.models.denoiser import MoEDenoiser
from wan_grpo.models.tiny import build_tiny_components
from wan_grpo.runtime import resolve_device
from wan_grpo.sampling.rollout import SamplerConfig, initial_noise, latent_shape, rollout


def expert(args, text_dim):
    return WanTransformer3DModel(num_attention_heads=args.heads, attention_head_dim=args.dim_head, in_channels=16,
                                 out_channels=16, text_dim=text_dim, freq_dim=64, ffn_dim=4 * args.heads * args.dim_head,
                                 num_layers=args.layers, rope_max_seq_len=64)


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim_head", type=int, default=32)
    p.add_argument("--size", default="128*128")
    p.add_argument("--frame_num", type=int, default=9)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = resolve_device(args.device)

    torch.manual_seed(0)
    c = build_tiny_components(0)
    text_dim = c.text_encoder.config.d_model
    c.transformer, c.transformer_2 = expert(args, text_dim).to(device).eval(), expert(args, text_dim).to(device).eval()
    w, h = (int(x) for x in args.size.split("*"))
    shape = latent_shape(c, width=w, height=h, frame_num=args.frame_num, batch=args.batch)
    cond = torch.randn(args.batch, 512, text_dim, device=device)
    uncond = torch.randn(args.batch, 512, text_dim, device=device)
    noise = initial_noise(shape, generator=torch.Generator().manual_seed(0), device=device)

    pipe = WanPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=c.transformer,
                       transformer_2=c.transformer_2, boundary_ratio=0.875)
    pipe.set_progress_bar_config(disable=True)
    den = MoEDenoiser(c, guidance_scale=4.0, guidance_scale_2=3.0)

    def diffusers_run():
        with torch.no_grad():
            return pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, height=h, width=w,
                        num_frames=args.frame_num, num_inference_steps=args.steps, guidance_scale=4.0,
                        guidance_scale_2=3.0, latents=noise.clone(), output_type="latent").frames

    def ours(solver, record):
        cfg = SamplerConfig(solver=solver, steps=args.steps, shift=5.0)
        return lambda: rollout(den, noise, cond, uncond, config=cfg, record=record,
                               generator=torch.Generator().manual_seed(1))

    torch.testing.assert_close(ours("euler", False)()[0], diffusers_run(), rtol=1e-3, atol=1e-3)
    base = timed(diffusers_run, args.repeats)
    print(f"device {device}, {args.layers} layers x {args.heads}x{args.dim_head}, {args.size}x{args.frame_num}, "
          f"batch {args.batch}, {args.steps} steps, CFG on both experts")
    print(f"{'diffusers WanPipeline (latents out)':40s} {base:8.3f} s   ratio 1.00 (diffusers time / ours)")
    for label, fn in (("wan-grpo euler (batched CFG)", ours("euler", False)),
                      ("wan-grpo sde rollout + log-probs + store", ours("sde", True))):
        t = timed(fn, args.repeats)
        print(f"{label:40s} {t:8.3f} s   ratio {base / t:.2f}")


if __name__ == "__main__":
    main()
