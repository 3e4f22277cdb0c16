"""SFT data: (video, caption) pairs from a folder of mp4s or the Shapes world, as uint8 frames."""

from __future__ import annotations

import numpy as np

from wan_grpo.errors import UserError
from wan_grpo.seeding import sample_seed
from wan_grpo.tasks.shapes.splits import balanced_train_prompts
from wan_grpo.tasks.shapes.world import FRAMES, SIZE, parse, render
from wan_grpo.video import read_mp4, video_caption_pairs


def load_dataset(spec: str, captions: str | None, *, width: int, height: int, frame_num: int, seed: int,
                 videos_per_prompt: int) -> tuple[list[str], np.ndarray]:
    """(captions, videos (N, frame_num, height, width, 3) uint8) of ``--dataset``."""
    if spec == "shapes" or spec.startswith("shapes:"):
        return shapes_dataset(spec, width=width, height=height, frame_num=frame_num, seed=seed,
                              videos_per_prompt=videos_per_prompt)

    prompts, videos = [], []
    for path, caption in video_caption_pairs(spec, captions):
        try:
            frames = read_mp4(path)
        except Exception as exc:  # PyAV raises many kinds for a file that is not a video
            raise UserError(f"cannot read {path} as a video ({exc.__class__.__name__}); re-encode it as mp4") \
                from None
        if frames.shape[1:3] != (height, width) or len(frames) < frame_num:
            raise UserError(f"{path} is {frames.shape[2]}*{frames.shape[1]} with {len(frames)} frames; --size "
                            f"{width}*{height} --frame_num {frame_num} needs that size and at least that many frames")
        prompts.append(caption)
        videos.append(frames[:frame_num])
    return prompts, np.stack(videos)


def shapes_dataset(spec: str, *, width: int, height: int, frame_num: int, seed: int,
                   videos_per_prompt: int) -> tuple[list[str], np.ndarray]:
    """The Shapes training prompts of level 1, 2 or both, each rendered ``videos_per_prompt`` times; with
    both levels, each level-1 prompt as many times more as level 2 has more prompts (balanced levels)."""

    level = spec.partition(":")[2]
    if level not in ("", "1", "2"):
        raise UserError(f"--dataset {spec}: use shapes, shapes:1 or shapes:2")
    if (width, height, frame_num) != (SIZE, SIZE, FRAMES):
        raise UserError(f"--dataset shapes renders {SIZE}*{SIZE} videos of {FRAMES} frames; pass --size "
                        f"{SIZE}*{SIZE} --frame_num {FRAMES} (or --task shapes)")
    levels = (level,) if level else (1, 2)
    prompts = [(p, videos_per_prompt * repeats) for p, repeats in balanced_train_prompts(levels)]
    captions, videos = [], []
    for i, (prompt, repeats) in enumerate(prompts):
        scene = parse(prompt)
        for k in range(repeats):
            captions.append(prompt)
            videos.append(render(scene, sample_seed(seed, i, k)))
    return captions, np.stack(videos)
