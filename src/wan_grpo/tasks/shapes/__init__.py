"""Shapes: a synthetic world of coloured shapes, a verifier reward, prompt splits and a small
pretrained Wan2.2 (``--task shapes``) on which learning can be measured on CPU in minutes."""

from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent / "base"  # the shipped diffusers-format model
