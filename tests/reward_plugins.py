"""User rewards for the plug-in and reward-server tests (importable as ``reward_plugins``)."""

import os

import torch

from wan_grpo.rewards.builtin import brightness

CALLS = {"n": 0}


def dark(videos, prompts, *, fps):
    """A bare tensor result: the component is named after the callable."""
    return torch.tensor([1.0 - brightness(v) for v in videos])


class Pair:
    """A class: instantiated with no arguments; returns two named components."""

    def __call__(self, videos, prompts, *, fps):
        return {"prompt_len": torch.tensor([float(len(p)) for p in prompts]),
                "frames": torch.tensor([float(v.shape[0]) for v in videos])}


def dies_on_second_call(videos, prompts, *, fps):
    """Scores once, then kills the process serving it (a reward server crashing mid-run)."""
    CALLS["n"] += 1
    if CALLS["n"] >= 2:
        os._exit(3)
    return torch.tensor([brightness(v) for v in videos])


def constant(videos, prompts, *, fps):
    """The same score for every video: every group has zero variance."""
    return torch.full((len(videos),), 0.5)
