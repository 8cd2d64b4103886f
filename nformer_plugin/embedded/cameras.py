"""Camera styles: what one camera does to every image it takes.

A camera has a color cast (channel gains), brightness and gamma, a scene style (street, corridor,
park, plaza) with its own wall/floor/clutter colors, preferred viewpoints, zoom, blur and sensor
noise, all drawn from ``(seed, camera)``.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import numpy as np

from .sampling import Color, muted_color

__all__ = ["SCENES", "CameraStyle", "camera_style"]

SCENES = ("street", "corridor", "park", "plaza")


@dataclasses.dataclass(frozen=True)
class CameraStyle:
    """What one camera does to every image it takes."""

    gains: Tuple[float, float, float]  # color cast (per-channel gains, mean 1)
    brightness: float
    gamma: float
    scene: str
    wall: Color
    floor: Color
    clutter: Tuple[Color, ...]
    horizon: float  # wall/floor boundary, share of the image height
    view_probs: Tuple[float, float, float]  # front, back, side
    zoom: float  # typical person height / image height
    blur: float  # base blur sigma (pixels at height 64)
    noise: float  # sensor noise sigma (0..255)


def camera_style(seed: int, cam: int) -> CameraStyle:
    """The style of camera ``cam`` (1-based) under ``seed``."""
    rng = np.random.default_rng([seed, 3, cam])
    tint = rng.normal(size=3)
    tint -= tint.mean()
    tint /= max(np.abs(tint).max(), 1e-6)
    gains = 1.0 + rng.uniform(0.08, 0.18) * tint
    views = rng.dirichlet(np.ones(3)) * 0.7 + 0.1
    return CameraStyle(
        gains=tuple(float(g) for g in gains / gains.mean()),
        brightness=float(rng.uniform(0.78, 1.18)),
        gamma=float(rng.uniform(0.78, 1.3)),
        scene=SCENES[int(rng.integers(len(SCENES)))],
        wall=muted_color(rng, 70, 210, 0.45),
        floor=muted_color(rng, 50, 170, 0.3),
        clutter=tuple(muted_color(rng, 30, 230, 0.8) for _ in range(5)),
        horizon=float(rng.uniform(0.45, 0.7)),
        view_probs=tuple(float(v) for v in views / views.sum()),
        zoom=float(rng.uniform(0.84, 0.96)),
        blur=float(rng.uniform(0.0, 0.6)),
        noise=float(rng.uniform(1.5, 6.0)),
    )

