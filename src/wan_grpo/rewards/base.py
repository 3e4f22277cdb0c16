"""The reward interface: decoded videos and their prompts in, named components out.

A reward is called as ``reward(videos, prompts, fps=...)`` with ``videos`` a list of uint8
tensors (T, H, W, 3) and returns ``{component: float32 tensor (N,)}``. Exceptions propagate:
a reward that fails stops the run, it never turns into a constant score.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Reward(Protocol):
    name: str
    components: tuple[str, ...]

    def __call__(self, videos: list[torch.Tensor], prompts: list[str], *, fps: int) -> dict[str, torch.Tensor]: ...


def frames_float(video: torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 in [0, 1]."""
    if video.dtype != torch.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"a video must be uint8 (T, H, W, 3), got {video.dtype} {tuple(video.shape)}")
    return video.float() / 255.0
