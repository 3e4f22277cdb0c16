"""Shapes: a synthetic world of coloured shapes, a verifier reward, prompt splits and a small
pretrained Wan2.2 (``--task shapes``) on which learning can be measured on CPU in minutes."""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent / "base"  # the shipped diffusers-format model
# the previous base's VAE (no time compression, narrower): where make shapes-base-full warm-starts its own
VAE_WARM_START = Path(__file__).resolve().parent / "vae_warm_start"

# What `wan-grpo train --task shapes` (given explicitly) trains with unless a config file or flag says otherwise:
# DiffusionNFT on both experts, full fine-tuning, three optimizer steps per rollout of 8 prompts x 8 videos
# (`nft-k3` of benchmarks/shapes_learning.py, chosen on p2's level-1 validation prompts; on level 2 `nft-k6-d2`
# leads; docs/benchmarks.md). timestep_fraction 1 is also the generic default, listed for the whole setting.
TRAIN_DEFAULTS = dict(algorithm="nft", train_experts="both", lora_rank=0, learning_rate=1e-4, timestep_fraction=1.0,
                      train_batch_size=32, optimizer_steps_per_rollout=3, batch_size=8, num_generations=8)
