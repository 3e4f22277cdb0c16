"""How much room a Shapes VAE leaves each shape: round trips of level-1 renders, scored by the verifier.

Per shape, over the level-1 training and held-out prompts (one render each): the bounding-box fill of the
rendered object and of its round trip (median and 10th percentile over frames; the verifier calls a blob a
square from 0.88, a circle from 0.68), the round trips' accuracy, and their accuracy when the latents are
perturbed by N(0, s^2) in the VAE's normalised units (what the experts' errors look like to the decoder).
Last, how far apart a square's and a circle's latents are (same colour, motion, size and place), against how
far an object's are from an empty clip's. Give VAE folders (a model folder or its vae/) to compare them.
"""

from __future__ import annotations

import numpy as np
import torch
from _common import parser, record
from diffusers import AutoencoderKLWan

from wan_grpo.models.vae import decode_latents, encode_videos
from wan_grpo.tasks.shapes import BASE_DIR
from wan_grpo.tasks.shapes.build import vae_folder
from wan_grpo.tasks.shapes.splits import load_split
from wan_grpo.tasks.shapes.verifier import COLOUR_INDEX, label_pixels, largest_blob, score_video
from wan_grpo.tasks.shapes.world import BACKGROUND, parse, render

SHAPES = ("square", "circle", "triangle")


def fills(video: np.ndarray, colour: str) -> list[float]:
    """The fill of the largest blob of ``colour`` in each frame (0 where there is none)."""
    blobs = [largest_blob(frame == COLOUR_INDEX[colour]) for frame in label_pixels(video)]
    return [b.fill if b is not None else 0.0 for b in blobs]


@torch.no_grad()
def shape_rows(vae, prompts: list[str], noises: list[float], seed: int = 0) -> dict[str, list[str]]:
    g = torch.Generator().manual_seed(seed)
    rows = {}
    for shape in SHAPES:
        picked = [p for p in prompts if f" {shape} " in p]
        videos = np.stack([render(parse(p), 100 + i) for i, p in enumerate(picked)])
        latents = encode_videos(vae, torch.from_numpy(videos))
        rendered = np.concatenate([fills(v, parse(p).objects[0].colour) for v, p in zip(videos, picked)])
        cells = []
        for s in noises:
            z = latents + s * torch.randn(latents.shape, generator=g) if s else latents
            trips = decode_latents(vae, z, micro_batch=4).numpy()
            if s == 0:
                got = np.concatenate([fills(v, parse(p).objects[0].colour) for v, p in zip(trips, picked)])
                cells += [f"{np.median(rendered):.2f}", f"{np.median(got):.2f}, {np.percentile(got, 10):.2f}"]
            cells.append(f"{np.mean([score_video(v, parse(p))['accuracy'] for v, p in zip(trips, picked)]):.2f}")
        rows[shape] = [str(len(picked)), *cells]
    return rows


@torch.no_grad()
def separation(vae, colours: tuple[str, ...]) -> tuple[float, float]:
    """Mean L2 distances (normalised latents) of a square's latents from a circle's, and from an empty clip's."""
    apart, away = [], []
    empty = np.empty((9, 64, 64, 3), dtype=np.uint8)
    empty[:] = BACKGROUND
    for colour in colours:
        for direction in ("left", "up"):
            clips = [render(parse(f"a {colour} {s} moving {direction}"), 7) for s in ("square", "circle")]
            z = encode_videos(vae, torch.from_numpy(np.stack([*clips, empty])))
            apart.append(float((z[0] - z[1]).norm()))
            away.append(float((z[0] - z[2]).norm()))
    return float(np.mean(apart)), float(np.mean(away))


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("vaes", nargs="*", default=[str(BASE_DIR)], help="VAE or model folders (default: the shipped base)")
    p.add_argument("--noise", default="0.1,0.2,0.3", help="latent perturbations s, in normalised units")
    args = p.parse_args()
    noises = [0.0, *(float(s) for s in args.noise.split(",") if s)]
    prompts = load_split(1, "train") + load_split(1, "heldout")
    colours = ("red", "green", "blue", "yellow", "purple", "white")
    if args.smoke:
        prompts, noises, colours = [x for x in prompts if " moving left" in x][:9], noises[:2], colours[:1]
    torch.set_num_threads(2)
    head = ["VAE", "shape", "clips", "rendered fill (median)", "round-trip fill (median, 10th pct)",
            "round-trip accuracy", *(f"accuracy at s={s:g}" for s in noises[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    gaps = []
    for folder in args.vaes:
        where = vae_folder(folder)
        if where is None:
            p.error(f"{folder}: no VAE there (want a model folder with vae/config.json, or that vae/ folder)")
        vae = AutoencoderKLWan.from_pretrained(str(where)).eval()
        for shape, cells in shape_rows(vae, prompts, noises).items():
            lines.append("| " + " | ".join([folder, shape, *cells]) + " |")
        apart, away = separation(vae, colours)
        gaps.append(f"| {folder} | {apart:.1f} | {away:.1f} | {apart / away:.2f} |")
    lines += ["", "| VAE | square to circle | square to empty clip | ratio |", "|---|---|---|---|", *gaps]
    record("Shapes VAE: room for squares", torch.device("cpu"), lines, args)


if __name__ == "__main__":
    main()
