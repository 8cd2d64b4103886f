"""Camera styles: what one camera does to every image it takes.

A camera has a color cast (channel gains), brightness and gamma, a scene style (street, corridor,
park, plaza) with its own wall/floor/clutter colors, preferred viewpoints, zoom, blur and sensor
noise, all drawn from ``(seed, camera)``.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

import numpy as np

from .domains import domain_ranges
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
    illum_range: Tuple[float, float] = (0.85, 1.15)  # per-image illumination factor (domain)


def camera_style(seed: int, cam: int, domain: str = "A") -> CameraStyle:
    """The style of camera ``cam`` (1-based) under ``seed``, drawn from ``domain``'s ranges
    (:mod:`.domains`; domain A draws exactly what generator version 1 drew)."""
    d = domain_ranges(domain)
    rng = np.random.default_rng([seed, 3, cam, *d.rng_tag])
    tint = rng.normal(size=3)
    tint -= tint.mean()
    tint /= max(np.abs(tint).max(), 1e-6)
    gains = 1.0 + rng.uniform(*d.cast) * tint
    views = rng.dirichlet(np.ones(3)) * 0.7 + 0.1
    return CameraStyle(
        gains=tuple(float(g) for g in gains / gains.mean()),
        brightness=float(rng.uniform(*d.brightness)),
        gamma=float(rng.uniform(*d.gamma)),
        scene=d.scenes[int(rng.integers(len(d.scenes)))],
        wall=muted_color(rng, *d.wall),
        floor=muted_color(rng, *d.floor),
        clutter=tuple(muted_color(rng, *d.clutter) for _ in range(5)),
        horizon=float(rng.uniform(0.45, 0.7)),
        view_probs=tuple(float(v) for v in views / views.sum()),
        zoom=float(rng.uniform(*d.zoom)),
        blur=float(rng.uniform(0.0, 0.6)),
        noise=float(rng.uniform(*d.noise)),
        illum_range=d.illum,
    )

