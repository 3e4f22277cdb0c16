"""The ``shapes`` reward: check a decoded video against its Shapes prompt, GenEval-style.

Every pixel is labelled with its nearest palette colour (background included), or none when it is
farther than ``MAX_DISTANCE`` from all of them. Per frame and per colour the object is the largest
4-connected region of that colour with at least ``MIN_AREA`` pixels. Components, each in [0, 1]:

- ``colour``: fraction of frames whose set of present colours is exactly the prompt's;
- ``shape``: fraction of frames where each prompt object is present with the prompt's shape,
  classified by how much of its bounding box it fills (square ~1, circle ~0.79, triangle ~0.5);
- ``fill``: graded shape: per frame and prompt object, 1 when its bounding-box fill lies in the
  prompt shape's band, falling linearly to 0 at ``FILL_SLACK`` outside it (0 when the object is
  missing); the mean over frames and objects. It rises as a blob gets squarer while ``shape`` is
  still 0, so groups of square prompts that all fail ``shape`` still rank their videos;
- ``fill_peak``: graded shape without a flat top: per frame and prompt object, 1 at the fill the
  renderer draws that shape with (``RENDERED_FILL``), falling linearly to 0 at ``FILL_SLACK`` from it;
  the mean over frames and objects. Unlike ``fill`` it tells a circle at the band's edge from one at
  its centre: it penalises a circle drifting toward the edge of its band (in one level-1 run that did
  not stop the drift; docs/benchmarks.md);
- ``motion`` (level 1): 1 when the object's centroid moved at least ``MIN_MOTION`` px from its
  first to its last present frame, mostly along the prompt's direction; else 0;
- ``relation`` (level 2): fraction of frames where both objects are present and the first is
  above / below / left of / right of the second: at least ``MIN_SEPARATION`` px apart along that
  axis, and farther apart along it than across it;
- ``partial``: partial credit, the mean of the prompt's three attribute checks (colour, shape, and
  motion or relation), GenEval-style; unlike ``accuracy`` it moves when an attribute improves while
  another still fails, so a group that ``accuracy`` scores all 0 still ranks its videos;
- ``accuracy``: 1 when every attribute holds: colour, shape (and relation) together in at least
  half the frames, and motion for level 1. The trained component by default (``--shapes_coefs``).
- ``clean`` (logged, weight 0: a quality proxy the trained reward does not see, for spotting
  over-optimisation): the fraction of pixels away from the prompt's objects (outside their
  bounding boxes grown by ``CLEAN_MARGIN`` px) that are background grey. 1 on the renderer's videos.

A component that does not apply to the prompt's level (motion for level 2, relation for level 1)
is NaN: it is logged as a mean over the prompts it applies to and never enters the advantages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from wan_grpo.errors import UserError
from wan_grpo.tasks.shapes.world import BACKGROUND, COLOURS, Scene, parse

PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)  # index 0: background
COLOUR_INDEX = {name: i + 1 for i, name in enumerate(COLOURS)}
MAX_DISTANCE = 90.0  # RGB distance to the nearest palette colour; farther pixels belong to none
MIN_AREA = 30  # pixels: a 12 px triangle has 72
MIN_MOTION = 8.0  # px; the renderer moves objects 16-28 px
MIN_SEPARATION = 4.0  # px along the relation's axis; the renderer places centres 24-35 px apart
# bounding-box fill above which a blob is a square / a circle: renders fill 1.0 / 0.78-0.81 / 0.5-0.55,
# the shipped VAE's level-1 round trips 0.83-0.97 / 0.75-0.85 / 0.58-0.71 (10th-90th percentiles over
# frames; benchmarks/shapes_vae_squares.py): its squares sit just above the square band's 0.88
SQUARE_FILL, CIRCLE_FILL = 0.88, 0.68
# a triangle's band stops at 0.4 (renders fill 0.5-0.58) so a trained sliver or line earns no full credit
FILL_BAND = {"square": (SQUARE_FILL, 1.0), "circle": (CIRCLE_FILL, SQUARE_FILL), "triangle": (0.4, CIRCLE_FILL)}
RENDERED_FILL = {"square": 1.0, "circle": 0.79, "triangle": 0.52}  # medians over frames of 60 renders each
FILL_SLACK = 0.5  # the base's squares fill 0.3-0.8 of their boxes: a narrower ramp would leave them all at 0
CLEAN_MARGIN = 2  # px around an object's bounding box where blurred edges are not counted against ``clean``
COMPONENTS = ("colour", "shape", "fill", "fill_peak", "motion", "relation", "partial", "accuracy", "clean")
# defined for every prompt of both levels
TRAINABLE = ("accuracy", "partial", "colour", "shape", "fill", "fill_peak", "clean")


@dataclass(frozen=True)
class Blob:
    area: int
    top: int
    left: int
    bottom: int  # inclusive
    right: int
    cy: float
    cx: float

    @property
    def fill(self) -> float:
        return self.area / ((self.bottom - self.top + 1) * (self.right - self.left + 1))

    @property
    def shape(self) -> str:
        return "square" if self.fill >= SQUARE_FILL else "circle" if self.fill >= CIRCLE_FILL else "triangle"


def _graded_fill(blob: Blob | None, low: float, high: float) -> float:
    """1 when the blob's fill lies in [low, high], linearly down to 0 at ``FILL_SLACK`` outside; 0 without a blob."""
    if blob is None:
        return 0.0
    return max(0.0, 1.0 - max(low - blob.fill, blob.fill - high, 0.0) / FILL_SLACK)


def fill_score(blob: Blob | None, shape: str) -> float:
    """1 inside ``shape``'s fill band, linearly down to 0 at ``FILL_SLACK`` outside it; 0 without a blob."""
    return _graded_fill(blob, *FILL_BAND[shape])


def fill_peak_score(blob: Blob | None, shape: str) -> float:
    """1 at ``shape``'s rendered fill, linearly down to 0 at ``FILL_SLACK`` from it; 0 without a blob."""
    return _graded_fill(blob, RENDERED_FILL[shape], RENDERED_FILL[shape])


def label_pixels(video: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, H, W) int8: palette index of each pixel (the first of equally near ones),
    -1 when none is within MAX_DISTANCE. Squared distances in integers: exact, so the same as float distances."""
    r, g, b = video.astype(np.int32).transpose(3, 0, 1, 2)
    nearest = np.full(video.shape[:3], np.iinfo(np.int32).max, dtype=np.int32)
    labels = np.zeros(video.shape[:3], dtype=np.int8)
    for i, (pr, pg, pb) in enumerate(PALETTE.astype(np.int32)):
        d2 = (r - pr) ** 2 + (g - pg) ** 2 + (b - pb) ** 2
        closer = d2 < nearest
        nearest[closer] = d2[closer]
        labels[closer] = i
    labels[nearest > MAX_DISTANCE**2] = -1
    return labels


def largest_blob(mask: np.ndarray) -> Blob | None:
    """The largest 4-connected region of a (H, W) bool mask, if it has at least MIN_AREA pixels; of equal
    ones, the first in raster order."""
    if mask.sum() < MIN_AREA:
        return None
    regions, _ = ndimage.label(mask)  # 4-connected; numbered in raster order of each region's first pixel
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0  # not a region: the mask's False pixels
    best = int(sizes.argmax())  # the first of equal sizes
    if sizes[best] < MIN_AREA:
        return None
    ys, xs = np.nonzero(regions == best)
    return Blob(area=int(sizes[best]), top=int(ys.min()), left=int(xs.min()), bottom=int(ys.max()),
                right=int(xs.max()), cy=float(ys.mean()), cx=float(xs.mean()))


def _relation_holds(rel: str, a: Blob, b: Blob) -> bool:
    vertical = rel in ("above", "below")
    along = (b.cy - a.cy) if vertical else (b.cx - a.cx)  # > 0: A has the smaller coordinate
    across = (b.cx - a.cx) if vertical else (b.cy - a.cy)
    if rel in ("below", "right of"):
        along = -along
    return along >= MIN_SEPARATION and along > abs(across)


def _motion_holds(direction: str, track: list[Blob]) -> bool:
    if len(track) < 2:
        return False
    dy, dx = track[-1].cy - track[0].cy, track[-1].cx - track[0].cx
    along = {"left": -dx, "right": dx, "up": -dy, "down": dy}[direction]
    across = dy if direction in ("left", "right") else dx
    return along >= MIN_MOTION and along > abs(across)


def score_video(video: np.ndarray, scene: Scene) -> dict[str, float]:
    """Every component of one (F, H, W, 3) uint8 video for one parsed prompt."""
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"score_video takes (F, H, W, 3) uint8 frames, got {video.dtype} {video.shape}")
    labels = label_pixels(video)
    wanted = {COLOUR_INDEX[o.colour] for o in scene.objects}
    colour, shape, fill, peak, relation, together, clean = [], [], [], [], [], [], []
    track = []
    for frame in labels:
        counts = np.bincount(frame[frame > 0], minlength=len(PALETTE))
        present = {int(c) for c in np.flatnonzero(counts >= MIN_AREA)}
        blobs = [largest_blob(frame == COLOUR_INDEX[o.colour]) for o in scene.objects]
        colour_ok = present == wanted and all(b is not None for b in blobs)
        shape_ok = all(b is not None and b.shape == o.shape for b, o in zip(blobs, scene.objects))
        rel_ok = scene.level == 1 or (None not in blobs and _relation_holds(scene.relation, *blobs))
        colour.append(colour_ok)
        shape.append(shape_ok)
        fill.append(np.mean([fill_score(b, o.shape) for b, o in zip(blobs, scene.objects)]))
        peak.append(np.mean([fill_peak_score(b, o.shape) for b, o in zip(blobs, scene.objects)]))
        relation.append(rel_ok)
        together.append(colour_ok and shape_ok and rel_ok)
        clean.append(_clean_fraction(frame, blobs))
        if blobs[0] is not None:
            track.append(blobs[0])
    motion = float(_motion_holds(scene.direction, track)) if scene.level == 1 else float("nan")
    accurate = float(np.mean(together)) >= 0.5 and (scene.level == 2 or motion == 1.0)
    colour_mean, shape_mean = float(np.mean(colour)), float(np.mean(shape))
    relation_mean = float(np.mean(relation)) if scene.level == 2 else float("nan")
    action = motion if scene.level == 1 else relation_mean
    return {"colour": colour_mean, "shape": shape_mean, "fill": float(np.mean(fill)),
            "fill_peak": float(np.mean(peak)), "motion": motion,
            "relation": relation_mean, "partial": (colour_mean + shape_mean + action) / 3,
            "accuracy": float(accurate), "clean": float(np.mean(clean))}


def _clean_fraction(labels: np.ndarray, blobs: list[Blob | None]) -> float:
    """Of a frame's pixels outside the found objects' grown bounding boxes, the fraction labelled background."""
    away = np.ones(labels.shape, dtype=bool)
    h, w = labels.shape
    for b in blobs:
        if b is not None:
            away[max(0, b.top - CLEAN_MARGIN):min(h, b.bottom + CLEAN_MARGIN + 1),
                 max(0, b.left - CLEAN_MARGIN):min(w, b.right + CLEAN_MARGIN + 1)] = False
    return float((labels[away] == 0).mean()) if away.any() else 1.0


DEFAULT_COEFS = "accuracy=1"


def parse_coefs(spec: str) -> dict[str, float]:
    """``--shapes_coefs`` 'accuracy=1,partial=0.5' -> every component's coefficient (the unnamed ones 0)."""
    coefs = dict.fromkeys(COMPONENTS, 0.0)
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, value = item.partition("=")
        name = name.strip()
        if name in ("motion", "relation"):
            raise UserError(f"--shapes_coefs {name}: it applies to one level only; weight partial (colour, shape "
                            "and motion or relation) instead")
        if name not in TRAINABLE:
            raise UserError(f"--shapes_coefs {item!r}: write NAME=WEIGHT,... with NAME in {', '.join(TRAINABLE)}")
        try:
            coefs[name] = float(value)
        except ValueError:
            raise UserError(f"--shapes_coefs {item!r}: the weight is not a number; write e.g. {name}=1") from None
        if not np.isfinite(coefs[name]):
            raise UserError(f"--shapes_coefs {item!r}: give a finite weight")
    if not any(coefs.values()):
        raise UserError(f"--shapes_coefs {spec!r} weights nothing; e.g. accuracy=1")
    return coefs


class ShapesReward:
    """``--reward shapes``: the verifier as a reward; prompts outside the grammar are an error."""

    name = "shapes"
    components = COMPONENTS

    def __init__(self, coefs: str = DEFAULT_COEFS):
        self.coefs = parse_coefs(coefs)

    def __call__(self, videos: list[torch.Tensor], prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        scenes = [parse(p) for p in prompts]
        rows = [score_video(np.asarray(v.cpu() if isinstance(v, torch.Tensor) else v), s)
                for v, s in zip(videos, scenes)]
        return {c: torch.tensor([r[c] for r in rows], dtype=torch.float32) for c in COMPONENTS}
