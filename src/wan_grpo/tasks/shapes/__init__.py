"""Shapes: a synthetic world of coloured shapes, a verifier reward, prompt splits and a small
pretrained Wan2.2 (``--task shapes``) on which learning can be measured on CPU in minutes."""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent / "base"  # the shipped diffusers-format model
# the previous base's VAE (no time compression, narrower): where make shapes-base warm-starts its own
VAE_WARM_START = Path(__file__).resolve().parent / "vae_warm_start"
