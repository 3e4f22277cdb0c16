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

import math
from pathlib import Path

import numpy as np
import torch
from _common import parser
from diffusers import WanPipeline

from wan_grpo.models.denoiser import expert_for_timestep
from wan_grpo.models.loading import text_length
from wan_grpo.models.vae import decode_latents, encode_videos
from wan_grpo.specs import PRESETS
from wan_grpo.tasks.shapes import BASE_DIR
from wan_grpo.tasks.shapes.splits import load_split
from wan_grpo.tasks.shapes.verifier import score_video
from wan_grpo.tasks.shapes.world import SHAPES, parse, render


@torch.no_grad()
def sdedit_scores(pipe: WanPipeline, prompt: str, *, sigmas: list[float], uncond: torch.Tensor, starts: list[int],
                  guidance: tuple[float, float], renders: int, text_len: int) -> dict[int, list[dict]]:
    """start index -> the verifier's scores of the ``renders`` clips of ``prompt`` denoised from ``sigmas[start]``
    to 0 (``uncond``: the empty prompt's embedding; ``guidance``: CFG of the high and the low-noise expert)."""
    experts = (pipe.transformer, pipe.transformer_2)
    cond = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=text_len,
                              device="cpu")[0]
    scene = parse(prompt)
    scores = {start: [] for start in starts}
    for k in range(renders):
        clean = encode_videos(pipe.vae, torch.from_numpy(render(scene, 1000 + k)[None]))
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(k))
        for start in starts:
            z = (1 - sigmas[start]) * clean + sigmas[start] * noise
            for sigma, next_sigma in zip(sigmas[start:-1], sigmas[start + 1:]):
                t = torch.tensor([sigma * 1000.0])
                expert = expert_for_timestep(t, boundary_ratio=pipe.config.boundary_ratio)
                model = experts[expert]
                v_c = model(hidden_states=z, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
                v_u = model(hidden_states=z, timestep=t, encoder_hidden_states=uncond, return_dict=False)[0]
                z = z + (next_sigma - sigma) * (v_u + guidance[expert] * (v_c - v_u))
            scores[start].append(score_video(decode_latents(pipe.vae, z)[0].numpy(), scene))
    return scores


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--ckpt_dir", default=str(BASE_DIR))
    p.add_argument("--shapes", default="circle,square,triangle")
    p.add_argument("--guidance", default="4/4", help="CFG of the high / low-noise expert (the preset: 4/4)")
    p.add_argument("--starts", default="0,3,5,7,9", help="indices into the preset's 10 levels 1.0 ... 0.009 "
                                                         "(then 0)")
    p.add_argument("--prompts", type=int, default=6, help="level-1 training prompts per shape")
    p.add_argument("--renders", type=int, default=2, help="clips per prompt")
    args = p.parse_args()
    if args.smoke:
        args.shapes, args.starts, args.prompts, args.renders = "square", "0,9", 1, 1
    elif args.record:
        p.error("--record: this probe prints its table only; its numbers are in docs/benchmarks.md by hand")
    steps = PRESETS["shapes"].sampling_steps
    try:
        guidance = tuple(float(g) for g in args.guidance.split("/"))
        starts = [int(s) for s in args.starts.split(",")]
    except ValueError:
        p.error(f"--guidance {args.guidance!r} --starts {args.starts!r}: write e.g. --guidance 4/1 --starts 0,5,9")
    if len(guidance) != 2 or not all(math.isfinite(g) and g >= 0 for g in guidance):
        p.error(f"--guidance {args.guidance!r}: two scales >= 0, high/low, e.g. 4/1")
    if not all(0 <= s < steps for s in starts):
        p.error(f"--starts {args.starts!r}: indices 0 to {steps - 1} of the preset's {steps} levels")
    shapes = args.shapes.split(",")
    if not shapes or any(shape not in SHAPES for shape in shapes):
        p.error(f"--shapes {args.shapes!r}: a comma-separated list of {', '.join(SHAPES)}")
    if args.prompts < 1 or args.renders < 1:
        p.error("--prompts and --renders must be >= 1")
    if not (Path(args.ckpt_dir) / "model_index.json").is_file():
        p.error(f"--ckpt_dir {args.ckpt_dir}: no model_index.json there; give a diffusers model folder such as the "
                "Shapes base")
    torch.set_num_threads(2)
    pipe = WanPipeline.from_pretrained(args.ckpt_dir)
    pipe.scheduler.set_timesteps(steps)
    sigmas = pipe.scheduler.sigmas.tolist()
    text_len = text_length(Path(args.ckpt_dir) / "tokenizer")
    uncond = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=text_len,
                                device="cpu")[0]
    print(f"guidance {args.guidance} (high/low expert)")
    print("| shape | start level | accuracy | shape score | fill | clips |")
    print("|---|---|---|---|---|---|")
    for shape in shapes:
        prompts = [q for q in load_split(1, "train") if f" {shape} " in q][:args.prompts]
        pooled = {start: [] for start in starts}
        for prompt in prompts:
            for start, scores in sdedit_scores(pipe, prompt, sigmas=sigmas, uncond=uncond, starts=starts,
                                               guidance=guidance, renders=args.renders, text_len=text_len).items():
                pooled[start] += scores
        for start in sorted(starts, reverse=True):
            s = pooled[start]
            print(f"| {shape} | {sigmas[start]:.3f} | {np.mean([x['accuracy'] for x in s]):.2f} | "
                  f"{np.mean([x['shape'] for x in s]):.2f} | {np.mean([x['fill'] for x in s]):.2f} | {len(s)} |")


if __name__ == "__main__":
    main()
