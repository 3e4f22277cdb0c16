"""Build the Shapes base model (``make shapes-base``): deterministic, about 20 minutes on 2 CPU cores.

1. A small AutoencoderKLWan learns to reconstruct Shapes frames (its temporal taps are zeroed and
   stay zero, so it encodes each frame on its own and trains on single frames); its latents'
   per-channel mean and std go into its config, as Wan's VAEs carry theirs.
2. A seeded UMT5 with a word-level tokenizer over the grammar (``text.py``), never trained.
3. Two random WanTransformer3DModel experts (boundary 0.875, as T2V-A14B) saved with the rest by
   ``WanPipeline.save_pretrained``; ``wan-grpo sft`` then trains them in stages (``STAGES``: both
   experts, then each alone, each stage starting from the last), stopped while held-out accuracy is
   still well below 1.
4. The result is written atomically to ``--out`` with its build card (build.json).

``python -m wan_grpo.tasks.shapes.build --out DIR [--work DIR] [--vae_steps N] [--stage EXPERTS:STEPS:LR:VPP ...]``
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

from wan_grpo.sft.config import SFTConfig
from wan_grpo.sft.trainer import run_sft
from wan_grpo.specs import PRESETS, TASK_KEY, Expert
from wan_grpo.tasks.shapes import BASE_DIR
from wan_grpo.tasks.shapes.splits import load_split
from wan_grpo.tasks.shapes.text import TEXT_DIM, pretrain_text_encoder, shapes_text_encoder, shapes_tokenizer
from wan_grpo.tasks.shapes.world import BACKGROUND, FRAMES, all_scenes, render

log = logging.getLogger("wan_grpo")

VAE_CONFIG = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, False, False], scale_factor_temporal=1, scale_factor_spatial=8)
DIT_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                  out_channels=16, text_dim=TEXT_DIM, freq_dim=64, ffn_dim=512, num_layers=4, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
SEED = 0


@dataclass(frozen=True)
class Stage:
    """One ``wan-grpo sft`` run of the build: which experts, how many steps of 32 videos, the peak LR
    (cosine), and rendered videos per training caption. Stage i uses seed SEED + i."""

    experts: str  # high, low or high,low
    steps: int
    lr: float
    videos_per_prompt: int

    @staticmethod
    def parse(text: str) -> "Stage":
        try:
            experts, steps, lr, vpp = text.split(":")
            stage = Stage(experts.replace("both", "high,low"), int(steps), float(lr), int(vpp))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not EXPERTS:STEPS:LR:VPP (e.g. both:2000:2e-3:1)") from None
        if stage.experts not in ("high", "low", "high,low") or stage.steps < 1 or stage.videos_per_prompt < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: EXPERTS is high, low or both; STEPS and VPP are >= 1")
        return stage

    def label(self) -> str:
        return f"{self.experts.replace('high,low', 'both')}:{self.steps}:{self.lr:g}:{self.videos_per_prompt}"


# The shipped base: both experts learn the world, then the high-noise expert (which lays out the scene:
# where the objects are and how they move) and the low-noise one (their edges: the shape) go on alone.
STAGES = (Stage("high,low", 2000, 2e-3, 1), Stage("high,low", 1500, 1e-3, 2), Stage("high", 1500, 1e-3, 2),
          Stage("high", 1500, 1e-3, 2), Stage("low", 1500, 1e-3, 2))


def _zero_temporal_taps(vae: AutoencoderKLWan) -> int:
    """Zero the taps of every causal 3-D conv that read earlier frames; returns how many convs."""
    count = 0
    with torch.no_grad():
        for module in vae.modules():
            if type(module).__name__ == "WanCausalConv3d" and module.weight.shape[2] > 1:
                module.weight[:, :, :-1] = 0
                count += 1
    return count


CROP = 32  # training crops: a quarter of a frame, 8-px aligned, around a pixel of an object


def _crops(rng: np.random.Generator, scenes, n: int) -> torch.Tensor:
    """(n, 3, 1, CROP, CROP) single-frame crops in [-1, 1] from random scenes and seeds. Objects cover a
    few % of a frame: crops around them train the decoder on edges 4x faster than whole frames."""
    crops = []
    for _ in range(n):
        frame = render(scenes[rng.integers(len(scenes))], int(rng.integers(1 << 30)))[rng.integers(FRAMES)]
        ys, xs = np.nonzero((frame != BACKGROUND).any(-1))
        k = rng.integers(len(ys))
        top = min(max(0, (ys[k] - CROP // 2) // 8 * 8), frame.shape[0] - CROP)
        left = min(max(0, (xs[k] - CROP // 2) // 8 * 8), frame.shape[1] - CROP)
        crops.append(frame[top:top + CROP, left:left + CROP])
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)[:, :, None].float() / 127.5 - 1


def train_vae(steps: int, *, seed: int = SEED, batch: int = 64, lr: float = 3e-3, on_step=None) -> AutoencoderKLWan:
    """MSE reconstruction (object pixels weighted 5x: they are a few % of a frame), Adam, one-cycle LR.

    Adam leaves the zeroed temporal taps at zero: single frames give them no gradient.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**VAE_CONFIG)
        _zero_temporal_taps(vae)
        rng = np.random.default_rng(seed)
        scenes = all_scenes(1) + all_scenes(2)
        opt = torch.optim.Adam(vae.parameters(), lr=lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)
        background = torch.tensor(BACKGROUND).float().view(1, 3, 1, 1, 1) / 127.5 - 1
        for step in range(steps):
            x = _crops(rng, scenes, batch)
            mu = vae.quant_conv(vae.encoder(x)).chunk(2, dim=1)[0]
            out = vae.decoder(vae.post_quant_conv(mu))
            weight = 1 + 4 * ((x - background).abs().sum(1, keepdim=True) > 0.1).float()
            loss = (weight * (out - x) ** 2).mean()
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
def psnr(vae: AutoencoderKLWan, *, seed: int = SEED, videos: int = 32) -> float:
    """Mean PSNR (dB) of the VAE's reconstructions of rendered videos it was not trained on."""
    rng = np.random.default_rng(seed + 2)
    scenes = all_scenes(1) + all_scenes(2)
    values = []
    for _ in range(videos):
        clip = render(scenes[rng.integers(len(scenes))], int(rng.integers(1 << 30)))
        x = torch.from_numpy(clip[None]).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        out = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        values.append(float(10 * torch.log10(4 / ((out - x) ** 2).mean())))
    return float(np.mean(values))


def random_pipeline(vae: AutoencoderKLWan, *, seed: int = SEED, text_steps: int = 300) -> WanPipeline:
    """Random experts; the text encoder is taught the grammar on the training prompts first."""

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 10)
        high, low = WanTransformer3DModel(**DIT_CONFIG), WanTransformer3DModel(**DIT_CONFIG)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(BASE_DIR), help="Where the finished model goes (default: the package's).")
    parser.add_argument("--work", default="runs/shapes-build", help="Intermediate files (VAE, SFT run).")
    parser.add_argument("--vae_steps", type=int, default=1200)
    parser.add_argument("--stage", action="append", type=Stage.parse, metavar="EXPERTS:STEPS:LR:VPP",
                        help="An SFT stage (repeat for several; default: the shipped base's "
                             f"{' '.join(st.label() for st in STAGES)}). EXPERTS: high, low or both.")
    parser.add_argument("--dataset", default="shapes", help="sft --dataset (shapes:1 for a quick test build).")
    parser.add_argument("--vae_from", help="Reuse the trained VAE of an earlier build (its work/init folder).")
    args = parser.parse_args(argv)
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
        vae = AutoencoderKLWan.from_pretrained(args.vae_from, subfolder="vae").eval()
    else:
        vae = train_vae(args.vae_steps, on_step=on_vae_step)
        set_latent_stats(vae)
    vae_psnr = psnr(vae)
    log.info("VAE: %.2f dB PSNR on held-out renders", vae_psnr)
    (work / "vae_losses.json").write_text(json.dumps(losses))
    init = work / "init"
    shutil.rmtree(init, ignore_errors=True)
    save_pipeline(random_pipeline(vae), init)
    stages = tuple(args.stage or STAGES)
    current, final = init, {}
    for i, stage in enumerate(stages):
        sft_dir = work / f"sft-{i}"
        shutil.rmtree(sft_dir, ignore_errors=True)
        run_sft(SFTConfig(ckpt_dir=str(current), task="shapes", dataset=args.dataset, lora_rank=0,
                          train_experts=stage.experts, learning_rate=stage.lr, weight_decay=0.0,
                          warmup_steps=100 if i == 0 else 50, lr_schedule="cosine", max_steps=stage.steps,
                          batch_size=32, train_batch_size=32, videos_per_prompt=stage.videos_per_prompt,
                          caption_dropout=0.1, save_dir=str(sft_dir), tensorboard=False, log_interval=100,
                          seed=SEED + i))
        for name in stage.experts.split(","):
            final[Expert[name.upper()]] = sft_dir / f"checkpoint-{stage.steps}"
        current = work / f"stage-{i}"
        _assemble(init, final, current)
    assembled = out.with_name(f".{out.name}.tmp")
    _assemble(init, final, assembled)
    card = {"vae_psnr_db": round(vae_psnr, 2), "vae_steps": args.vae_steps,
            "stages": [stage.label() for stage in stages], "build_seconds": round(time.perf_counter() - t0)}
    (assembled / "build.json").write_text(json.dumps(card, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(assembled, out)
    log.info("Shapes base model written to %s in %.0fs", out, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
