"""VideoAlign's video preprocessing on in-memory frames: no temp mp4s, no torchvision.

Follows the official inference (qwen-vl-utils as VideoAlign configures it):
frames sampled at 2 fps from the source fps (count clamped to [4, min(768, total)], then rounded
half-to-even to a multiple of 2, indices evenly spaced and rounded); each frame resized with
smart_resize (factor 28, pixels within [100352, max_pixels]) by bicubic interpolation with
antialiasing on uint8 values rounded back to uint8 (skipped when the size is unchanged); then the
Qwen2-VL processor's rescale (1/255), CLIP normalisation and 14x14 patches with temporal patch 2
in the 2x2 merge order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FACTOR = 28
SAMPLE_FPS = 2.0
FRAME_FACTOR = 2
MIN_FRAMES, MAX_FRAMES = 4, 768
MIN_PIXELS = 128 * 28 * 28  # 100352
MAX_PIXELS = 256 * 28 * 28  # 200704, VideoReward's data_config.max_frame_pixels
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH, TEMPORAL_PATCH, MERGE = 14, 2, 2


def round_by_factor(x: float, f: int) -> int:
    return round(x / f) * f  # Python round: half to even, as the reference


def ceil_by_factor(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def floor_by_factor(x: float, f: int) -> int:
    return math.floor(x / f) * f


def num_sampled_frames(total: int, video_fps: float, *, fps: float = SAMPLE_FPS) -> int:
    """How many frames VideoAlign reads from a ``total``-frame video at ``video_fps``."""
    if total < FRAME_FACTOR:
        raise ValueError(f"a video needs at least {FRAME_FACTOR} frames, got {total}")
    n = total / video_fps * fps
    lo = ceil_by_factor(MIN_FRAMES, FRAME_FACTOR)
    hi = floor_by_factor(min(MAX_FRAMES, total), FRAME_FACTOR)
    n = min(max(n, lo), hi)  # clamp first, then round
    return round_by_factor(n, FRAME_FACTOR)


def sample_indices(total: int, video_fps: float, *, fps: float = SAMPLE_FPS) -> torch.Tensor:
    n = num_sampled_frames(total, video_fps, fps=fps)
    return torch.linspace(0, total - 1, n).round().long()


def smart_resize(height: int, width: int, *, factor: int = FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(height, width), multiples of ``factor``, aspect kept, pixels within [min_pixels, max_pixels]."""
    h = max(factor, round_by_factor(height, factor))
    w = max(factor, round_by_factor(width, factor))
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = floor_by_factor(height / beta, factor), floor_by_factor(width / beta, factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = ceil_by_factor(height * beta, factor), ceil_by_factor(width * beta, factor)
    return h, w


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> uint8 (T, 3, h, w): bicubic + antialias, rounded back to integers."""
    x = frames.permute(0, 3, 1, 2)
    if tuple(x.shape[-2:]) == tuple(size):
        return x.contiguous()
    y = F.interpolate(x.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def patchify(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (T, 3, h, w) -> (pixel_values (t*gh*gw, 3*2*14*14) float32, grid_thw (3,) long)."""
    x = frames.float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = (x - mean) / std
    if x.shape[0] % TEMPORAL_PATCH:  # the processor repeats the last frame
        x = torch.cat([x, x[-1:].expand(TEMPORAL_PATCH - x.shape[0] % TEMPORAL_PATCH, -1, -1, -1)])
    t, c, h, w = x.shape
    gt, gh, gw = t // TEMPORAL_PATCH, h // PATCH, w // PATCH
    x = x.reshape(gt, TEMPORAL_PATCH, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * TEMPORAL_PATCH * PATCH * PATCH), torch.tensor([gt, gh, gw])


def preprocess_video(frames: torch.Tensor, video_fps: float, *, max_pixels: int = MAX_PIXELS,
                     sample_fps: float = SAMPLE_FPS):
    """uint8 (T, H, W, 3) at ``video_fps`` -> (pixel_values, grid_thw) as the official pipeline."""
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    chosen = frames[sample_indices(frames.shape[0], video_fps, fps=sample_fps)]
    size = smart_resize(frames.shape[1], frames.shape[2], max_pixels=max_pixels)
    return patchify(resize_frames(chosen, size))
