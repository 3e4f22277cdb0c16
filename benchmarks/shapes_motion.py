"""Why level-1 motion fails: axis against sign of the generated motion, and each expert's time-reversal gap.

For every video of a ``wan-grpo eval`` on level-1 prompts, the prompt's object is tracked by colour
and its first-to-last displacement split into axis (horizontal or vertical) and sign (which way
along it). A model that reads "left" as "horizontal" gets the axis right and the sign at chance.

The time-reversal gap of an expert is |F(R x) - R F(x)| / |F(x)| for R the reversal of the latent
frames, at one noise level per expert on noised latents of rendered videos: 0 means the expert
cannot tell a video from its reverse (so nor "left" from "right"). Beside it, the clean-sample
error of the expert's prediction for the true video and for its reverse under the true prompt.

python benchmarks/shapes_motion.py --lora runs/demo/checkpoint-16
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import parser, record

from wan_grpo.tasks.shapes import BASE_DIR
from wan_grpo.tasks.shapes.verifier import COLOUR_INDEX, label_pixels, largest_blob
from wan_grpo.tasks.shapes.world import parse, render
from wan_grpo.video import read_video

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right",
           "a yellow circle moving down"]
NOISE = {"transformer": 0.93, "transformer_2": 0.5}  # inside each expert's range (boundary 0.875)


def axis_and_sign(folder: Path) -> dict[str, float]:
    """Shares of the eval's videos whose motion is right, whose axis is right, and whose sign is right
    among those with the right axis."""
    videos = json.loads((folder / "eval.json").read_text())["videos"]
    axis, sign = [], []
    for v in videos:
        scene = parse(v["prompt"])
        frames = read_video(folder / v["video"])[0]
        colour = COLOUR_INDEX[scene.objects[0].colour]
        track = [b for b in (largest_blob(f == colour) for f in label_pixels(frames)) if b is not None]
        if len(track) < 2:
            axis.append(False)
            continue
        dy, dx = track[-1].cy - track[0].cy, track[-1].cx - track[0].cx
        horizontal = abs(dx) > abs(dy)
        axis.append(horizontal == (scene.direction in ("left", "right")))
        if axis[-1]:
            along = dx if horizontal else dy
            sign.append((along < 0) == (scene.direction in ("left", "up")))
    return {"videos": len(videos), "motion": statistics.mean(v["motion"] for v in videos),
            "axis": statistics.mean(axis), "sign": statistics.mean(sign) if sign else float("nan")}


@torch.no_grad()
def reversal_gaps(ckpt: Path, lora: Path | None) -> dict[str, tuple[float, float, float]]:
    """Per expert: (time-reversal gap, x0 error of the true video, of its reverse) over PROMPTS."""
    from wan_grpo.grpo.checkpoint import apply_checkpoint
    from wan_grpo.models.loading import load_components
    from wan_grpo.models.text import PromptEmbeddingCache
    from wan_grpo.models.vae import encode_videos

    components = load_components(ckpt)
    if lora:
        apply_checkpoint(components, str(lora))
    cache = PromptEmbeddingCache(max_sequence_length=components.text_len)
    cache.add(PROMPTS, components.tokenizer, components.text_encoder)
    out = {}
    for name, t in NOISE.items():
        expert = getattr(components, name)
        gen = torch.Generator().manual_seed(0)
        gaps, errs, errs_rev = [], [], []
        for i, prompt in enumerate(PROMPTS):
            z = encode_videos(components.vae, torch.from_numpy(render(parse(prompt), i))[None])
            x = (1 - t) * z + t * torch.randn(z.shape, generator=gen)
            emb = cache.get([prompt])

            def v(latents):
                return expert(latents, torch.tensor([t * 1000.0]), emb, return_dict=False)[0]

            forward, backward = v(x), v(x.flip(2))
            gaps.append(float((forward - backward.flip(2)).norm() / forward.norm()))
            errs.append(float(((x - t * forward - z) ** 2).mean()))
            errs_rev.append(float(((x.flip(2) - t * backward - z.flip(2)) ** 2).mean()))
        out[name] = (statistics.mean(gaps), statistics.mean(errs), statistics.mean(errs_rev))
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--ckpt_dir", default=str(BASE_DIR))
    p.add_argument("--lora", default=None, help="a train checkpoint to compare with the base")
    p.add_argument("--prompts", default="shapes:1:heldout")
    p.add_argument("--num_samples", type=int, default=8)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shapes-motion-"))
    if args.smoke:
        args.num_samples, args.prompts = 1, str(work / "prompts.txt")
        Path(args.prompts).write_text("\n".join(PROMPTS[:2]) + "\n")
    models = [("base", None)] + ([("trained", Path(args.lora))] if args.lora else [])
    lines = [f"Level-1 motion on {args.prompts}, {args.num_samples} videos per prompt; gap at t = "
             f"{NOISE['transformer']} (high-noise expert) and {NOISE['transformer_2']} (low-noise)", "",
             "| model | videos | motion | axis right | sign right (given the axis) | time-reversal gap high, low | "
             "x0 error true / reversed video, high | low |", "|---|---|---|---|---|---|---|---|"]
    for name, lora in models:
        extra = ["--lora", str(lora)] if lora else []
        out = subprocess.run([sys.executable, "-m", "wan_grpo", "eval", "--ckpt_dir", args.ckpt_dir, "--prompts",
                              args.prompts, "--num_samples", str(args.num_samples), "--save_dir",
                              str(work / name), *extra], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"wan-grpo eval failed:\n{out.stderr[-3000:]}")
        m = axis_and_sign(work / name)
        g = reversal_gaps(Path(args.ckpt_dir), lora)
        (gh, eh, rh), (gl, el, rl) = g["transformer"], g["transformer_2"]
        lines.append(f"| {name} | {m['videos']} | {m['motion']:.3f} | {m['axis']:.3f} | {m['sign']:.3f} | "
                     f"{gh:.3f}, {gl:.3f} | {eh:.3f} / {rh:.3f} | {el:.3f} / {rl:.3f} |")
    record("Shapes level-1 motion: axis, sign and time reversal", torch.device("cpu"), lines, args)


if __name__ == "__main__":
    main()
