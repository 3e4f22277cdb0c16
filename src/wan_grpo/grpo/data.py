"""Prompt sets and a deterministic, resumable order over them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from wan_grpo.errors import UserError

# The design sketch's defaults, used when no --prompts file is given.
DEFAULT_PROMPTS = [
    "A cat walking in snow",
    "A beautiful sunset over the ocean",
    "A person dancing in the rain",
    "A bird flying through the clouds",
    "A train moving through mountains",
]


def load_prompt_records(path: str | None, *, flag: str = "--prompts") -> tuple[list[str], list[str | None]]:
    """(prompts, images): .txt has one prompt per non-empty line; .jsonl one object per line with a
    'prompt' field and optionally an 'image' path (relative to the file's folder) for image-to-video
    models; .txt prompts and lines without it have None."""
    if path is None:
        return list(DEFAULT_PROMPTS), [None] * len(DEFAULT_PROMPTS)
    p = Path(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise UserError(f"{flag} {p} {what}; pass a .txt (one prompt per line) or .jsonl file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{flag} {p} is not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8") \
            from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    images: list[str | None] = [None] * len(lines)
    if p.suffix == ".jsonl":
        prompts, images = [], []
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                prompt, image = str(row["prompt"]).strip(), row.get("image")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                raise UserError(f"{p}:{n} is not a JSON object with a 'prompt' field; fix that line") from None
            if image is not None:
                image = str(image if Path(image).is_absolute() else p.parent / image)
                if not Path(image).is_file():
                    raise UserError(f"{p}:{n}: image {image} does not exist; fix the path (relative paths start "
                                    f"at {p.parent})")
            if prompt:
                prompts.append(prompt)
                images.append(image)
        lines = prompts
    if not lines:
        raise UserError(f"{flag} {p} holds no prompts; add one prompt per line")
    return lines, images


class PromptOrder:
    """Rollout k gets ``batch_size`` prompts of a per-epoch shuffle seeded by (seed, epoch).

    The position is a pure function of k, so resuming needs only the step counter.
    """

    def __init__(self, prompts: list[str], *, batch_size: int, seed: int):
        if batch_size < 1:
            raise UserError(f"--batch_size must be >= 1, got {batch_size}")
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.steps_per_epoch = math.ceil(len(prompts) / batch_size)

    def epoch_of(self, rollout_index: int) -> int:
        return rollout_index // self.steps_per_epoch

    def batch_indices(self, rollout_index: int) -> list[int]:
        epoch, j = divmod(rollout_index, self.steps_per_epoch)
        perm = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        picks = [(j * self.batch_size + i) % len(self.prompts) for i in range(self.batch_size)]
        return [int(perm[i]) for i in picks]
