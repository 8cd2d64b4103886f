"""Shots: the per-image draws (pose, framing, occluder, photometric jitter, hard outliers).

- viewpoint: front, back or side (facing left or right), by the camera's preferred viewpoints;
- pose: arm swing, stride, lean;
- framing: scale and position jitter, sometimes head or feet cut off;
- occlusion: a pole, a box/bench from below, or another pedestrian in front;
- per-image illumination and color cast jitter, blur;
- hard outliers: heavy occlusion, extreme crop, strong blur or a misaligned detection.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import numpy as np

from .cameras import CameraStyle
from .sampling import random_sign, weighted_choice, weighted_index

__all__ = ["OUTLIER_KINDS", "VIEWS", "Pose", "Shot", "draw_shot", "random_pose"]

VIEWS = ("front", "back", "side")
OUTLIER_KINDS = ("occlusion", "crop", "blur", "misaligned")
OCCLUSION_PROB = 0.3  # share of ordinary images with a light occluder
CUT_PROB = 0.12  # share of ordinary images with the head or the feet cut off


@dataclasses.dataclass(frozen=True)
class Pose:
    view: str  # front | back | side
    facing: int  # side view: -1 facing left, +1 facing right
    swing: float  # arm swing (radians)
    stride: float  # foot spread (person heights)
    lean: float  # head offset (person heights)


@dataclasses.dataclass(frozen=True)
class Shot:
    """Per-image draws: pose, framing, occlusion and photometric jitter."""

    pose: Pose
    scale: float  # person height (before stature) / image height
    top: float  # head top / image height (negative: head cut off)
    cx: float  # body center / image width
    occluder: str  # none | pole | box | person | side
    occ_amount: float  # share of the image the occluder covers
    illum: float
    cast: Tuple[float, float, float]
    blur: float  # sigma in pixels at height 64
    outlier: str  # "" or one of OUTLIER_KINDS


def random_pose(rng: np.random.Generator, view_probs: Sequence[float]) -> Pose:
    view = VIEWS[weighted_index(rng, view_probs)]
    side = view == "side"
    return Pose(
        view=view,
        facing=random_sign(rng),
        swing=float(rng.normal(0.0, 0.3 if side else 0.1)),
        stride=float(rng.uniform(0.03, 0.11) if side else rng.uniform(0.0, 0.035)),
        lean=float(rng.normal(0.0, 0.01)),
    )


def draw_shot(rng: np.random.Generator, style: CameraStyle, outlier: str = "") -> Shot:
    """Random nuisances of one image taken by a camera of ``style``."""
    pose = random_pose(rng, style.view_probs)
    scale = style.zoom * float(rng.uniform(0.93, 1.07))
    top = (1.0 - scale) * float(rng.uniform(0.2, 0.8)) + float(rng.normal(0.0, 0.02))
    cx = 0.5 + float(rng.normal(0.0, 0.06))
    if rng.random() < CUT_PROB:  # head or feet cut off
        scale *= float(rng.uniform(1.08, 1.22))
        top = float(rng.uniform(-0.08, 0.0)) if rng.random() < 0.4 else top
    occluder, amount = "none", 0.0
    if rng.random() < OCCLUSION_PROB:
        occluder = weighted_choice(rng, ("pole", "box", "person"), (0.4, 0.35, 0.25))
        amount = float(rng.uniform(0.1, 0.3))
    blur = style.blur + float(rng.uniform(0.0, 0.5))
    if outlier == "occlusion":
        occluder = weighted_choice(rng, ("box", "person", "side"), (0.35, 0.3, 0.35))
        amount = float(rng.uniform(0.5, 0.7))
    elif outlier == "crop":
        scale = float(rng.uniform(1.7, 2.5))
        top = float(rng.uniform(-0.06, 0.04)) if rng.random() < 0.5 else \
            1.0 + float(rng.uniform(-0.02, 0.06)) - scale
        cx = 0.5 + float(rng.normal(0.0, 0.12))
    elif outlier == "blur":
        blur = float(rng.uniform(2.2, 3.2))
    elif outlier == "misaligned":
        scale *= float(rng.uniform(0.6, 1.0))
        cx = 0.5 + random_sign(rng) * float(rng.uniform(0.45, 0.7))
        top = float(rng.uniform(-0.15, 0.35))
    return Shot(pose=pose, scale=scale, top=top, cx=cx, occluder=occluder, occ_amount=amount,
                illum=float(rng.uniform(*style.illum_range)),
                cast=tuple(float(c) for c in np.exp(rng.normal(0.0, 0.03, 3))),
                blur=blur, outlier=outlier)

