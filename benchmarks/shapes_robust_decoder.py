"""The shipped Shapes base with its VAE decoder fine-tuned to decode perturbed latents, the experts untouched.

The experts' samples are latents a little off the encoder's: the decoder, trained on encoded renders only,
turns those errors into ragged edges and dark trails. Here the decoder alone (and post_quant_conv) learns to
map latents perturbed by N(0, (s * channel std)^2), s ~ U(0, --max_noise) per clip, back to the clean clip (the
build's crops and loss); the encoder is frozen, so the experts' latents and samples are unchanged. Writes the
shipped base with the new VAE to --out and prints both VAEs' round trips of held-out renders; compare the
models with `wan-grpo eval --ckpt_dir <base or --out> --prompts shapes:L:heldout` (same seeds, same latents).
``--edge_weight W`` adds W times the squared error of the pixels at colour edges (corners, outlines) to the loss.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import parser
from diffusers import AutoencoderKLWan

from wan_grpo.sft.loss import pixel_gradient
from wan_grpo.tasks.shapes import BASE_DIR
from wan_grpo.tasks.shapes.build import _crops, _scene_draw, decoded, encoded, reconstruction_report, vae_loss


def edge_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, F, H, W) 1 on the pixels of clips ``x`` (B, 3, F, H, W) within one pixel of a colour edge."""
    edges = (pixel_gradient(x).sum(1, keepdim=True) > 0.1).float()
    return torch.nn.functional.max_pool3d(edges, (1, 3, 3), stride=1, padding=(0, 1, 1))


def finetune_decoder(vae: AutoencoderKLWan, *, steps: int, lr: float, max_noise: float, batch: int,
                     seed: int = 0, edge_weight: float = 0.0) -> list[float]:
    """Train ``vae``'s decoder in place on perturbed latents of Shapes crops; returns the losses. With
    ``edge_weight``, the squared error of pixels at colour edges (corners, outlines) counts that much more."""
    torch.manual_seed(seed)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    vae.requires_grad_(False)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.1)
    rng, draw = np.random.default_rng(seed), _scene_draw(0.5)
    losses = []
    for _ in range(steps):
        x = _crops(rng, draw, batch)
        with torch.no_grad():
            mu = encoded(vae, x)
        s = torch.rand(batch, 1, 1, 1, 1) * max_noise
        out = decoded(vae, mu + s * std * torch.randn_like(mu))
        loss = vae_loss(out, x)
        if edge_weight:
            loss = loss + edge_weight * (edge_mask(x) * (out - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
    vae.requires_grad_(False)
    return losses


def restamp_card(model_dir: Path, round_trip: dict, finetune: dict) -> None:
    """The copied build card describes the shipped VAE: give it this decoder's round trips and settings."""
    card = json.loads((model_dir / "build.json").read_text())
    card["vae_round_trip"] = round_trip
    card["decoder_finetune"] = finetune
    (model_dir / "build.json").write_text(json.dumps(card, indent=2) + "\n")


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--out", help="where the base with the fine-tuned decoder goes (smoke: a temporary folder)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max_noise", type=float, default=0.5, help="largest perturbation, in channel stds")
    p.add_argument("--batch", type=int, default=8, help="clip crops per step")
    p.add_argument("--edge_weight", type=float, default=0.0,
                   help="extra weight of the pixels at colour edges in the loss (0: the build's loss)")
    p.add_argument("--check_videos", type=int, default=32, help="held-out renders per level in the round trips")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.batch, args.check_videos = 2, 2, 1
    elif not args.out:
        p.error("--out is required (the model folder to write)")
    elif args.record:
        p.error("--record: this probe prints its table only; its numbers are in docs/benchmarks.md by hand")
    elif Path(args.out).resolve().is_relative_to(BASE_DIR) or BASE_DIR.is_relative_to(Path(args.out).resolve()):
        p.error(f"--out {args.out} would overwrite the shipped base; give a folder outside {BASE_DIR}")
    torch.set_num_threads(2)
    tmp = tempfile.TemporaryDirectory() if args.smoke else None
    out = Path(tmp.name) / "model" if tmp else Path(args.out)
    vae = AutoencoderKLWan.from_pretrained(str(BASE_DIR / "vae")).eval()
    before = reconstruction_report(vae, videos=args.check_videos)
    t0 = time.perf_counter()
    losses = finetune_decoder(vae, steps=args.steps, lr=args.lr, max_noise=args.max_noise, batch=args.batch,
                              edge_weight=args.edge_weight)
    minutes = (time.perf_counter() - t0) / 60
    after = reconstruction_report(vae.eval(), videos=args.check_videos)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(BASE_DIR, out)
    shutil.rmtree(out / "vae")
    vae.save_pretrained(str(out / "vae"))
    restamp_card(out, after, {"steps": args.steps, "lr": args.lr, "max_noise": args.max_noise, "batch": args.batch,
                              "edge_weight": args.edge_weight})
    print("| decoder | steps | minutes | loss, first / last 100 | round trips level 1: PSNR, verifier accuracy | "
          "level 2 |")
    print("|---|---|---|---|---|---|")
    for label, steps, mins, loss, rep in (("shipped", 0, 0.0, "", before),
                                          ("fine-tuned on perturbed latents", args.steps, minutes,
                                           f"{np.mean(losses[:100]):.4f} / {np.mean(losses[-100:]):.4f}", after)):
        print(f"| {label} | {steps} | {mins:.1f} | {loss} | {rep['level1']['psnr_db']} dB, "
              f"{rep['level1']['verifier_accuracy']} | {rep['level2']['psnr_db']} dB, "
              f"{rep['level2']['verifier_accuracy']} |")
    print(f"model: {out}")
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
