"""The fixed split of Shapes prompts into training (~70%), validation (~10%) and held-out (~20%).

Validation and held-out prompts are combinations never seen in training, while every single
attribute value (colour, shape, direction, relation) still appears in training. Settings are chosen
on validation; results are reported on held-out. The lists ship as files (``prompts/``) and a
test checks they are what ``make_splits`` produces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wan_grpo.errors import UserError
from wan_grpo.tasks.shapes.world import Scene, all_scenes

SPLITS = ("train", "val", "heldout")
FRACTIONS = (0.7, 0.1, 0.2)
SPLIT_SEED = 2026
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"


def attributes(scene: Scene) -> set[str]:
    """Every attribute value a scene names, as 'colour:red', 'shape:circle', 'direction:left', ..."""
    out = {f"colour:{o.colour}" for o in scene.objects} | {f"shape:{o.shape}" for o in scene.objects}
    return out | {f"direction:{scene.direction}", f"relation:{scene.relation}"} - {"direction:None", "relation:None"}


def make_splits(level: int, seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """{split: prompts} from a seeded shuffle of every prompt of ``level``, reshuffled (next seed)
    until training holds every attribute value."""
    scenes = all_scenes(level)
    everything = set().union(*map(attributes, scenes))
    for attempt in range(100):
        order = np.random.default_rng(seed + attempt).permutation(len(scenes))
        n_train = round(FRACTIONS[0] * len(scenes))
        n_val = round(FRACTIONS[1] * len(scenes))
        parts = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
        train_attrs = set().union(*(attributes(scenes[i]) for i in parts[0]))
        if train_attrs == everything:
            return {name: [scenes[i].prompt() for i in sorted(idx)] for name, idx in zip(SPLITS, parts)}
    raise RuntimeError("no split keeps every attribute in training")


def prompts_file(level: int, split: str) -> Path:
    if level not in (1, 2) or split not in SPLITS:
        raise UserError(f"no Shapes prompt list for level {level!r} / split {split!r}; levels 1, 2 and splits "
                        f"{', '.join(SPLITS)}")
    return PROMPTS_DIR / f"level{level}_{split}.txt"


def load_split(level: int, split: str) -> list[str]:
    return [line for line in prompts_file(level, split).read_text(encoding="utf-8").splitlines() if line]


def balanced_train_prompts(levels=(1, 2)) -> list[tuple[str, int]]:
    """(prompt, repeats) for the training prompts of ``levels``: with both levels, each level-1 prompt
    repeats as many times more as level 2 has more prompts (15: 50 against 756), so training draws
    both levels equally."""
    lists = [load_split(int(level), "train") for level in levels]
    most = max(map(len, lists))
    return [(p, round(most / len(v))) for v in lists for p in v]


def write_splits() -> None:
    """Regenerate the shipped files (``python -m wan_grpo.tasks.shapes.splits``)."""
    PROMPTS_DIR.mkdir(exist_ok=True)
    for level in (1, 2):
        for split, prompts in make_splits(level).items():
            prompts_file(level, split).write_text("\n".join(prompts) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_splits()
