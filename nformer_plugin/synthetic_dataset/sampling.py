"""Colors and the weighted random draws the generator modules share.

Each function consumes a fixed number of draws from ``rng``: changing one changes every image.
"""
from __future__ import annotations

import functools
from typing import Sequence, Tuple

import numpy as np

__all__ = ["Color", "Palette", "muted_color", "pick_color", "random_sign", "shade_color",
           "weighted_choice", "weighted_index"]

Color = Tuple[int, int, int]
Palette = Tuple[Tuple[Color, float], ...]  # (RGB, weight) entries


@functools.lru_cache(maxsize=None)
def _palette_arrays(palette: Palette) -> Tuple[np.ndarray, np.ndarray]:
    colors = np.array([c for c, _ in palette], dtype=np.float64)
    weights = np.array([w for _, w in palette], dtype=np.float64)
    return colors, np.cumsum(weights / weights.sum())


def pick_color(rng: np.random.Generator, palette: Palette, jitter: float = 7.0) -> Color:
    """A palette color (by weight) with a small per-identity jitter."""
    colors, cdf = _palette_arrays(palette)
    i = min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)
    return tuple(int(c) for c in np.clip(colors[i] + rng.normal(0.0, jitter, 3), 0, 255))


def weighted_index(rng: np.random.Generator, probs: Sequence[float]) -> int:
    """An index drawn with probability proportional to ``probs`` (one draw)."""
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)


def weighted_choice(rng: np.random.Generator, options: Sequence[str],
                    probs: Sequence[float]) -> str:
    return options[weighted_index(rng, probs)]


def random_sign(rng: np.random.Generator) -> int:
    return 1 if rng.random() < 0.5 else -1


def muted_color(rng: np.random.Generator, lo: float, hi: float, sat: float) -> Color:
    """A random color with channels in ``lo..hi``, its saturation scaled by ``sat``."""
    c = rng.uniform(lo, hi, 3)
    return tuple(int(v) for v in c.mean() + sat * (c - c.mean()))


def shade_color(c: Color, f: float) -> Color:
    """``c`` scaled by ``f``, clipped to 0..255."""
    return tuple(int(min(255, max(0, v * f))) for v in c)
