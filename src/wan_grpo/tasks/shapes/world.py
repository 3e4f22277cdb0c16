"""The Shapes world: its grammar and a deterministic renderer of 64*64, 9-frame videos.

Level 1: "a {colour} {shape} moving {direction}": one object crossing at least 16 px.
Level 2: "a {colour} {shape} {relation} a {colour} {shape}": two still objects of different
colours; the relation holds in every frame along its axis (the other axis differs by <= 6 px).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from wan_grpo.errors import UserError

SIZE, FRAMES = 64, 9
BACKGROUND = (30, 30, 30)
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
RELATIONS = ("above", "below", "left of", "right of")
MIN_EXTENT, MAX_EXTENT = 12, 20  # object size in pixels, across
MIN_TRAVEL = 16  # pixels from first to last frame (level 1)

_C, _S = "|".join(COLOURS), "|".join(SHAPES)
_LEVEL1 = re.compile(rf"a ({_C}) ({_S}) moving ({'|'.join(DIRECTIONS)})")
_LEVEL2 = re.compile(rf"a ({_C}) ({_S}) ({'|'.join(RELATIONS)}) a ({_C}) ({_S})")
GRAMMAR = ("'a COLOUR SHAPE moving DIRECTION' or 'a COLOUR SHAPE RELATION a COLOUR SHAPE' (COLOUR: "
           f"{', '.join(COLOURS)}; SHAPE: {', '.join(SHAPES)}; DIRECTION: {', '.join(DIRECTIONS)}; RELATION: "
           f"{', '.join(RELATIONS)}; two objects need different colours)")


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str


@dataclass(frozen=True)
class Scene:
    """A parsed prompt: level 1 has one object and a direction, level 2 two objects and a relation."""

    objects: tuple[Obj, ...]
    direction: str | None = None
    relation: str | None = None

    @property
    def level(self) -> int:
        return 1 if self.direction is not None else 2

    def prompt(self) -> str:
        a = self.objects[0]
        if self.level == 1:
            return f"a {a.colour} {a.shape} moving {self.direction}"
        b = self.objects[1]
        return f"a {a.colour} {a.shape} {self.relation} a {b.colour} {b.shape}"


def parse(prompt: str) -> Scene:
    """The scene a Shapes prompt describes; a prompt outside the grammar is a one-line UserError."""
    text = " ".join(str(prompt).strip().lower().split())
    if m := _LEVEL1.fullmatch(text):
        return Scene((Obj(m[1], m[2]),), direction=m[3])
    if (m := _LEVEL2.fullmatch(text)) and m[1] != m[4]:
        return Scene((Obj(m[1], m[2]), Obj(m[4], m[5])), relation=m[3])
    raise UserError(f"{prompt!r} is not a Shapes prompt; the grammar is {GRAMMAR}")


def all_scenes(level: int) -> list[Scene]:
    """Every prompt of a level, in a fixed order (72 for level 1, 1080 for level 2)."""
    objs = [Obj(c, s) for c in COLOURS for s in SHAPES]
    if level == 1:
        return [Scene((o,), direction=d) for o in objs for d in DIRECTIONS]
    return [Scene((a, b), relation=r) for a in objs for r in RELATIONS for b in objs if a.colour != b.colour]


def shape_mask(shape: str, extent: int) -> np.ndarray:
    """(extent, extent) bool: a filled circle, square or upright triangle (apex up) spanning ``extent``."""
    c = (extent - 1) / 2
    y, x = np.mgrid[0:extent, 0:extent].astype(np.float64)
    if shape == "square":
        return np.ones((extent, extent), dtype=bool)
    if shape == "circle":
        return (x - c) ** 2 + (y - c) ** 2 <= (extent / 2) ** 2
    if shape == "triangle":
        half_width = (y + 0.5) / extent * (extent / 2)  # widens from the apex row down to the base
        return np.abs(x - c) <= half_width
    raise ValueError(f"unknown shape {shape!r}")


def _paint(frame: np.ndarray, obj: Obj, extent: int, top: int, left: int) -> None:
    mask = shape_mask(obj.shape, extent)
    frame[top:top + extent, left:left + extent][mask] = COLOURS[obj.colour]


def render(scene: Scene, seed: int) -> np.ndarray:
    """(FRAMES, SIZE, SIZE, 3) uint8; sizes and positions are drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    video = np.empty((FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    video[:] = BACKGROUND
    if scene.level == 1:
        obj, extent = scene.objects[0], int(rng.integers(MIN_EXTENT, MAX_EXTENT + 1))
        room = SIZE - extent
        travel = int(rng.integers(MIN_TRAVEL, min(28, room) + 1))
        start = int(rng.integers(0, room - travel + 1))
        across = int(rng.integers(0, room + 1))
        sign = 1 if scene.direction in ("right", "down") else -1
        for f in range(FRAMES):
            along = start + round(travel * f / (FRAMES - 1))
            along = along if sign > 0 else room - along
            top, left = (along, across) if scene.direction in ("up", "down") else (across, along)
            _paint(video[f], obj, extent, top, left)
        return video
    a, b = scene.objects
    ea, eb = (int(rng.integers(MIN_EXTENT, MAX_EXTENT + 1)) for _ in range(2))
    # centres along the relation's axis at least 24 px apart; across it within 6 px
    vertical = scene.relation in ("above", "below")
    first_is_lower = scene.relation in ("above", "left of")  # A has the smaller coordinate
    gap = int(rng.integers(24, 36))
    lo = max(ea, eb) / 2
    c_first = float(rng.uniform(lo, SIZE - lo - gap))
    ca_along, cb_along = (c_first, c_first + gap) if first_is_lower else (c_first + gap, c_first)
    c_across = float(rng.uniform(lo + 3, SIZE - lo - 3))
    ca_across, cb_across = c_across + rng.uniform(-3, 3), c_across + rng.uniform(-3, 3)
    for obj, extent, along, across in ((a, ea, ca_along, ca_across), (b, eb, cb_along, cb_across)):
        cy, cx = (along, across) if vertical else (across, along)
        top = min(max(0, round(cy - extent / 2)), SIZE - extent)
        left = min(max(0, round(cx - extent / 2)), SIZE - extent)
        for f in range(FRAMES):
            _paint(video[f], obj, extent, top, left)
    return video
