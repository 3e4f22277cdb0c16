"""Accuracy per attribute value of the Shapes grammar (e.g. shape: square), over scored videos.

A mean over a prompt set hides a value the model never gets right: the shipped base draws no square
on a moving-object prompt, so a third of level 1's held-out videos score 0 whatever RL does to the
rest. A level-2 video counts once under each distinct colour and shape of its two objects.
"""

from __future__ import annotations

import math

import numpy as np

from wan_grpo.errors import UserError
from wan_grpo.tasks.shapes.splits import attributes
from wan_grpo.tasks.shapes.world import parse

ATTRIBUTES = ("colour", "shape", "direction", "relation")


def _values(prompt: str) -> list[tuple[str, str]] | None:
    """(attribute, value) pairs of a prompt, each distinct value once (the splits' own reading)."""
    try:
        scene = parse(prompt)
    except UserError:  # outside the grammar (another task's prompt scored by a reward with an accuracy)
        return None
    return [tuple(item.split(":", 1)) for item in attributes(scene)]


def by_attribute(videos: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """{attribute: {value: {"accuracy": mean, "n": videos}}} over ``videos`` (eval rows with a prompt
    and an accuracy); values sorted by name, attributes no video has left out. A video without a finite
    accuracy or with a prompt outside the grammar is left out, so other tasks' evals give {}."""
    scores: dict[str, dict[str, list[float]]] = {a: {} for a in ATTRIBUTES}
    for video in videos:
        found = _values(video["prompt"])
        if found is None or video.get("accuracy") is None or not math.isfinite(video["accuracy"]):
            continue
        for attribute, value in found:
            scores[attribute].setdefault(value, []).append(video["accuracy"])
    return {a: {v: {"accuracy": float(np.mean(s)), "n": len(s)} for v, s in sorted(by.items())}
            for a, by in scores.items() if by}


def format_breakdown(table: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """One line per attribute: 'shape: circle 0.46 (56), square 0.00 (40), triangle 0.33 (24)'."""
    return [f"{a}: " + ", ".join(f"{v} {s['accuracy']:.2f} ({s['n']})" for v, s in by.items())
            for a, by in table.items()]
