"""Build the Shapes base model (``make shapes-base``): deterministic, about 20 minutes on 2 CPU cores.

1. A small AutoencoderKLWan learns to reconstruct Shapes frames (its temporal taps are zeroed and
   stay zero, so it encodes each frame on its own and trains on single frames); its latents'
   per-channel mean and std go into its config, as Wan's VAEs carry theirs.
2. A seeded UMT5 with a word-level tokenizer over the grammar (``text.py``), never trained.
3. Two random WanTransformer3DModel experts (boundary 0.875, as T2V-A14B) saved with the rest by
   ``WanPipeline.save_pretrained``; ``wan-grpo sft`` then trains both on the training prompts of
   both levels, stopped while held-out accuracy is still well below 1.
4. The result is written atomically to ``--out`` with its held-out accuracy in a model card.

``python -m wan_grpo.tasks.shapes.build --out DIR [--work DIR] [--vae_steps N] [--sft_steps N]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
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
    parser.add_argument("--sft_steps", type=int, default=2000)
    parser.add_argument("--sft_lr", type=float, default=2e-3)
    parser.add_argument("--high_noise_share", type=float, default=None,
                        help="sft --high_noise_share (default: the shifted density's own share).")
    parser.add_argument("--videos_per_prompt", type=int, default=1)
    parser.add_argument("--dataset", default="shapes", help="sft --dataset (shapes:1 for a quick test build).")
    parser.add_argument("--vae_from", help="Reuse the trained VAE of an earlier build (its work/init folder).")
    parser.add_argument("--save_interval", type=int, default=0, help="Also keep SFT checkpoints every N steps.")
    parser.add_argument("--high_steps", type=int, default=0,
                        help="Then train the high-noise expert alone this many steps (it lays out the scene: the "
                             "motion and the shapes; measured on base4 + 1500: level-1 val accuracy 0.16 -> 0.20, "
                             "level 2 0.04 -> 0.10).")
    parser.add_argument("--high_lr", type=float, default=1e-3)
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


    sft_dir = work / "sft"
    shutil.rmtree(sft_dir, ignore_errors=True)
    run_sft(SFTConfig(ckpt_dir=str(init), task="shapes", dataset=args.dataset, lora_rank=0, learning_rate=args.sft_lr,
                      weight_decay=0.0, warmup_steps=100, lr_schedule="cosine", max_steps=args.sft_steps, batch_size=32,
                      train_batch_size=32, videos_per_prompt=args.videos_per_prompt, caption_dropout=0.1,
                      high_noise_share=args.high_noise_share, save_dir=str(sft_dir),
                      save_interval=args.save_interval,
                      tensorboard=False, log_interval=100, seed=SEED))
    final = {e: sft_dir / f"checkpoint-{args.sft_steps}" for e in Expert}
    if args.high_steps:
        stage = work / "stage1"
        _assemble(init, final, stage)
        high_dir = work / "sft-high"
        shutil.rmtree(high_dir, ignore_errors=True)
        run_sft(SFTConfig(ckpt_dir=str(stage), task="shapes", dataset=args.dataset, lora_rank=0, train_experts="high",
                          learning_rate=args.high_lr, weight_decay=0.0, warmup_steps=50, lr_schedule="cosine",
                          max_steps=args.high_steps, batch_size=32, train_batch_size=32, videos_per_prompt=2,
                          caption_dropout=0.1, save_dir=str(high_dir), tensorboard=False, log_interval=100,
                          seed=SEED + 1))
        final[Expert.HIGH] = high_dir / f"checkpoint-{args.high_steps}"
    assembled = out.with_name(f".{out.name}.tmp")
    _assemble(init, final, assembled)
    card = {"vae_psnr_db": round(vae_psnr, 2), "vae_steps": args.vae_steps, "sft_steps": args.sft_steps,
            "high_steps": args.high_steps, "build_seconds": round(time.perf_counter() - t0)}
    (assembled / "build.json").write_text(json.dumps(card, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(assembled, out)
    log.info("Shapes base model written to %s in %.0fs", out, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
