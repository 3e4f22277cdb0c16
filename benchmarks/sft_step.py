"""One SFT step of a shipped Shapes expert (forward, flow-matching loss, backward, AdamW) under the speed
options a faster `make shapes-base` could use: bf16 autocast, regional torch.compile (`--compile`) and the
batch size. Ratio = seconds per clip against fp32 eager at the build's batch of 32.

The step is the build's unit of cost (12000 of them at batch 32), so this says what each option would buy
it. The inputs are random latents of the shipped VAE's shape (16 x 3 x 8 x 8) and random text states.
"""

from __future__ import annotations

import torch
from _common import device_from, parser, record, timed
from diffusers import WanTransformer3DModel

from wan_grpo.models.kernels import compile_blocks
from wan_grpo.sft.loss import flow_matching_loss, noised
from wan_grpo.tasks.shapes import BASE_DIR


def main():
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--batches", default="16,32,64", help="batch sizes of the fp32 eager rows")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.smoke:
        batches, args.repeats = [2], 1
    elif 32 not in batches:
        p.error("--batches must include 32, the build's batch and the ratios' reference")
    device = device_from(args)
    torch.manual_seed(0)

    def expert():
        return WanTransformer3DModel.from_pretrained(str(BASE_DIR / "transformer")).to(device).train()

    def step_fn(model, batch: int, bf16: bool):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        x0 = torch.randn(batch, model.config.in_channels, 3, 8, 8, device=device)
        noise, t = torch.randn_like(x0), torch.rand(batch, device=device)
        text = torch.randn(batch, 16, model.config.text_dim, device=device)
        x_t = noised(x0, noise, t)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                v = model(x_t, t * 1000, text, return_dict=False)[0]
            flow_matching_loss(v, x0, noise).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    base_batch = batches[0] if args.smoke else 32
    rows = [("fp32 eager", b, expert(), False) for b in batches]
    rows.append(("bf16 autocast", base_batch, expert(), True))
    if not args.smoke:  # compiling takes about a minute on 2 cores
        compiled = expert()
        compile_blocks([compiled])
        rows.append(("fp32, regional torch.compile", base_batch, compiled, False))
    per_clip = {}
    for label, batch, model, bf16 in rows:
        fn = step_fn(model, batch, bf16)
        if "compile" in label:
            fn()  # compiling happens here, beside timed's own warm-up call: not part of a step's cost
        per_clip[(label, batch)] = timed(fn, args.repeats) / batch
    ref = per_clip[("fp32 eager", base_batch)]
    lines = ["| step of one Shapes expert | batch | ms per clip | ratio to fp32 eager at batch "
             f"{base_batch} |", "|---|---|---|---|"]
    lines += [f"| {label} | {batch} | {1000 * s:.2f} | {s / ref:.2f} |" for (label, batch), s in per_clip.items()]
    record("SFT step of a Shapes expert: bf16, torch.compile, batch size", device, lines, args)


if __name__ == "__main__":
    main()
