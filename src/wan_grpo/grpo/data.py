"""Prompt sets and a deterministic, resumable order over them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from wan_grpo.errors import UserError
from wan_grpo.tasks.shapes.splits import SPLITS, balanced_train_prompts, load_split
from wan_grpo.video import check_image_file

# Used when no --prompts file is given.
DEFAULT_PROMPTS = [
    "A cat walking in snow",
    "A beautiful sunset over the ocean",
    "A person dancing in the rain",
    "A bird flying through the clouds",
    "A train moving through mountains",
]


def load_prompt_records(path: str | None, *, flag: str = "--prompts",
                        training: bool = False) -> tuple[list[str], list[str | None]]:
    """(prompts, images): .txt has one prompt per non-empty line; .jsonl one object per line with a
    'prompt' field and optionally an 'image' path (relative to the file's folder) for image-to-video
    models (.txt prompts and lines without it have None); ``shapes:[LEVEL:]SPLIT`` names a shipped
    Shapes prompt list (``training``: the levels balanced, see ``shapes_prompt_set``)."""
    if path is None:
        return list(DEFAULT_PROMPTS), [None] * len(DEFAULT_PROMPTS)
    if str(path).startswith("shapes:"):
        prompts = shapes_prompt_set(str(path), flag=flag, training=training)
        return prompts, [None] * len(prompts)
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
                check_image_file(image, f"{p}:{n}: image")
            if prompt:
                prompts.append(prompt)
                images.append(image)
        lines = prompts
    if not lines:
        raise UserError(f"{flag} {p} holds no prompts; add one prompt per line")
    return lines, images


def shapes_prompt_set(spec: str, *, flag: str = "--prompts", training: bool = False) -> list[str]:
    """``shapes:SPLIT`` (both levels) or ``shapes:LEVEL:SPLIT``: a shipped Shapes prompt list. For
    ``training``, ``shapes:train`` repeats each level-1 prompt as sft's ``--dataset shapes`` does (15 times:
    50 against level 2's 756), so a rollout draws both levels equally, not level 1 one time in 16;
    an evaluation lists each prompt once."""

    parts = spec.split(":")[1:]
    levels, split = ((1, 2), parts[0]) if len(parts) == 1 else ((parts[0],), parts[-1])
    if len(parts) > 2 or split not in SPLITS or any(str(lv) not in ("1", "2") for lv in levels):
        raise UserError(f"{flag} {spec}: write shapes:SPLIT or shapes:LEVEL:SPLIT with LEVEL 1 or 2 and SPLIT one "
                        f"of {', '.join(SPLITS)}")
    if split == "train" and training:
        return [p for p, repeats in balanced_train_prompts(levels) for _ in range(repeats)]
    return [p for lv in levels for p in load_split(int(lv), split)]


class PromptOrder:
    """Rollout k gets ``batch_size`` prompts of a per-epoch shuffle seeded by (seed, epoch).

    The position is a pure function of k, so resuming needs only the step counter.
    """

    def __init__(self, prompts: list[str], *, batch_size: int, seed: int):
        if batch_size < 1:
            raise UserError(f"--batch_size must be >= 1, got {batch_size}")
        self.prompts, self.batch_size, self.seed = prompts, batch_size, seed
        self.steps_per_epoch = math.ceil(len(prompts) / batch_size)

    def run_length(self, *, num_epochs: int | None, limit: int, default_epochs: int) -> int:
        """Batches a run takes: ``limit`` (0: none) unless ``num_epochs`` passes end it sooner; with neither
        given, ``default_epochs`` passes."""
        if num_epochs is None and limit:
            return limit
        by_epochs = (num_epochs or default_epochs) * self.steps_per_epoch
        return min(by_epochs, limit) if limit else by_epochs

    def epochs_end_first(self, *, num_epochs: int | None, total: int, max_steps: int, steps_per_batch: int = 1,
                         batch_name: str = "rollout") -> str | None:
        """A warning when --num_epochs ends a run of ``total`` batches (``steps_per_batch`` optimizer steps
        each) before the --max_steps also given, else None."""
        if num_epochs is None or not max_steps or total * steps_per_batch >= max_steps:
            return None
        per_pass = f"{self.steps_per_epoch} {batch_name}{'s' if self.steps_per_epoch > 1 else ''} per pass"
        return (f"--num_epochs {num_epochs} ({per_pass}) ends this run at step {total * steps_per_batch}, before "
                f"--max_steps {max_steps}; drop --num_epochs to run to --max_steps")

    def epoch_of(self, rollout_index: int) -> int:
        return rollout_index // self.steps_per_epoch

    def batch_indices(self, rollout_index: int) -> list[int]:
        epoch, j = divmod(rollout_index, self.steps_per_epoch)
        perm = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        picks = [(j * self.batch_size + i) % len(self.prompts) for i in range(self.batch_size)]
        return [int(perm[i]) for i in picks]
