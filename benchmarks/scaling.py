"""Seconds per GRPO step (rollout + rewards + update) on the tiny model as group size, sampling
steps and frames double. Each row is the median of the steps after the first."""

from __future__ import annotations

import dataclasses
import statistics
import tempfile

from _common import parser, record

from wan_grpo.grpo.config import TrainConfig
from wan_grpo.grpo.trainer import grpo_rollout_step, setup
from wan_grpo.runtime import resolve_device


def seconds_per_step(cfg: TrainConfig, steps: int) -> float:
    run = setup(cfg)
    times = []
    for r in range(steps):
        row = grpo_rollout_step(run, r)[-1]
        times.append(row["rollout_seconds"] + row["reward_seconds"] + row["train_seconds"])
    return statistics.median(times[1:] or times)


def main():
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = TrainConfig(task="tiny", device=args.device, num_generations=4, sampling_steps=8, frame_num=9,
                           lora_rank=8, tensorboard=False, save_dir=tmp, log_interval=0)
        if args.smoke:
            base = dataclasses.replace(base, num_generations=2, sampling_steps=2, frame_num=5)
        variants = [("base", {}), ("group x2", {"num_generations": 2 * base.num_generations}),
                    ("steps x2", {"sampling_steps": 2 * base.sampling_steps}),
                    ("frames x2", {"frame_num": 2 * base.frame_num - 1})]  # latent frames (F-1)/4+1 double
        if args.smoke:
            variants = variants[:2]
        rows, first = [], None
        for label, change in variants:
            cfg = dataclasses.replace(base, **change)
            t = seconds_per_step(cfg, 2 if args.smoke else 1 + args.repeats)
            first = first or t
            rows.append(f"| {label} | {cfg.num_generations} | {cfg.sampling_steps} | {cfg.frame_num} | {t:.2f} | "
                        f"{t / first:.2f} |")
    lines = ["tiny model (64*64), LoRA r8 on both experts, batch 1 prompt", "",
             "| variant | group | steps | frames | s / step | vs base |", "|---|---|---|---|---|---|", *rows]
    record("Scaling of a GRPO step", resolve_device(args.device), lines, args)


if __name__ == "__main__":
    main()
