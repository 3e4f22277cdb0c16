"""Replaying one trajectory step (forward with CFG, log-prob, PPO loss, backward) vs a bare
forward+backward of the same transformer on the same inputs. Ratio = replay / bare.

With CFG the replay runs the transformer on 2B inputs (cond and uncond), so about 2x is the floor;
the "no CFG" row isolates the cost of the log-prob and loss math.
"""

from __future__ import annotations

import torch
from _common import add_model_args, components, device_from, parser, record, timed

from wan_grpo.grpo.loss import ppo_clip_loss
from wan_grpo.grpo.replay import replay_transitions
from wan_grpo.models.denoiser import MoEDenoiser
from wan_grpo.sampling.rollout import SamplerConfig, latent_shape, rollout_groups
from wan_grpo.seeding import sample_seed


def main():
    p = parser(__doc__.splitlines()[0])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    if args.smoke:
        args.layers, args.batch, args.frame_num, args.repeats = 1, 2, 5, 1
    device = device_from(args)
    c = components(layers=args.layers, heads=args.heads, head_dim=args.head_dim, device=device)
    model = c.transformer_2.train()
    w, h = (int(x) for x in args.size.split("*"))
    shape = latent_shape(c, width=w, height=h, frame_num=args.frame_num)
    text_dim = c.text_encoder.config.d_model
    cond = torch.randn(args.batch, 512, text_dim, device=device)
    uncond = torch.randn(args.batch, 512, text_dim, device=device)
    seeds = [sample_seed(0, 0, g) for g in range(args.batch)]
    sampler = SamplerConfig(solver="sde", steps=4, shift=5.0)
    rows = []
    for label, guidance in (("CFG", 3.0), ("no CFG", 1.0)):
        den = MoEDenoiser(c, guidance_scale=guidance, guidance_scale_2=guidance)
        traj = rollout_groups(den, cond, uncond[:1], latent_shape_one=shape, config=sampler, seeds=seeds)
        step = int(torch.nonzero(traj.experts == 1).flatten()[0])
        samples, steps = torch.arange(args.batch), torch.full((args.batch,), step)
        x = traj.latents[:, step].to(device)
        t = traj.timesteps[steps].to(device)

        def replay():
            model.zero_grad(set_to_none=True)
            out = replay_transitions(den, traj, samples, steps, cond, uncond, expert=1, device=device)
            loss, _ = ppo_clip_loss(out.log_prob, traj.log_probs[samples, step].to(device),
                                    torch.randn(args.batch, device=device), 1e-4)
            loss.mean().backward()

        def bare():
            model.zero_grad(set_to_none=True)
            out = model(hidden_states=x, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]
            out.float().square().mean().backward()

        t_replay, t_bare = timed(replay, args.repeats), timed(bare, args.repeats)
        rows.append(f"| {label} | {t_bare:.3f} | {t_replay:.3f} | {t_replay / t_bare:.2f} |")
    lines = [f"{args.layers} layers, width {args.heads * args.head_dim}, {args.size} x {args.frame_num} frames, "
             f"batch {args.batch}", "", "| | bare fwd+bwd (s) | replay step (s) | replay / bare |",
             "|---|---|---|---|", *rows]
    record("Training step: replay vs bare forward+backward", device, lines, args)


if __name__ == "__main__":
    main()
