"""Build the Shapes base model: deterministic, about 70 minutes on 2 CPU cores (30 for the VAE, 38 for the
text encoder and twelve thousand SFT steps). ``make shapes-base-full`` runs all of it; ``make shapes-base``
reuses the shipped base's VAE (``--vae_from``) and so skips step 1, writing the shipped weights byte for byte
on the CPU that built them (an Intel Xeon rounds differently and ends with another high-noise expert of the
same quality).

1. A small AutoencoderKLWan learns to reconstruct Shapes clips, compressing time 4x as Wan2.2's do
   (9 frames -> 3 latent frames), warm-started from the previous base's VAE (``VAE_DEFAULTS``). It is
   causal in time, as Wan's is: each latent frame also sees the frames before it, and the first is
   encoded against zero padding. That is what lets the DiT learn the direction of time (on latents of
   frames encoded alone it could not tell "moving left" from "moving right"). Its loss weighs every
   pixel an object covers in any frame of the clip 5x: without that, ghosts of earlier frames
   survived round trips and the verifier read them as wrong colours and shapes. The build card
   records PSNR and the verifier's accuracy on round trips. The latents' per-channel mean and std go
   into its config, as Wan's VAEs carry theirs.
2. A seeded UMT5 with a word-level tokenizer over the grammar (``text.py``), taught the grammar on the
   training prompts (``pretrain_text_encoder``) and not trained after.
3. Two random WanTransformer3DModel experts (boundary 0.875, as T2V-A14B) saved with the rest by
   ``WanPipeline.save_pretrained``; ``wan-grpo sft`` then trains them in stages (``STAGES``: both
   experts, then each alone, then both on level 2 and last on both levels; each stage starts from the
   last), stopped while held-out accuracy is still well below 1.
4. The result is written atomically to ``--out`` with its build card (build.json).

``python -m wan_grpo.tasks.shapes.build --out DIR [--work DIR] [--vae_steps N] [--stage EXPERTS:STEPS:LR:VPP ...]``
(``-h`` lists the rest: the VAE's shape and training, its warm start, the experts' patch size and width)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from wan_grpo.errors import UserError
from wan_grpo.sft.config import SFTConfig
from wan_grpo.sft.trainer import run_sft
from wan_grpo.specs import PRESETS, TASK_KEY, Expert
from wan_grpo.tasks.shapes import BASE_DIR, VAE_WARM_START
from wan_grpo.tasks.shapes.splits import load_split
from wan_grpo.tasks.shapes.text import TEXT_DIM, pretrain_text_encoder, shapes_text_encoder, shapes_tokenizer
from wan_grpo.tasks.shapes.verifier import score_video
from wan_grpo.tasks.shapes.world import BACKGROUND, all_scenes, render

log = logging.getLogger("wan_grpo")

VAE_CONFIG = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, False, False], scale_factor_temporal=1, scale_factor_spatial=8)
DIT_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                  out_channels=16, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
SEED = 0


def vae_config(time_stride: int = 1, z_dim: int = 16, dim_mult: tuple[int, ...] = (1, 2, 2, 2)) -> dict:
    """The build's VAE; ``time_stride`` 4 compresses time as Wan2.2's VAEs do (9 frames -> 3 latent frames);
    ``dim_mult`` scales the width of its four levels (base_dim 16), so the spatial stride stays 8."""
    temporal = {1: [False, False, False], 2: [False, True, False], 4: [False, True, True]}[time_stride]
    return dict(VAE_CONFIG, z_dim=z_dim, dim_mult=list(dim_mult), temperal_downsample=temporal,
                scale_factor_temporal=time_stride)


def vae_folder(folder: str) -> Path | None:
    """The folder holding a VAE's config: ``folder``'s vae/ (a model folder) or ``folder`` itself; None if neither."""
    return next((p for p in (Path(folder) / "vae", Path(folder)) if (p / "config.json").is_file()), None)


def warm_start(vae: AutoencoderKLWan, folder: str) -> list[str]:
    """Copy every weight of the VAE in ``folder`` (a model folder or its vae/) whose name and shape match
    ``vae``'s; returns the names left as initialised (e.g. time convolutions a stride-1 VAE lacks)."""
    donor = AutoencoderKLWan.from_pretrained(str(vae_folder(folder)))
    own, theirs = vae.state_dict(), donor.state_dict()
    vae.load_state_dict({k: v for k, v in theirs.items() if k in own and own[k].shape == v.shape}, strict=False)
    return sorted(k for k in own if k not in theirs or theirs[k].shape != own[k].shape)


@dataclass(frozen=True)
class Stage:
    """One ``wan-grpo sft`` run of the build: which experts, how many steps of 32 videos, the peak LR
    (cosine), rendered videos per training caption, and its own ``--dataset`` if not the build's.
    Stage i uses seed SEED + i."""

    experts: str  # high, low or high,low
    steps: int
    lr: float
    videos_per_prompt: int
    dataset: str | None = None

    @staticmethod
    def parse(text: str) -> "Stage":
        try:
            experts, steps, lr, vpp, *dataset = text.split(":", 4)
            stage = Stage(experts.replace("both", "high,low"), int(steps), float(lr), int(vpp), *dataset)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not EXPERTS:STEPS:LR:VPP[:DATASET] (e.g. both:2000:2e-3:1 or both:1000:1e-3:2:shapes:2)"
            ) from None
        if stage.experts not in ("high", "low", "high,low") or stage.steps < 1 or stage.videos_per_prompt < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: EXPERTS is high, low or both; STEPS and VPP are >= 1")
        if stage.dataset == "":
            raise argparse.ArgumentTypeError(f"{text!r} ends in an empty DATASET; drop the last ':' to use --dataset")
        return stage

    def label(self) -> str:
        label = f"{self.experts.replace('high,low', 'both')}:{self.steps}:{self.lr:g}:{self.videos_per_prompt}"
        return label + (f":{self.dataset}" if self.dataset else "")


# The shipped base: both experts learn the world, then the high-noise expert (which lays out the scene:
# where the objects are and how they move) and the low-noise one (their edges: the shape) go on alone.
# Level 2 (binding a colour to each of two shapes) needs far more steps than level 1: 3000 on level 2
# alone teach it, but every single-level stage makes the experts forget the other level within a few
# hundred steps (level-1 motion 0.89 -> 0.03), so a last stage on both levels equally brings level 1
# back and keeps level 2.
STAGES = (Stage("high,low", 2000, 2e-3, 1), Stage("high,low", 1500, 1e-3, 2), Stage("high", 1500, 1e-3, 2),
          Stage("high", 1500, 1e-3, 2), Stage("low", 1500, 1e-3, 2), Stage("high,low", 3000, 1e-3, 2, "shapes:2"),
          Stage("high,low", 1000, 5e-4, 1))

# The shipped base's VAE: Wan2.2's 4x time compression (9 frames -> 3 latent frames, so a DiT step costs a
# quarter), twice as wide as the previous base's deeper levels, warm-started from that VAE, and shown a
# moving object in half its clips (trained on the scenes' own 1 in 16 it lost moving objects).
VAE_DEFAULTS = dict(vae_steps=2500, vae_time_stride=4, vae_lr=2e-3, vae_z_dim=16, vae_dim_mult=(1, 2, 4, 4),
                    vae_level1_share=0.5, vae_init=str(VAE_WARM_START))


CROP = 32  # training crops: a quarter of each frame of a clip, 8-px aligned, around a pixel of an object


def _scene_draw(level1_share: float | None):
    """rng -> a random scene: uniform over both levels' scenes (1 in 16 moves), or level 1's with
    probability ``level1_share``."""
    one, two = all_scenes(1), all_scenes(2)
    if level1_share is None:
        scenes = one + two
        return lambda rng: scenes[rng.integers(len(scenes))]
    return lambda rng: one[rng.integers(len(one))] if rng.random() < level1_share else two[rng.integers(len(two))]


def _crops(rng: np.random.Generator, draw, n: int) -> torch.Tensor:
    """(n, 3, FRAMES, CROP, CROP) crops of whole clips in [-1, 1], from scenes ``draw(rng)`` and random seeds.
    Objects cover a few % of a frame: crops around them train the decoder on edges faster than whole frames."""
    crops = []
    for _ in range(n):
        clip = render(draw(rng), int(rng.integers(1 << 30)))
        ys, xs = np.nonzero((clip != BACKGROUND).any(-1).any(0))
        k = rng.integers(len(ys))
        top = min(max(0, (ys[k] - CROP // 2) // 8 * 8), clip.shape[1] - CROP)
        left = min(max(0, (xs[k] - CROP // 2) // 8 * 8), clip.shape[2] - CROP)
        crops.append(clip[:, top:top + CROP, left:left + CROP])
    return torch.from_numpy(np.stack(crops)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def _round_trip(vae: AutoencoderKLWan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent mean, unclamped reconstruction) with gradients. Without temporal downsampling the causal
    convolutions see the whole clip at once; with it, time only shrinks on ``encode``/``decode``'s own
    cached path (the first frame, then chunks of 4 in; one latent frame at a time out), so that path is
    replayed here, less the final clamp that would stop gradients."""
    if vae.config.scale_factor_temporal == 1:
        mu = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0]
        return mu, vae.decoder(vae.post_quant_conv(mu))
    mu = encoded(vae, x)
    return mu, decoded(vae, mu)


def encoded(vae: AutoencoderKLWan, x: torch.Tensor) -> torch.Tensor:
    """The latent mean of ``x`` along ``encode``'s cached path (a VAE that compresses time), with gradients."""
    vae.clear_cache()
    chunks = [x[:, :, :1]] + [x[:, :, i:i + 4] for i in range(1, x.shape[2], 4)]
    out = []
    for chunk in chunks:
        vae._enc_conv_idx = [0]
        out.append(vae.encoder(chunk, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx))
    vae.clear_cache()
    return vae.quant_conv(torch.cat(out, 2)).chunk(2, dim=1)[0]


def decoded(vae: AutoencoderKLWan, mu: torch.Tensor) -> torch.Tensor:
    """The unclamped decoding of latents ``mu`` along ``decode``'s cached path, with gradients."""
    z, out = vae.post_quant_conv(mu), []
    vae.clear_cache()
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        out.append(vae.decoder(z[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                               first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(out, 2)


def vae_loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MSE of a reconstruction ``out`` of clips ``x`` (in [-1, 1]), every pixel an object covers in any frame
    weighed 5x: where an object was is where a causal decoder leaves ghosts."""
    background = torch.tensor(BACKGROUND, dtype=x.dtype).view(1, 3, 1, 1, 1) / 127.5 - 1
    weight = 1 + 4 * ((x - background).abs().sum(1, keepdim=True) > 0.1).any(2, keepdim=True).float()
    return (weight * (out - x) ** 2).mean()


def train_vae(steps: int, *, seed: int = SEED, batch: int = 8, lr: float = 3e-3, on_step=None,
              config: dict | None = None, init: str | None = None,
              level1_share: float | None = None) -> AutoencoderKLWan:
    """MSE reconstruction of whole clips (object pixels weighted 5x: they are a few % of a frame), Adam,
    one-cycle LR, through ``_round_trip`` (what ``encode``/``decode`` give). ``config`` is the VAE's
    (default ``VAE_CONFIG``); ``init`` a model folder to warm-start from (``warm_start``); ``level1_share``
    the share of clips with a moving object (default: 1 in 16, their share of the scenes)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**(config or VAE_CONFIG))
        if init is not None:
            log.info("VAE warm-started from %s; new: %s", init, ", ".join(warm_start(vae, init)) or "none")
        rng = np.random.default_rng(seed)
        draw = _scene_draw(level1_share)
        opt = torch.optim.Adam(vae.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)
        for step in range(steps):
            x = _crops(rng, draw, batch)
            mu, out = _round_trip(vae, x)
            loss = vae_loss(out, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            if on_step is not None:
                on_step(step, float(loss.detach()))
    return vae.eval()


@torch.no_grad()
def set_latent_stats(vae: AutoencoderKLWan, *, seed: int = SEED, videos: int = 64) -> None:
    """Write the latents' per-channel mean and std over rendered videos into the VAE config."""
    rng = np.random.default_rng(seed + 1)
    scenes = all_scenes(1) + all_scenes(2)
    clips = [render(scenes[rng.integers(len(scenes))], int(rng.integers(1 << 30))) for _ in range(videos)]
    x = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    z = torch.cat([vae.encode(c).latent_dist.mode() for c in x.split(16)])
    dims = (0, 2, 3, 4)
    vae.register_to_config(latents_mean=z.mean(dims).tolist(), latents_std=z.std(dims).tolist())


@torch.no_grad()
def reconstruction_report(vae: AutoencoderKLWan, *, seed: int = SEED, videos: int = 32) -> dict:
    """PSNR (dB) of the VAE's round trips of rendered videos it was not trained on, and the verifier's
    accuracy on those round trips per level: the ceiling of any model that samples through this VAE."""
    rng = np.random.default_rng(seed + 2)
    report = {}
    for level in (1, 2):
        scenes = all_scenes(level)
        db, accuracy = [], []
        for _ in range(videos):
            scene = scenes[rng.integers(len(scenes))]
            clip = render(scene, int(rng.integers(1 << 30)))
            x = torch.from_numpy(clip[None]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
            out = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            db.append(float(10 * torch.log10(4 / ((out - x) ** 2).mean())))
            frames = ((out[0].permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()
            accuracy.append(score_video(frames, scene)["accuracy"])
        report[f"level{level}"] = {"psnr_db": round(float(np.mean(db)), 2),
                                   "verifier_accuracy": round(float(np.mean(accuracy)), 3)}
    return report


def random_pipeline(vae: AutoencoderKLWan, *, seed: int = SEED, text_steps: int = 300, patch: int = 2,
                    heads: int = DIT_CONFIG["num_attention_heads"]) -> WanPipeline:
    """Random experts (their channels the VAE's; ``heads`` of 32 channels wide, the feed-forward 4x that width);
    the text encoder is taught the grammar on the training prompts first."""
    z = vae.config.z_dim
    width = heads * DIT_CONFIG["attention_head_dim"]
    config = dict(DIT_CONFIG, in_channels=z, out_channels=z, patch_size=(1, patch, patch), num_attention_heads=heads,
                  ffn_dim=4 * width)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 10)
        high, low = WanTransformer3DModel(**config), WanTransformer3DModel(**config)
    tokenizer, encoder = shapes_tokenizer(), shapes_text_encoder(seed + 20)
    losses = pretrain_text_encoder(encoder, tokenizer, load_split(1, "train") + load_split(2, "train"),
                                   steps=text_steps, seed=seed + 30)
    log.info("text encoder: grammar loss %.4f -> %.4f in %d steps", losses[0], losses[-1], text_steps)
    return WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=PRESETS["shapes"].shift),
                       transformer=high, transformer_2=low, boundary_ratio=PRESETS["shapes"].boundary_ratio)


def save_pipeline(pipe: WanPipeline, folder: Path) -> None:
    pipe.save_pretrained(str(folder))
    index = json.loads((folder / "model_index.json").read_text())
    index[TASK_KEY] = "shapes"  # --task shapes is inferred from the folder
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _assemble(init: Path, experts: dict, folder: Path) -> None:
    """``init`` (VAE, text encoder, scheduler) with each expert taken from its SFT checkpoint."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(init, folder)
    for expert, ckpt in experts.items():
        shutil.rmtree(folder / expert.diffusers_dir)
        shutil.copytree(ckpt / expert.diffusers_dir, folder / expert.diffusers_dir)


def _shown(folder: str | None) -> str | None:
    """A folder for the build card: one inside the package as its path there, so a card names no machine."""
    if folder is None:
        return None
    path, package = Path(folder).resolve(), Path(__file__).resolve().parents[2]
    return path.relative_to(package).as_posix() if path.is_relative_to(package) else folder


VAE_RECIPE_KEYS = ("vae_steps", "vae_lr", "vae_init", "vae_level1_share")


def vae_recipe(args: argparse.Namespace) -> dict:
    """How the build's VAE was made, for the card: the flags it trained with, or with --vae_from that folder
    and the recipe that trained it, from the build card of the model folder whose vae/ it is (null for a VAE
    without one). A card that itself reused its VAE passes on the recipe it recorded, so rebuilds on one
    VAE (``make shapes-base``) keep naming the training that made it."""
    if not args.vae_from:
        return dict(vae_steps=args.vae_steps, vae_lr=args.vae_lr, vae_init=_shown(args.vae_init),
                    vae_level1_share=args.vae_level1_share)
    vae, source = vae_folder(args.vae_from), {}
    model = vae.parent if vae.name == "vae" and (vae.parent / "model_index.json").is_file() else None
    if model is not None and (model / "build.json").is_file():
        try:
            source = json.loads((model / "build.json").read_text())
        except (OSError, json.JSONDecodeError):
            source = None
        if not isinstance(source, dict):
            raise UserError(f"--vae_from {args.vae_from}: its build.json is not a build card (want a JSON object); "
                            "fix or delete it")
    recipe = source.get("vae_from_recipe", {k: source[k] for k in VAE_RECIPE_KEYS if k in source} or None)
    return {"vae_from": _shown(args.vae_from), "vae_from_recipe": recipe}


def _dim_mult(text: str) -> tuple[int, ...]:
    try:
        mult = tuple(int(m) for m in text.split(","))
    except ValueError:
        mult = ()
    if len(mult) != 4 or min(mult) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not four positive widths (e.g. 1,2,4,4)")
    return mult


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BASE_DIR), help="Where the finished model goes (default: the package's).")
    parser.add_argument("--work", default="runs/shapes-build", help="Intermediate files (VAE, SFT run).")
    parser.add_argument("--vae_steps", type=int, help=f"VAE training steps (default {VAE_DEFAULTS['vae_steps']}).")
    parser.add_argument("--stage", action="append", type=Stage.parse, metavar="EXPERTS:STEPS:LR:VPP[:DATASET]",
                        help="An SFT stage (repeat for several; default: the shipped base's "
                             f"{' '.join(st.label() for st in STAGES)}). EXPERTS: high, low or both.")
    parser.add_argument("--dataset", default="shapes", help="sft --dataset (shapes:1 for a quick test build).")
    parser.add_argument("--vae_from", help="Reuse the trained VAE of an earlier build: a model folder (e.g. its "
                             "work/init) or its vae/ folder.")
    parser.add_argument("--vae_time_stride", type=int, choices=(1, 2, 4),
                        help="Frames per latent frame (default 4, as Wan2.2's VAEs; the previous Shapes VAE: 1).")
    parser.add_argument("--vae_lr", type=float,
                        help=f"Peak one-cycle learning rate of the VAE (default {VAE_DEFAULTS['vae_lr']:g}).")
    parser.add_argument("--vae_z_dim", type=int, help="Latent channels of a trained VAE (default 16).")
    parser.add_argument("--vae_dim_mult", type=_dim_mult, metavar="A,B,C,D",
                        help="Widths of the VAE's four levels in units of 16 channels (default 1,2,4,4; the "
                             "previous Shapes VAE: 1,2,2,2).")
    parser.add_argument("--vae_level1_share", type=float, metavar="F",
                        help="Share of the VAE's training clips from level 1, the moving objects (default 0.5; "
                             "their share of all scenes is 1 in 16, too few for a VAE that compresses time).")
    parser.add_argument("--vae_init", help="Start the VAE from the weights of an earlier one (a model folder or "
                                           "vae/ folder) wherever names and shapes match (default: the previous "
                                           "base's VAE, shipped in tasks/shapes/vae_warm_start; none: random).")
    parser.add_argument("--patch", type=int, default=2, choices=(1, 2),
                        help="The experts' spatial patch size: 2 gives a 64*64 frame 4*4 tokens, 1 gives 8*8.")
    parser.add_argument("--heads", type=int, default=DIT_CONFIG["num_attention_heads"],
                        help="The experts' attention heads, 32 channels each; the feed-forward is 4x that width "
                             f"(default {DIT_CONFIG['num_attention_heads']}: 128 wide).")
    parser.add_argument("--edge_weight", type=float, default=0.0, metavar="W",
                        help="sft --edge_weight of every stage: extra loss weight on the latent positions that "
                             "encode edges (default 0: all alike).")
    parser.add_argument("--vae_check_videos", type=int, default=32,
                        help="Held-out renders per level whose VAE round trips the build card scores.")
    args = parser.parse_args(argv)
    given = [f"--{k}" for k in VAE_DEFAULTS if getattr(args, k) is not None]
    if args.vae_from and given:
        parser.error(f"--vae_from reuses a trained VAE as it is: drop {' and '.join(given)}")
    for key, value in VAE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.vae_init == "none":
        args.vae_init = None
    if args.vae_from and vae_folder(args.vae_from) is None:
        parser.error(f"--vae_from {args.vae_from}: no VAE there (want a model folder with vae/config.json; for the "
                     "shipped base, restore it with git checkout -- src/wan_grpo/tasks/shapes/base or run make "
                     "shapes-base-full)")
    if args.vae_init and vae_folder(args.vae_init) is None:
        parser.error(f"--vae_init {args.vae_init}: no VAE there (want a model folder with vae/config.json, "
                     "or none for a random start)")
    if args.vae_steps < 1:
        parser.error(f"--vae_steps {args.vae_steps}: want >= 1 (to keep a trained VAE, give --vae_from instead)")
    if args.vae_z_dim < 1 or not 0 < args.vae_lr < float("inf"):
        parser.error(f"--vae_z_dim {args.vae_z_dim} --vae_lr {args.vae_lr}: want z_dim >= 1 and a finite lr > 0")
    if not 0 <= args.vae_level1_share <= 1:
        parser.error(f"--vae_level1_share {args.vae_level1_share}: want a share in [0, 1]")
    if args.heads < 1:
        parser.error(f"--heads {args.heads}: want >= 1")
    if not 0 <= args.edge_weight < float("inf"):  # nan fails too
        parser.error(f"--edge_weight {args.edge_weight}: want a finite number >= 0")
    if args.vae_check_videos < 1:
        parser.error("--vae_check_videos must be >= 1: the build card averages the VAE's round trips over them")
    try:
        recipe = vae_recipe(args)
    except UserError as exc:  # a malformed build.json beside the reused VAE
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    losses = []

    def on_vae_step(step, loss):
        losses.append(loss)
        if step % 100 == 0 or step == args.vae_steps - 1:
            log.info("VAE step %d/%d  loss %.4f  (%.0fs)", step + 1, args.vae_steps, loss, time.perf_counter() - t0)

    if args.vae_from:
        vae = AutoencoderKLWan.from_pretrained(str(vae_folder(args.vae_from))).eval()
    else:
        vae = train_vae(args.vae_steps, on_step=on_vae_step, init=args.vae_init, lr=args.vae_lr,
                        config=vae_config(args.vae_time_stride, args.vae_z_dim, args.vae_dim_mult),
                        level1_share=args.vae_level1_share)
        set_latent_stats(vae)
    vae_report = reconstruction_report(vae, videos=args.vae_check_videos)
    log.info("VAE round trips of held-out renders: %s", vae_report)
    (work / "vae_losses.json").write_text(json.dumps(losses))
    init = work / "init"
    shutil.rmtree(init, ignore_errors=True)
    save_pipeline(random_pipeline(vae, patch=args.patch, heads=args.heads), init)
    vae_shape = {k: vae.config[k] for k in ("z_dim", "scale_factor_temporal", "dim_mult")}
    vae_card = {"vae_round_trip": vae_report, "vae": vae_shape, **recipe}
    (init / "build.json").write_text(json.dumps(vae_card, indent=2) + "\n")  # so --vae_from init finds the recipe
    stages = tuple(args.stage or STAGES)
    current, final = init, {}
    for i, stage in enumerate(stages):
        sft_dir = work / f"sft-{i}"
        shutil.rmtree(sft_dir, ignore_errors=True)
        run_sft(SFTConfig(ckpt_dir=str(current), task="shapes", dataset=stage.dataset or args.dataset, lora_rank=0,
                          train_experts=stage.experts, learning_rate=stage.lr, weight_decay=0.0,
                          warmup_steps=100 if i == 0 else 50, lr_schedule="cosine", max_steps=stage.steps,
                          batch_size=32, train_batch_size=32, videos_per_prompt=stage.videos_per_prompt,
                          caption_dropout=0.1, edge_weight=args.edge_weight, save_dir=str(sft_dir),
                          tensorboard=False, log_interval=100, seed=SEED + i))
        for name in stage.experts.split(","):
            final[Expert[name.upper()]] = sft_dir / f"checkpoint-{stage.steps}"
        current = work / f"stage-{i}"
        _assemble(init, final, current)
    assembled = out.with_name(f".{out.name}.tmp")
    _assemble(init, final, assembled)
    # with --vae_from, build_seconds leaves out the VAE's training
    card = {"vae_round_trip": vae_report, "vae": vae_shape, "patch": args.patch, "heads": args.heads,
            **({"edge_weight": args.edge_weight} if args.edge_weight else {}),
            "stages": [stage.label() for stage in stages], "build_seconds": round(time.perf_counter() - t0),
            **recipe}
    (assembled / "build.json").write_text(json.dumps(card, indent=2) + "\n")
    # swap, then delete: a stop at any point leaves a whole model at `out` or, between the renames, at `old`
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(assembled, out)
    shutil.rmtree(old, ignore_errors=True)
    log.info("Shapes base model written to %s in %.0fs", out, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
