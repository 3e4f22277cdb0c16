"""Rewards that need no weights: for the demo, the tests and as guards mixed with learned rewards.

Each maps one video to one float; all are in [0, 1] except ``motion`` (mean |frame difference|).
"""

from __future__ import annotations

import torch

from wan_grpo.rewards.base import frames_float

LUMA = torch.tensor([0.299, 0.587, 0.114])


def brightness(video: torch.Tensor) -> float:
    """Mean luma (ITU-R BT.601) of all frames, in [0, 1]."""
    return float((frames_float(video) @ LUMA).mean())


def colorfulness(video: torch.Tensor) -> float:
    """Hasler & Suesstrunk (2003) colourfulness, mean over frames, divided by its ~max (for 0..1 RGB) of 1."""
    x = frames_float(video)
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    std = torch.sqrt(rg.flatten(1).var(dim=1, unbiased=False) + yb.flatten(1).var(dim=1, unbiased=False))
    mean = torch.sqrt(rg.flatten(1).mean(dim=1) ** 2 + yb.flatten(1).mean(dim=1) ** 2)
    return float((std + 0.3 * mean).mean())


def motion(video: torch.Tensor) -> float:
    """Mean absolute difference between consecutive frames (0 for a still or 1-frame video)."""
    x = frames_float(video)
    if x.shape[0] < 2:
        return 0.0
    return float((x[1:] - x[:-1]).abs().mean())


def smoothness(video: torch.Tensor) -> float:
    """1 - mean |second temporal difference|: penalises flicker, not steady motion."""
    x = frames_float(video)
    if x.shape[0] < 3:
        return 1.0
    return float(1.0 - (x[2:] - 2 * x[1:-1] + x[:-2]).abs().mean())


class FrameStatReward:
    """A per-video statistic as a one-component reward."""

    def __init__(self, name: str, fn):
        self.name, self.components, self._fn = name, (name,), fn

    def __call__(self, videos, prompts, *, fps: int) -> dict[str, torch.Tensor]:
        return {self.name: torch.tensor([self._fn(v) for v in videos], dtype=torch.float32)}


BUILTIN = {
    "brightness": brightness,
    "colorfulness": colorfulness,
    "motion": motion,
    "smoothness": smoothness,
}
