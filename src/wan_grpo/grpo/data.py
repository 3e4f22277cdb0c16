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


def load_prompts(path: str | None) -> list[str]:
    """.txt: one prompt per non-empty line; .jsonl: one object per line with a 'prompt' field."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts {p} does not exist; pass a .txt (one prompt per line) or .jsonl file")
    lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if p.suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(lines, 1):
            try:
                prompts.append(str(json.loads(line)["prompt"]).strip())
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{p}:{n} is not a JSON object with a 'prompt' field; fix that line") from None
        lines = [q for q in prompts if q]
    if not lines:
        raise UserError(f"--prompts {p} holds no prompts; add one prompt per line")
    return lines


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

    def batch(self, rollout_index: int) -> list[str]:
        epoch, j = divmod(rollout_index, self.steps_per_epoch)
        perm = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        picks = [(j * self.batch_size + i) % len(self.prompts) for i in range(self.batch_size)]
        return [self.prompts[int(perm[i])] for i in picks]
