"""Where the Shapes base loses a shape: a rendered clip's latents, noised to a level of the sampler's schedule, are
denoised by the base from there on (SDEdit), and the verifier scores the result.

A start at the schedule's last level is nearly a VAE round trip; a start at 1.0 is plain sampling. The level at
which a shape's accuracy falls tells which expert loses it (the high-noise expert acts at levels >= the boundary,
0.875): a model that keeps a shape from a noised start but never draws it from noise lays scenes out wrongly;
one that loses it from a low start draws its edges wrongly. Sampling is the preset's 10 levels (shift 3) with
Euler steps and CFG per expert (``--guidance HIGH/LOW``), the Shapes model's 16-token prompts and an empty
negative prompt; the level-1 training prompts of each shape, ``--renders`` clips each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _common import parser
from diffusers import WanPipeline

from wan_grpo.models.loading import text_length
from wan_grpo.tasks.shapes import BASE_DIR
from wan_grpo.tasks.shapes.splits import load_split
from wan_grpo.tasks.shapes.verifier import score_video
from wan_grpo.tasks.shapes.world import parse, render


@torch.no_grad()
def sdedit_scores(pipe: WanPipeline, prompt: str, *, starts: list[int], guidance: tuple[float, float], renders: int,
                  steps: int, text_len: int) -> dict[int, list[dict]]:
    """start index -> the verifier's scores of the ``renders`` clips of ``prompt`` denoised from that level."""
    vae, scheduler, boundary = pipe.vae, pipe.scheduler, pipe.config.boundary_ratio
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.tolist()
    embed = lambda text: pipe.encode_prompt(text, do_classifier_free_guidance=False,  # noqa: E731
                                            max_sequence_length=text_len, device="cpu")[0]
    cond, uncond, scene = embed(prompt), embed(""), parse(prompt)
    scores = {start: [] for start in starts}
    for k in range(renders):
        clip = torch.from_numpy(render(scene, 1000 + k)[None]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        clean = (vae.encode(clip).latent_dist.mode() - mean) / std
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(k))
        for start in starts:
            z = (1 - sigmas[start]) * clean + sigmas[start] * noise
            for i in range(start, steps):
                sigma, scale = sigmas[i], guidance[0] if sigmas[i] >= boundary else guidance[1]
                model = pipe.transformer if sigma >= boundary else pipe.transformer_2
                t = torch.tensor([sigma * 1000.0])
                v_c = model(hidden_states=z, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
                v_u = model(hidden_states=z, timestep=t, encoder_hidden_states=uncond, return_dict=False)[0]
                z = z + (sigmas[i + 1] - sigma) * (v_u + scale * (v_c - v_u))
            video = vae.decode(z * std + mean).sample.clamp(-1, 1)
            frames = ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()
            scores[start].append(score_video(frames, scene))
    return scores


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--ckpt_dir", default=str(BASE_DIR))
    p.add_argument("--shapes", default="circle,square,triangle")
    p.add_argument("--guidance", default="4/4", help="CFG of the high / low-noise expert (the preset: 4/4)")
    p.add_argument("--starts", default="0,3,5,7,9", help="indices into the 10 levels 1.0 ... 0.009 (then 0)")
    p.add_argument("--prompts", type=int, default=6, help="level-1 training prompts per shape")
    p.add_argument("--renders", type=int, default=2, help="clips per prompt")
    args = p.parse_args()
    if args.smoke:
        args.shapes, args.starts, args.prompts, args.renders = "square", "0,9", 1, 1
    elif args.record:
        p.error("--record: this probe prints its table only; its numbers are in docs/benchmarks.md by hand")
    torch.set_num_threads(2)
    guidance = tuple(float(g) for g in args.guidance.split("/"))
    starts = [int(s) for s in args.starts.split(",")]
    pipe = WanPipeline.from_pretrained(args.ckpt_dir)
    steps = 10
    pipe.scheduler.set_timesteps(steps)
    sigmas = pipe.scheduler.sigmas.tolist()
    text_len = text_length(Path(args.ckpt_dir) / "tokenizer")
    print(f"guidance {args.guidance} (high/low expert)")
    print("| shape | start level | accuracy | shape score | fill | clips |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        prompts = [q for q in load_split(1, "train") if f" {shape} " in q][:args.prompts]
        pooled = {start: [] for start in starts}
        for prompt in prompts:
            for start, scores in sdedit_scores(pipe, prompt, starts=starts, guidance=guidance, renders=args.renders,
                                               steps=steps, text_len=text_len).items():
                pooled[start] += scores
        for start in sorted(starts, reverse=True):
            s = pooled[start]
            print(f"| {shape} | {sigmas[start]:.3f} | {np.mean([x['accuracy'] for x in s]):.2f} | "
                  f"{np.mean([x['shape'] for x in s]):.2f} | {np.mean([x['fill'] for x in s]):.2f} | {len(s)} |")


if __name__ == "__main__":
    main()
