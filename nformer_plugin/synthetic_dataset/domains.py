"""Domains: the distributions the camera and shot nuisances are drawn from.

A *domain* is a world of cameras: colour casts, exposure, scene backgrounds, person scale, noise
and per-image illumination are drawn from its ranges. Domain ``"A"`` holds the ranges the
generator has always used (its images are byte-identical to those of generator version 1, and its
cache key is unchanged); domain ``"B"`` draws the same nuisances from shifted, wider
distributions, so that a model trained on one domain can be tested on the other (a small,
CPU-sized stand-in for cross-dataset re-id, e.g. Market-1501 -> MSMT17):

=================  ==========================  ===============================================
nuisance           A                           B
=================  ==========================  ===============================================
colour cast        channel gains 1 +- 8..18 %  1 +- 25..40 % (strong casts)
exposure           brightness 0.78..1.18,      brightness 0.55..0.80 (darker), gamma 1.2..1.6
                   gamma 0.78..1.3             (crushed shadows)
backgrounds        4 scenes, muted walls       park / plaza only, darker saturated walls and
                   (70..210) and floors        floors (20..120), more saturated clutter
person scale       zoom 0.84..0.96             zoom 0.62..0.78 (smaller, more background)
sensor noise       sigma 1.5..6                sigma 4..10
illumination       per image x 0.85..1.15      per image x 0.6..1.4
=================  ==========================  ===============================================

The identities (clothes, stature, accessories) are the same in both domains: what changes is how
the cameras see them.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

__all__ = ["DOMAINS", "DomainRanges", "domain_ranges"]

Range = Tuple[float, float]


@dataclasses.dataclass(frozen=True)
class DomainRanges:
    """Ranges (uniform draws unless said otherwise) of one domain's camera and shot nuisances."""

    cast: Range  # strength of the per-camera colour cast (max deviation of a channel gain)
    brightness: Range
    gamma: Range
    scenes: Tuple[str, ...]  # scene styles a camera draws from (uniformly)
    wall: Tuple[int, int, float]  # muted_color(lo, hi, saturation) of the wall
    floor: Tuple[int, int, float]  # ... of the floor
    clutter: Tuple[int, int, float]  # ... of the clutter palette
    zoom: Range  # typical person height / image height
    noise: Range  # sensor noise sigma (0..255)
    illum: Range  # per-image illumination factor
    rng_tag: Tuple[int, ...]  # appended to the camera seed: different cameras per domain


DOMAINS = {
    "A": DomainRanges(cast=(0.08, 0.18), brightness=(0.78, 1.18), gamma=(0.78, 1.3),
                      scenes=("street", "corridor", "park", "plaza"), wall=(70, 210, 0.45),
                      floor=(50, 170, 0.3), clutter=(30, 230, 0.8), zoom=(0.84, 0.96),
                      noise=(1.5, 6.0), illum=(0.85, 1.15), rng_tag=()),
    "B": DomainRanges(cast=(0.25, 0.40), brightness=(0.55, 0.80), gamma=(1.2, 1.6),
                      scenes=("park", "plaza"), wall=(20, 120, 0.8), floor=(20, 110, 0.6),
                      clutter=(20, 200, 1.0), zoom=(0.62, 0.78), noise=(4.0, 10.0),
                      illum=(0.6, 1.4), rng_tag=(1,)),
}


def domain_ranges(domain: str) -> DomainRanges:
    """The ranges of ``domain`` ("A" or "B"); an unknown name raises ``ValueError``."""
    try:
        return DOMAINS[domain]
    except KeyError:
        raise ValueError(f"synthetic dataset: unknown domain {domain!r}; "
                         f"known: {', '.join(sorted(DOMAINS))}") from None
