"""Shared helpers for the benchmark scripts: a random Wan2.2 of a chosen size, timing, recording."""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel

from wan_grpo.models.tiny import build_tiny_components
from wan_grpo.runtime import resolve_device

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, nothing recorded (CI)")
    p.add_argument("--record", action="store_true",
                   help="also append the table, with the machine and this command, to docs/benchmarks.md "
                        "(and write a plot under docs/ where the script draws one); without it a probe only prints")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    return p


def add_model_args(p: argparse.ArgumentParser, *, frame_num: int = 17) -> None:
    """Size of the random experts and of the video."""
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--size", default="64*64")
    p.add_argument("--frame_num", type=int, default=frame_num)


def components(*, layers: int, heads: int, head_dim: int, device):
    """The tiny model's VAE/text parts with two random experts of the given size (boundary 0.875)."""
    torch.manual_seed(0)
    c = build_tiny_components(0)
    text_dim = c.text_encoder.config.d_model

    def expert():
        return WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=16,
                                     out_channels=16, text_dim=text_dim, freq_dim=64, ffn_dim=4 * heads * head_dim,
                                     num_layers=layers, rope_max_seq_len=64).to(device).eval()

    c.transformer, c.transformer_2 = expert(), expert()
    c.vae.to(device)
    return c


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(max(1, repeats)):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}; torch {torch.__version__}"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads; torch {torch.__version__}"


def record(title: str, device, lines: list[str], args: argparse.Namespace) -> None:
    """Print the table; with ``--record`` (never with ``--smoke``) append it to docs/benchmarks.md with the
    machine and command."""
    print("\n".join(lines))
    if args.smoke or not args.record:
        return
    command = " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    block = [f"\n### {title} ({datetime.date.today().isoformat()})", "",
             f"Machine: {machine(device)}. Command: `{command}`", "", *lines, ""]
    with DOCS.open("a") as f:
        f.write("\n".join(block))


def device_from(args):
    return resolve_device(args.device)
