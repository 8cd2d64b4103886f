"""Identities: the attributes that stay the same across one person's images.

An identity is a fixed set of attributes (stature and proportions, head size, skin and hair, upper
clothing color and pattern, sleeves, lower clothing color and cut, shoes, hat, bag) drawn from its
own RNG. Identities share small palettes and about a third are near-twins of an earlier identity
of the same split (one or two attribute groups re-drawn), so they are confusable.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np

from .sampling import Color, pick_color, random_sign, weighted_choice

__all__ = ["Identity", "make_identities", "near_twin", "random_identity"]

TWIN_PROB = 0.3  # share of identities that are a near-copy of an earlier identity

# Shared palettes (RGB, weight): few entries, common ones heavy, so identities collide often.
UPPER_PALETTE = (
    ((30, 30, 32), 3.0), ((225, 225, 220), 2.0), ((120, 120, 125), 2.0), ((35, 45, 90), 2.0),
    ((50, 90, 170), 1.5), ((140, 175, 215), 1.0), ((175, 35, 40), 1.2), ((110, 30, 40), 0.8),
    ((50, 120, 60), 0.8), ((100, 105, 55), 0.6), ((200, 180, 140), 1.0), ((110, 75, 45), 0.8),
    ((220, 190, 50), 0.6), ((220, 140, 170), 0.7), ((100, 60, 130), 0.6), ((220, 120, 40), 0.5),
)
LOWER_PALETTE = (
    ((28, 28, 30), 4.0), ((70, 70, 75), 2.0), ((60, 80, 120), 3.0), ((110, 135, 170), 1.0),
    ((170, 150, 110), 1.5), ((35, 45, 90), 1.0), ((100, 70, 45), 0.7), ((215, 215, 210), 0.5),
    ((125, 125, 130), 1.0), ((150, 40, 45), 0.3),
)
SHOE_PALETTE = (((25, 25, 25), 3.0), ((220, 220, 220), 1.5), ((110, 110, 110), 1.0),
                ((90, 60, 40), 1.0))
SKIN_PALETTE = (((236, 200, 170), 2.0), ((214, 170, 130), 2.0), ((180, 130, 95), 1.0),
                ((140, 95, 65), 1.0), ((95, 65, 45), 0.7))
HAIR_PALETTE = (((20, 18, 16), 4.0), ((60, 40, 25), 2.0), ((110, 75, 40), 1.0),
                ((175, 145, 95), 0.7), ((200, 200, 195), 0.5), ((120, 35, 20), 0.4))


@dataclasses.dataclass(frozen=True)
class Identity:
    """What stays the same across one person's images. Lengths are in person heights."""

    stature: float  # height relative to the typical person (0.84..1.0)
    shoulder: float  # shoulder half-width
    hip: float  # hip half-width
    head: float  # head radius
    torso: float  # shoulder-to-hip length
    skin: Color
    hair: Color
    long_hair: bool
    hat: Optional[Color]
    upper: Color
    upper2: Color  # pattern color
    pattern: str  # plain | hstripes | vstripes | logo | jacket | twotone
    short_sleeves: bool
    lower: Color
    lower_type: str  # trousers | shorts | skirt
    shoes: Color
    bag: str  # none | backpack | shoulder | hand
    bag_color: Color
    bag_side: int  # the person's -1 left / +1 right


# Attribute groups a near-twin re-draws.
_TWIN_GROUPS = {
    "upper": ("upper",),
    "pattern": ("pattern", "upper2", "short_sleeves"),
    "lower": ("lower", "lower_type"),
    "bag": ("bag", "bag_color", "bag_side"),
    "hair": ("hair", "long_hair", "hat"),
    "body": ("stature", "shoulder", "hip", "head", "torso"),
    "shoes": ("shoes",),
}


def random_identity(rng: np.random.Generator) -> Identity:
    """A fresh identity drawn from the shared palettes."""
    shoulder = float(np.clip(rng.normal(0.125, 0.014), 0.095, 0.16))
    upper = pick_color(rng, UPPER_PALETTE)
    upper2 = pick_color(rng, UPPER_PALETTE)
    while sum(abs(a - b) for a, b in zip(upper, upper2)) < 90:
        upper2 = pick_color(rng, UPPER_PALETTE)
    bag = weighted_choice(rng, ("none", "backpack", "shoulder", "hand"), (0.45, 0.25, 0.18, 0.12))
    return Identity(
        stature=float(np.clip(rng.normal(0.93, 0.04), 0.84, 1.0)),
        shoulder=shoulder,
        hip=shoulder * float(rng.uniform(0.72, 0.9)),
        head=float(rng.uniform(0.058, 0.075)),
        torso=float(rng.uniform(0.29, 0.34)),
        skin=pick_color(rng, SKIN_PALETTE, 5.0),
        hair=pick_color(rng, HAIR_PALETTE, 5.0),
        long_hair=bool(rng.random() < 0.3),
        hat=pick_color(rng, UPPER_PALETTE) if rng.random() < 0.1 else None,
        upper=upper,
        upper2=upper2,
        pattern=weighted_choice(rng, ("plain", "hstripes", "vstripes", "logo", "jacket", "twotone"),
                        (0.4, 0.15, 0.08, 0.15, 0.14, 0.08)),
        short_sleeves=bool(rng.random() < 0.3),
        lower=pick_color(rng, LOWER_PALETTE),
        lower_type=weighted_choice(rng, ("trousers", "shorts", "skirt"), (0.72, 0.14, 0.14)),
        shoes=pick_color(rng, SHOE_PALETTE, 5.0),
        bag=bag,
        bag_color=pick_color(rng, UPPER_PALETTE),
        bag_side=random_sign(rng),
    )


def near_twin(parent: Identity, rng: np.random.Generator) -> Identity:
    """``parent`` with one or two attribute groups re-drawn: a confusable identity."""
    fresh = random_identity(rng)
    groups = rng.choice(sorted(_TWIN_GROUPS), size=int(rng.integers(1, 3)), replace=False)
    changes = {f: getattr(fresh, f) for g in groups for f in _TWIN_GROUPS[str(g)]}
    return dataclasses.replace(parent, **changes)


def make_identities(seed: int, splits: Sequence[Sequence[int]]) -> Dict[int, Identity]:
    """Identities of every pid; twins only copy an earlier identity of the same split."""
    out: Dict[int, Identity] = {}
    for pids in splits:
        earlier: List[Identity] = []
        for pid in pids:
            rng = np.random.default_rng([seed, 1, pid])
            if earlier and rng.random() < TWIN_PROB:
                ident = near_twin(earlier[int(rng.integers(len(earlier)))], rng)
            else:
                ident = random_identity(rng)
            out[pid] = ident
            earlier.append(ident)
    return out

