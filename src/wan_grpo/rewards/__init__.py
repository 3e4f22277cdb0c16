"""Reward selection: ``--reward NAME[:WEIGHT],...``."""

from __future__ import annotations

import torch

from wan_grpo.errors import UserError
from wan_grpo.rewards.base import Reward
from wan_grpo.rewards.builtin import BUILTIN, FrameStatReward

NAMES = (*BUILTIN, "videoalign")


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'brightness:1,motion:0.5' -> [('brightness', 1.0), ('motion', 0.5)]; weight defaults to 1."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, weight = item.partition(":")
        if name not in NAMES:
            raise UserError(f"unknown reward {name!r}; --reward takes NAME[:WEIGHT],... with NAME in {', '.join(NAMES)}")
        try:
            out.append((name, float(weight) if weight else 1.0))
        except ValueError:
            raise UserError(f"reward weight {weight!r} of {name!r} is not a number; write e.g. {name}:0.5") from None
    if not out:
        raise UserError("--reward is empty; name at least one reward, e.g. --reward brightness")
    return out


def build_rewards(spec: str, *, vq_coef: float, mq_coef: float, ta_coef: float,
                  reward_model_path: str | None) -> tuple[list[Reward], dict[str, float]]:
    """The reward objects and the coefficient of every component they produce."""
    rewards, coefs = [], {}
    for name, weight in parse_reward_spec(spec):
        if name == "videoalign":
            raise UserError("the VideoAlign reward is not available in this version; use a built-in reward "
                            f"({', '.join(BUILTIN)})")
        rewards.append(FrameStatReward(name, BUILTIN[name]))
        coefs[name] = weight
    return rewards, coefs


def score(rewards: list[Reward], videos: list[torch.Tensor], prompts: list[str], *, fps: int) -> dict[str, torch.Tensor]:
    """All components of all rewards, each (N,) float32, checked for shape."""
    out: dict[str, torch.Tensor] = {}
    for reward in rewards:
        for name, values in reward(videos, prompts, fps=fps).items():
            values = torch.as_tensor(values, dtype=torch.float32).flatten()
            if values.shape != (len(videos),):
                raise RuntimeError(f"reward {reward.name!r} returned {tuple(values.shape)} scores for {len(videos)} videos")
            out[name] = values
    return out
