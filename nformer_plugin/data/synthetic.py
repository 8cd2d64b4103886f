"""Procedural pedestrian-like re-id images in Market-1501 layout: the embedded default dataset.

No real re-id dataset can ship with the package, so this module draws one. An identity is a fixed
set of attributes (stature and proportions, head size, skin and hair, upper clothing colour and
pattern, sleeves, lower clothing colour and cut, shoes, hat, bag) drawn from its own RNG. Identities
share small palettes and about a third are near-twins of an earlier identity of the same split (one
or two attribute groups re-drawn), so they are confusable.

Each image adds the nuisances re-id has to see through:

- camera: a per-camera colour cast (channel gains), brightness and gamma, scene style (street,
  corridor, park, plaza), preferred viewpoints, zoom, blur and sensor noise;
- viewpoint: front (face, logo, jacket opening, backpack straps), back (hair, backpack, no logo),
  side (narrow silhouette, stride, backpack beside the body); left/right mirrored bag side;
- pose: arm swing, stride, lean;
- framing: scale and position jitter, sometimes head or feet cut off;
- clutter: textured background with shapes, small pedestrians in the distance;
- occlusion: a pole, a box/bench from below, or another pedestrian in front;
- per-image illumination and cast jitter, blur and noise;
- hard outliers (``outlier_ratio`` of each identity's images): heavy occlusion, extreme crop,
  strong blur or a misaligned detection.

Layout: ``<out_dir>/Market-1501-v15.09.15/{bounding_box_train,bounding_box_test,query}/`` with
``{pid:04d}_c{cam}s1_{frame:06d}_01.jpg`` names. Train pids are ``1..num_train_ids``, test pids
follow; gallery distractors have pid 0 (Market's convention). Each test identity has
``queries_per_id`` queries from distinct cameras, and gallery images in another camera than each
query's.

Pure numpy + PIL (no FastReID import). Deterministic: the same seed and parameters give
byte-identical JPEG files (fixed quality and chroma subsampling, no metadata).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import socket
import uuid
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

__all__ = [
    "DEFAULT_PARAMS",
    "MARKET_FOLDER",
    "ImageSpec",
    "dataset_cache_dir",
    "generate_market_layout",
    "normalize_params",
    "plan_dataset",
]

GENERATOR_VERSION = 1  # bump when the drawing changes: it is part of the cache key and the marker
MARKET_FOLDER = "Market-1501-v15.09.15"
TRAIN_DIR, GALLERY_DIR, QUERY_DIR = "bounding_box_train", "bounding_box_test", "query"
MARKER = ".complete"
JPEG_QUALITY = 95
TWIN_PROB = 0.3  # share of identities that are a near-copy of an earlier identity
OCCLUSION_PROB = 0.3  # share of ordinary images with a light occluder
CUT_PROB = 0.12  # share of ordinary images with the head or the feet cut off
VIEWS = ("front", "back", "side")
OUTLIER_KINDS = ("occlusion", "crop", "blur", "misaligned")

DEFAULT_PARAMS: Dict[str, Any] = {
    "seed": 0,
    "num_train_ids": 48,
    "num_test_ids": 48,
    "num_cameras": 4,
    "images_per_id": 16,
    "queries_per_id": 2,
    "height": 64,
    "outlier_ratio": 0.08,
}

Color = Tuple[int, int, int]

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
POLE_PALETTE = ((130, 130, 135), (80, 80, 85), (170, 160, 120), (60, 90, 60), (200, 200, 205))
SCENES = ("street", "corridor", "park", "plaza")


# ------------------------------------------------------------------------------- parameters


def normalize_params(params: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Defaults filled in, types fixed and values checked; unknown keys raise ValueError."""
    params = dict(params or {})
    unknown = set(params) - set(DEFAULT_PARAMS)
    if unknown:
        raise ValueError(f"unknown embedded dataset parameters: {sorted(unknown)}")
    out = {**DEFAULT_PARAMS, **params}
    out = {k: (float(v) if k == "outlier_ratio" else int(v)) for k, v in out.items()}
    _check_params(out)
    return out


def _check_params(p: Mapping[str, Any]) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"embedded dataset: {msg} (got {dict(p)})")

    need(2 <= p["num_cameras"] <= 9, "num_cameras must be in 2..9 (one digit in file names)")
    need(p["num_train_ids"] >= 1 and p["num_test_ids"] >= 1, "need >= 1 train and test identity")
    need(p["num_train_ids"] + p["num_test_ids"] <= 9999, "at most 9999 identities (4-digit pids)")
    need(1 <= p["queries_per_id"] <= p["num_cameras"], "queries_per_id must be in 1..num_cameras")
    need(p["images_per_id"] >= 2 * _min_cameras(p), "images_per_id must be >= 2 * max(2, "
                                                     "queries_per_id)")
    need(p["images_per_id"] <= 999, "images_per_id must be <= 999")
    need(p["height"] >= 16, "height must be >= 16")
    need(0.0 <= p["outlier_ratio"] <= 0.5, "outlier_ratio must be in [0, 0.5]")


def _min_cameras(p: Mapping[str, Any]) -> int:
    return max(2, int(p["queries_per_id"]))


def _params_key(params: Mapping[str, Any]) -> Dict[str, Any]:
    """What the cache key and the ``.complete`` marker hold: parameters plus generator version."""
    return {**normalize_params(params), "generator_version": GENERATOR_VERSION}


def dataset_cache_dir(params: Optional[Mapping[str, Any]] = None) -> str:
    """``$NFORMER_CACHE`` (default ``~/.cache/nformer_plugin``) / ``embedded-<hash of params>``."""
    root = os.environ.get("NFORMER_CACHE") or os.path.join("~", ".cache", "nformer_plugin")
    blob = json.dumps(_params_key(params), sort_keys=True).encode()
    return os.path.join(os.path.expanduser(root), "embedded-" + hashlib.sha1(blob).hexdigest()[:12])


# ------------------------------------------------------------------------------- identities


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
    upper2: Color  # pattern colour
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


@functools.lru_cache(maxsize=None)
def _palette_arrays(palette: Tuple[Tuple[Color, float], ...]) -> Tuple[np.ndarray, np.ndarray]:
    colors = np.array([c for c, _ in palette], dtype=np.float64)
    weights = np.array([w for _, w in palette], dtype=np.float64)
    return colors, np.cumsum(weights / weights.sum())


def _pick(rng: np.random.Generator, palette: Tuple[Tuple[Color, float], ...],
          jitter: float = 7.0) -> Color:
    """A palette colour (by weight) with a small per-identity jitter."""
    colors, cdf = _palette_arrays(palette)
    i = min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)
    return tuple(int(c) for c in np.clip(colors[i] + rng.normal(0.0, jitter, 3), 0, 255))


def _weighted_index(rng: np.random.Generator, probs: Sequence[float]) -> int:
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), len(cdf) - 1)


def _choice(rng: np.random.Generator, options: Sequence[str], probs: Sequence[float]) -> str:
    return options[_weighted_index(rng, probs)]


def _sign(rng: np.random.Generator) -> int:
    return 1 if rng.random() < 0.5 else -1


def random_identity(rng: np.random.Generator) -> Identity:
    """A fresh identity drawn from the shared palettes."""
    shoulder = float(np.clip(rng.normal(0.125, 0.014), 0.095, 0.16))
    upper = _pick(rng, UPPER_PALETTE)
    upper2 = _pick(rng, UPPER_PALETTE)
    while sum(abs(a - b) for a, b in zip(upper, upper2)) < 90:
        upper2 = _pick(rng, UPPER_PALETTE)
    bag = _choice(rng, ("none", "backpack", "shoulder", "hand"), (0.45, 0.25, 0.18, 0.12))
    return Identity(
        stature=float(np.clip(rng.normal(0.93, 0.04), 0.84, 1.0)),
        shoulder=shoulder,
        hip=shoulder * float(rng.uniform(0.72, 0.9)),
        head=float(rng.uniform(0.058, 0.075)),
        torso=float(rng.uniform(0.29, 0.34)),
        skin=_pick(rng, SKIN_PALETTE, 5.0),
        hair=_pick(rng, HAIR_PALETTE, 5.0),
        long_hair=bool(rng.random() < 0.3),
        hat=_pick(rng, UPPER_PALETTE) if rng.random() < 0.1 else None,
        upper=upper,
        upper2=upper2,
        pattern=_choice(rng, ("plain", "hstripes", "vstripes", "logo", "jacket", "twotone"),
                        (0.4, 0.15, 0.08, 0.15, 0.14, 0.08)),
        short_sleeves=bool(rng.random() < 0.3),
        lower=_pick(rng, LOWER_PALETTE),
        lower_type=_choice(rng, ("trousers", "shorts", "skirt"), (0.72, 0.14, 0.14)),
        shoes=_pick(rng, SHOE_PALETTE, 5.0),
        bag=bag,
        bag_color=_pick(rng, UPPER_PALETTE),
        bag_side=_sign(rng),
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


# ------------------------------------------------------------------------------- cameras


@dataclasses.dataclass(frozen=True)
class CameraStyle:
    """What one camera does to every image it takes."""

    gains: Tuple[float, float, float]  # colour cast (per-channel gains, mean 1)
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


def _muted(rng: np.random.Generator, lo: float, hi: float, sat: float) -> Color:
    c = rng.uniform(lo, hi, 3)
    return tuple(int(v) for v in c.mean() + sat * (c - c.mean()))


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
        wall=_muted(rng, 70, 210, 0.45),
        floor=_muted(rng, 50, 170, 0.3),
        clutter=tuple(_muted(rng, 30, 230, 0.8) for _ in range(5)),
        horizon=float(rng.uniform(0.45, 0.7)),
        view_probs=tuple(float(v) for v in views / views.sum()),
        zoom=float(rng.uniform(0.84, 0.96)),
        blur=float(rng.uniform(0.0, 0.6)),
        noise=float(rng.uniform(1.5, 6.0)),
    )


# ------------------------------------------------------------------------------- shots


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
    cx: float  # body centre / image width
    occluder: str  # none | pole | box | person | side
    occ_amount: float  # share of the image the occluder covers
    illum: float
    cast: Tuple[float, float, float]
    blur: float  # sigma in pixels at height 64
    outlier: str  # "" or one of OUTLIER_KINDS


def random_pose(rng: np.random.Generator, view_probs: Sequence[float]) -> Pose:
    view = VIEWS[_weighted_index(rng, view_probs)]
    side = view == "side"
    return Pose(
        view=view,
        facing=_sign(rng),
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
        occluder = _choice(rng, ("pole", "box", "person"), (0.4, 0.35, 0.25))
        amount = float(rng.uniform(0.1, 0.3))
    blur = style.blur + float(rng.uniform(0.0, 0.5))
    if outlier == "occlusion":
        occluder = _choice(rng, ("box", "person", "side"), (0.35, 0.3, 0.35))
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
        cx = 0.5 + _sign(rng) * float(rng.uniform(0.45, 0.7))
        top = float(rng.uniform(-0.15, 0.35))
    return Shot(pose=pose, scale=scale, top=top, cx=cx, occluder=occluder, occ_amount=amount,
                illum=float(rng.uniform(0.85, 1.15)),
                cast=tuple(float(c) for c in np.exp(rng.normal(0.0, 0.03, 3))),
                blur=blur, outlier=outlier)


# ------------------------------------------------------------------------------- drawing


@dataclasses.dataclass(frozen=True)
class _Frame:
    """Maps person coordinates (u across, v down; person heights; v=0 head top) to pixels."""

    cx: float
    top: float
    unit: float

    def xy(self, u: float, v: float) -> Tuple[float, float]:
        return (self.cx + u * self.unit, self.top + v * self.unit)

    def box(self, u0: float, v0: float, u1: float, v1: float) -> List[float]:
        (x0, y0), (x1, y1) = self.xy(u0, v0), self.xy(u1, v1)
        return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


@dataclasses.dataclass(frozen=True)
class _Trapezoid:
    """A torso-like trapezoid: centre ``u``, rows ``v0..v1``, half-widths ``h0`` (top), ``h1``."""

    u: float
    v0: float
    v1: float
    h0: float
    h1: float

    def point(self, s: float, t: float) -> Tuple[float, float]:
        """(u, v) at depth share ``s`` (0 top, 1 bottom) and across share ``t`` (0 left)."""
        half = self.h0 + s * (self.h1 - self.h0)
        return (self.u + (2.0 * t - 1.0) * half, self.v0 + s * (self.v1 - self.v0))

    def quad(self, fr: _Frame, s0: float, s1: float, t0: float, t1: float) -> List[Tuple]:
        corners = ((s0, t0), (s0, t1), (s1, t1), (s1, t0))
        return [fr.xy(*self.point(s, t)) for s, t in corners]


def _shade(c: Color, f: float) -> Color:
    return tuple(int(min(255, max(0, v * f))) for v in c)


def _limb(fr: _Frame, p0: Tuple[float, float], p1: Tuple[float, float], w0: float, w1: float,
          t0: float = 0.0, t1: float = 1.0) -> List[Tuple[float, float]]:
    """Polygon of the part ``t0..t1`` of a tapered limb from ``p0`` to ``p1`` (widths w0, w1)."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    n = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / n, dx / n
    pts = []
    for t, side in ((t0, 1), (t1, 1), (t1, -1), (t0, -1)):
        w = 0.5 * (w0 + t * (w1 - w0)) * side
        pts.append(fr.xy(p0[0] + t * dx + w * nx, p0[1] + t * dy + w * ny))
    return pts


@dataclasses.dataclass(frozen=True)
class _Body:
    """Landmarks of one drawn person (person coordinates)."""

    ident: Identity
    pose: Pose
    torso: _Trapezoid
    hips: Tuple[Tuple[float, float], Tuple[float, float]]
    feet: Tuple[Tuple[float, float], Tuple[float, float]]
    shoulders: Tuple[Tuple[float, float], Tuple[float, float]]
    hands: Tuple[Tuple[float, float], Tuple[float, float]]
    head_c: Tuple[float, float]

    @property
    def mirror(self) -> int:
        """Screen side (-1 left, +1 right) of the person's right: mirrored when seen from front."""
        return {"front": -1, "back": 1, "side": 1}[self.pose.view]


def _body(ident: Identity, pose: Pose) -> _Body:
    r = ident.head
    vs = 2.0 * r + 0.025
    vh = vs + ident.torso
    side = pose.view == "side"
    wf = 0.62 if side else 1.0
    sw, hw = ident.shoulder * wf, ident.hip * wf
    foot_v = 0.975
    arm = 0.37
    if side:
        d = pose.facing
        hips = ((0.0, vh), (0.0, vh))
        feet = ((-d * pose.stride, foot_v), (d * pose.stride, foot_v))  # far, near
        shoulders = ((0.0, vs + 0.015), (0.0, vs + 0.015))
        angles = (-d * pose.swing, d * pose.swing)
        hands = tuple((s[0] + arm * math.sin(a), s[1] + arm * math.cos(a))
                      for s, a in zip(shoulders, angles))
    else:
        hips = ((-hw * 0.5, vh), (hw * 0.5, vh))
        feet = ((-hw * 0.45 - pose.stride, foot_v), (hw * 0.45 + pose.stride, foot_v))
        shoulders = ((-sw * 0.92, vs + 0.015), (sw * 0.92, vs + 0.015))
        out = (0.1 + pose.swing, 0.1 - pose.swing)
        hands = tuple((su + k * arm * math.sin(a), sv + arm * math.cos(a))
                      for (su, sv), k, a in zip(shoulders, (-1, 1), out))
    return _Body(ident=ident, pose=pose, torso=_Trapezoid(0.0, vs, vh + 0.02, sw, hw),
                 hips=hips, feet=feet, shoulders=shoulders, hands=hands,
                 head_c=(pose.lean, r))


def _draw_leg(draw: ImageDraw.ImageDraw, fr: _Frame, b: _Body, i: int, shade: float) -> None:
    ident = b.ident
    hip, foot = b.hips[i], b.feet[i]
    w0 = 0.075 if b.pose.view == "side" else ident.hip * 0.95
    skin, lower = _shade(ident.skin, shade), _shade(ident.lower, shade)
    if ident.lower_type == "trousers":
        draw.polygon(_limb(fr, hip, foot, w0, 0.045), fill=lower)
    else:
        draw.polygon(_limb(fr, hip, foot, w0 * 0.8, 0.04), fill=skin)
        if ident.lower_type == "shorts":
            draw.polygon(_limb(fr, hip, foot, w0, 0.05, 0.0, 0.4), fill=lower)
    d = b.pose.facing if b.pose.view == "side" else 0
    draw.ellipse(fr.box(foot[0] - 0.032 + 0.012 * d, foot[1] - 0.02,
                        foot[0] + 0.032 + 0.012 * d, foot[1] + 0.018),
                 fill=_shade(ident.shoes, shade))


def _draw_hips(draw: ImageDraw.ImageDraw, fr: _Frame, b: _Body) -> None:
    t, ident = b.torso, b.ident
    if ident.lower_type == "skirt":
        skirt = _Trapezoid(t.u, t.v1 - 0.03, t.v1 + 0.2, t.h1 * 1.05, t.h1 * 1.5)
        draw.polygon(skirt.quad(fr, 0, 1, 0, 1), fill=ident.lower)
    else:
        crotch = _Trapezoid(t.u, t.v1 - 0.03, t.v1 + 0.06, t.h1, t.h1 * 0.9)
        draw.polygon(crotch.quad(fr, 0, 1, 0, 1), fill=ident.lower)


def _draw_arm(draw: ImageDraw.ImageDraw, fr: _Frame, b: _Body, i: int, shade: float) -> None:
    ident = b.ident
    sh, hand = b.shoulders[i], b.hands[i]
    sleeve = 0.35 if ident.short_sleeves else 1.0
    draw.polygon(_limb(fr, sh, hand, 0.05, 0.036), fill=_shade(ident.skin, shade))
    draw.polygon(_limb(fr, sh, hand, 0.052, 0.04, 0.0, sleeve), fill=_shade(ident.upper, shade))
    draw.ellipse(fr.box(hand[0] - 0.02, hand[1] - 0.02, hand[0] + 0.02, hand[1] + 0.022),
                 fill=_shade(ident.skin, shade))


def _draw_torso(draw: ImageDraw.ImageDraw, fr: _Frame, b: _Body) -> None:
    t, ident, view = b.torso, b.ident, b.pose.view
    draw.polygon(t.quad(fr, 0, 1, 0, 1), fill=ident.upper)
    c2 = ident.upper2
    if ident.pattern == "hstripes":
        n = 5
        for k in range(1, n, 2):
            draw.polygon(t.quad(fr, k / n, (k + 1) / n, 0, 1), fill=c2)
    elif ident.pattern == "vstripes":
        n = 3 if view == "side" else 5
        for k in range(1, n, 2):
            draw.polygon(t.quad(fr, 0, 1, k / n, (k + 1) / n), fill=c2)
    elif ident.pattern == "twotone":
        draw.polygon(t.quad(fr, 0.5, 1, 0, 1), fill=c2)
    elif ident.pattern == "logo" and view == "front":
        draw.polygon(t.quad(fr, 0.14, 0.42, 0.33, 0.67), fill=c2)
    elif ident.pattern == "jacket" and view == "front":
        draw.polygon(t.quad(fr, 0.0, 1.0, 0.4, 0.6), fill=c2)
    elif ident.pattern == "jacket" and view == "side":
        draw.polygon(t.quad(fr, 0.0, 1.0, 0.45 + 0.4 * b.pose.facing, 0.55 + 0.4 * b.pose.facing),
                     fill=c2)
    vs = t.v0
    draw.rectangle(fr.box(b.head_c[0] - 0.022, b.head_c[1] + 0.5 * b.ident.head,
                          b.head_c[0] + 0.022, vs + 0.008), fill=ident.skin)


def _draw_long_hair(draw: ImageDraw.ImageDraw, fr: _Frame, b: _Body) -> None:
    r, (hu, hv) = b.ident.head, b.head_c
    if b.pose.view == "side":
        u0 = hu - b.pose.facing * r * 0.95
        draw.rectangle(fr.box(u0, hv, hu, b.torso.v0 + 0.06), fill=b.ident.hair)
    else:
        width = 1.05 if b.pose.view == "front" else 0.9
        draw.rectangle(fr.box(hu - width * r, hv, hu + width * r, b.torso.v0 + 0.08),
                       fill=b.ident.hair)


def _draw_head(draw: ImageDraw.ImageDraw, fr: _Frame, b: _Body) -> None:
    ident, view, (hu, hv) = b.ident, b.pose.view, b.head_c
    r = ident.head
    draw.ellipse(fr.box(hu - 0.88 * r, hv - r, hu + 0.88 * r, hv + r), fill=ident.hair)
    if view == "front":
        draw.ellipse(fr.box(hu - 0.72 * r, hv - 0.45 * r, hu + 0.72 * r, hv + r), fill=ident.skin)
    elif view == "side":
        fu = hu + b.pose.facing * 0.3 * r
        draw.ellipse(fr.box(fu - 0.62 * r, hv - 0.5 * r, fu + 0.62 * r, hv + r), fill=ident.skin)
    if ident.hat is not None:
        draw.pieslice(fr.box(hu - 0.95 * r, hv - 1.12 * r, hu + 0.95 * r, hv + 0.3 * r), 180, 360,
                      fill=ident.hat)
        if view == "side":
            u1 = hu + b.pose.facing * 1.45 * r
            draw.rectangle(fr.box(min(hu, u1), hv - 0.5 * r, max(hu, u1), hv - 0.3 * r),
                           fill=ident.hat)


def _draw_backpack(draw: ImageDraw.ImageDraw, fr: _Frame, b: _Body, layer: str) -> None:
    t, ident, view = b.torso, b.ident, b.pose.view
    color, dark = ident.bag_color, _shade(ident.bag_color, 0.7)
    if view == "back" and layer == "over":
        draw.rounded_rectangle(fr.box(-t.h0 * 0.72, t.v0 + 0.015, t.h0 * 0.72, t.v0 + 0.23),
                               radius=0.02 * fr.unit, fill=color)
        draw.rectangle(fr.box(-t.h0 * 0.5, t.v0 + 0.14, t.h0 * 0.5, t.v0 + 0.22), fill=dark)
    elif view == "front" and layer == "over":
        for s in (-1, 1):
            draw.line([fr.xy(s * t.h0 * 0.55, t.v0), fr.xy(s * t.h0 * 0.62, t.v0 + 0.2)],
                      fill=color, width=max(1, int(0.022 * fr.unit)))
    elif view == "side" and layer == "under":
        back = -b.pose.facing
        u0 = back * t.h0 * 0.9
        draw.rounded_rectangle(fr.box(u0, t.v0 + 0.01, u0 + back * 0.09, t.v0 + 0.22),
                               radius=0.02 * fr.unit, fill=color)


def _draw_side_bag(draw: ImageDraw.ImageDraw, fr: _Frame, b: _Body, layer: str) -> None:
    """Shoulder bag (strap across, bag at the hip) or hand bag; ``layer`` under/over the body."""
    t, ident, view = b.torso, b.ident, b.pose.view
    if view == "side":
        near = ident.bag_side == b.pose.facing
        if (layer == "over") != near:
            return
        side_u = 0.0 if near else -b.pose.facing * 0.04
        hand = b.hands[1 if near else 0]
    else:
        if layer != "over":
            return
        s = ident.bag_side * b.mirror
        side_u = s * (t.h1 + 0.03)
        hand = b.hands[0 if s < 0 else 1]
    if ident.bag == "shoulder":
        if view != "side":
            draw.line([fr.xy(-side_u * 0.7, t.v0), fr.xy(side_u, t.v1 - 0.04)],
                      fill=_shade(ident.bag_color, 0.8), width=max(1, int(0.016 * fr.unit)))
        draw.rectangle(fr.box(side_u - 0.05, t.v1 - 0.05, side_u + 0.05, t.v1 + 0.06),
                       fill=ident.bag_color)
    elif ident.bag == "hand":
        draw.rectangle(fr.box(hand[0] - 0.035, hand[1], hand[0] + 0.035, hand[1] + 0.08),
                       fill=ident.bag_color)


def _draw_bags(draw: ImageDraw.ImageDraw, fr: _Frame, b: _Body, layer: str) -> None:
    if b.ident.bag == "backpack":
        _draw_backpack(draw, fr, b, layer)
    elif b.ident.bag in ("shoulder", "hand"):
        _draw_side_bag(draw, fr, b, layer)


def draw_person(draw: ImageDraw.ImageDraw, ident: Identity, pose: Pose, fr: _Frame) -> None:
    """Draw one pedestrian; ``fr`` says where its head top is and how tall it is."""
    b = _body(ident, pose)
    side = pose.view == "side"
    _draw_bags(draw, fr, b, "under")
    if ident.long_hair and pose.view != "back":
        _draw_long_hair(draw, fr, b)
    if side:
        _draw_arm(draw, fr, b, 0, 0.8)
    for i in range(2):
        _draw_leg(draw, fr, b, i, 0.85 if side and i == 0 else 1.0)
    _draw_hips(draw, fr, b)
    _draw_torso(draw, fr, b)
    if ident.long_hair and pose.view == "back":
        _draw_long_hair(draw, fr, b)
    _draw_bags(draw, fr, b, "over")
    for i in (1,) if side else (0, 1):
        _draw_arm(draw, fr, b, i, 1.0)
    _draw_head(draw, fr, b)


# ------------------------------------------------------------------------------- scene


def _texture(rng: np.random.Generator, w: int, h: int, strength: float) -> np.ndarray:
    """Low-frequency noise (h, w, 3), zero mean: mostly brightness, a little colour."""
    small = rng.normal(0, strength, (8, 4, 1)) + rng.normal(0, strength * 0.25, (8, 4, 3))
    small = np.clip(128 + small, 0, 255).astype(np.uint8)
    big = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    return np.asarray(big, dtype=np.float32) - 128.0


def _background_base(style: CameraStyle, rng: np.random.Generator, w: int, h: int,
                     ss: int) -> Image.Image:
    """Wall above the horizon, floor below, shading and texture; computed at the output
    resolution (``w // ss`` x ``h // ss``: it is smooth anyway) and upscaled to the canvas."""
    w0, h0 = w // ss, h // ss
    horizon = int(h0 * np.clip(style.horizon + rng.normal(0, 0.04), 0.3, 0.85))
    arr = np.empty((h0, w0, 3), np.float32)
    arr[:horizon] = np.asarray(style.wall, np.float32)
    arr[horizon:] = np.asarray(style.floor, np.float32)
    arr *= np.linspace(1.1, 0.9, h0, dtype=np.float32)[:, None, None]
    arr += _texture(rng, w0, h0, 14.0)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.resize((w, h), Image.NEAREST) if ss > 1 else img


def _draw_scene_shapes(draw: ImageDraw.ImageDraw, style: CameraStyle, rng: np.random.Generator,
                       w: int, h: int) -> None:
    horizon = style.horizon * h
    pal = style.clutter

    def color() -> Color:
        return _shade(pal[int(rng.integers(len(pal)))], float(rng.uniform(0.7, 1.2)))

    if style.scene == "street":  # buildings with windows, lane marks
        x = -rng.uniform(0, w * 0.5)
        while x < w:
            bw, top = rng.uniform(0.3, 0.8) * w, rng.uniform(0.0, 0.35) * horizon
            draw.rectangle([x, top, x + bw, horizon], fill=color())
            win = color()
            for wy in np.arange(top + 0.05 * h, horizon - 0.08 * h, 0.12 * h):
                for wx in np.arange(x + 0.06 * w, x + bw - 0.1 * w, 0.22 * w):
                    draw.rectangle([wx, wy, wx + 0.1 * w, wy + 0.06 * h], fill=win)
            x += bw
        for k in range(3):
            y = horizon + (k + rng.uniform(0.3, 0.7)) * (h - horizon) / 3
            draw.line([(0, y), (w, y + rng.normal(0, 0.05) * h)], fill=(200, 200, 190),
                      width=max(1, h // 60))
    elif style.scene == "corridor":  # wall panels, doors, floor tiles
        for x in np.arange(rng.uniform(0, 0.3) * w, w, rng.uniform(0.25, 0.5) * w):
            draw.line([(x, 0), (x, horizon)], fill=_shade(style.wall, 0.7), width=max(1, h // 80))
        if rng.random() < 0.7:
            dx = rng.uniform(-0.2, 0.8) * w
            draw.rectangle([dx, 0.25 * horizon, dx + 0.35 * w, horizon], fill=color())
        for y in np.arange(horizon, h, (h - horizon) / 4):
            draw.line([(0, y), (w, y)], fill=_shade(style.floor, 0.75), width=max(1, h // 100))
    elif style.scene == "park":  # foliage blobs above, path below
        for _ in range(int(rng.integers(6, 12))):
            cx, cy, rr = rng.uniform(0, w), rng.uniform(0, horizon), rng.uniform(0.1, 0.3) * w
            draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr],
                         fill=_shade((60, 120, 55), float(rng.uniform(0.6, 1.3))))
        px = rng.uniform(0.2, 0.8) * w
        draw.polygon([(px - 0.1 * w, horizon), (px + 0.1 * w, horizon), (px + 0.6 * w, h),
                      (px - 0.6 * w, h)], fill=_shade(style.floor, 1.25))
    else:  # plaza: pillars and a tiled floor
        for _ in range(int(rng.integers(1, 4))):
            x = rng.uniform(-0.1, 1.0) * w
            draw.rectangle([x, 0, x + rng.uniform(0.08, 0.2) * w, horizon], fill=color())
        step = rng.uniform(0.2, 0.35) * w
        for x in np.arange(rng.uniform(0, step), w, step):
            draw.line([(x, horizon), (x + (x - w / 2) * 0.6, h)], fill=_shade(style.floor, 0.7),
                      width=max(1, h // 100))
    for _ in range(int(rng.integers(2, 6))):  # clutter anywhere
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        sw, sh = rng.uniform(0.05, 0.3) * w, rng.uniform(0.03, 0.2) * h
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + sw, y + sh], fill=color())


def _draw_bystanders(draw: ImageDraw.ImageDraw, style: CameraStyle, rng: np.random.Generator,
                     w: int, h: int) -> None:
    """Small pedestrians in the distance."""
    for _ in range(_weighted_index(rng, (0.6, 0.3, 0.1))):
        unit = h * rng.uniform(0.25, 0.45)
        fr = _Frame(cx=rng.uniform(0, w), top=style.horizon * h - unit * rng.uniform(0.6, 0.9),
                    unit=unit)
        draw_person(draw, random_identity(rng), random_pose(rng, style.view_probs), fr)


def render_background(style: CameraStyle, rng: np.random.Generator, w: int, h: int,
                      ss: int = 1) -> Image.Image:
    """A cluttered scene in the camera's style (no main person), ``w`` x ``h`` canvas pixels."""
    img = _background_base(style, rng, w, h, ss)
    draw = ImageDraw.Draw(img)
    _draw_scene_shapes(draw, style, rng, w, h)
    _draw_bystanders(draw, style, rng, w, h)
    return img


def _draw_occluder(draw: ImageDraw.ImageDraw, shot: Shot, style: CameraStyle,
                   rng: np.random.Generator, fr: _Frame, w: int, h: int) -> None:
    kind, amount = shot.occluder, shot.occ_amount
    if kind == "pole":
        pw = w * amount * 0.6
        x = fr.cx + rng.uniform(-0.6, 0.6) * w * 0.4 - pw / 2
        col = POLE_PALETTE[int(rng.integers(len(POLE_PALETTE)))]
        draw.rectangle([x, 0, x + pw, h], fill=col)
        draw.rectangle([x + pw * 0.2, 0, x + pw * 0.35, h], fill=_shade(col, 1.25))
    elif kind == "box":
        y = h * (1.0 - amount)
        if rng.random() < 0.5:
            x0, x1 = 0.0, w * rng.uniform(0.6, 1.0)
        else:
            x0, x1 = w * rng.uniform(0.0, 0.4), float(w)
        col = style.clutter[int(rng.integers(len(style.clutter)))]
        draw.rectangle([x0, y, x1, h], fill=col)
        draw.rectangle([x0, y + 0.15 * (h - y), x1, y + 0.3 * (h - y)], fill=_shade(col, 0.7))
    elif kind == "side":
        s = rng.random() < 0.5
        x = w * amount if s else w * (1 - amount)
        col = style.clutter[int(rng.integers(len(style.clutter)))]
        draw.rectangle([0, 0, x, h] if s else [x, 0, w, h], fill=col)
    elif kind == "person":
        s = _sign(rng)
        cx = w * (0.5 + s * (0.75 - amount))
        other = _Frame(cx=cx, top=fr.top + rng.normal(0, 0.05) * h,
                       unit=fr.unit * rng.uniform(0.95, 1.15))
        draw_person(draw, random_identity(rng), random_pose(rng, style.view_probs), other)


# ------------------------------------------------------------------------------- photometry


def _supersample(height: int) -> int:
    return max(1, min(4, 256 // height))


def apply_camera(img: Image.Image, style: CameraStyle, shot: Shot, rng: np.random.Generator,
                 height: int) -> Image.Image:
    """Optics blur, then the camera's gamma, brightness and colour cast, then sensor noise."""
    sigma = shot.blur * height / 64.0
    if sigma > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(sigma))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = x ** style.gamma
    gain = np.asarray(style.gains, np.float32) * np.asarray(shot.cast, np.float32)
    x = x * (style.brightness * shot.illum) * gain * 255.0
    x = x + rng.normal(0.0, style.noise, x.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), "RGB")


def render_image(ident: Optional[Identity], shot: Shot, style: CameraStyle,
                 rng: np.random.Generator, height: int) -> Image.Image:
    """One RGB image (height x height // 2); ``ident`` None draws background only."""
    ss = _supersample(height)
    w, h = (height // 2) * ss, height * ss
    img = render_background(style, rng, w, h, ss)
    draw = ImageDraw.Draw(img)
    stature = ident.stature if ident is not None else 0.93
    fr = _Frame(cx=shot.cx * w, top=shot.top * h, unit=shot.scale * stature * h)
    if ident is not None:
        draw_person(draw, ident, shot.pose, fr)
    _draw_occluder(draw, shot, style, rng, fr, w, h)
    return apply_camera(img.reduce(ss) if ss > 1 else img, style, shot, rng, height)


# ------------------------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """One file of the dataset."""

    pid: int  # 0: distractor
    cam: int  # 1-based
    index: int  # image number within the identity (distractors: running number)
    frame: int
    subset: str  # bounding_box_train | bounding_box_test | query
    outlier: str  # "" or one of OUTLIER_KINDS ("junk"/"person" for distractors)

    @property
    def file_name(self) -> str:
        return f"{self.pid:04d}_c{self.cam}s1_{self.frame:06d}_01.jpg"

    @property
    def rel_path(self) -> str:
        return os.path.join(self.subset, self.file_name)


def _camera_assignment(rng: np.random.Generator, p: Mapping[str, Any]) -> np.ndarray:
    """Camera (1-based) of each image: >= 2 cameras, >= 2 images in each camera used."""
    n, num_cams = p["images_per_id"], p["num_cameras"]
    lo, hi = _min_cameras(p), min(num_cams, n // 2)
    k = int(rng.integers(lo, hi + 1))
    cams = np.sort(rng.choice(num_cams, size=k, replace=False)) + 1
    counts = 2 + rng.multinomial(n - 2 * k, rng.dirichlet(np.full(k, 2.0)))
    return rng.permutation(np.repeat(cams, counts))


def _outlier_kinds(rng: np.random.Generator, n: int, ratio: float,
                   exclude: Sequence[int] = ()) -> List[str]:
    """Kind of hard outlier of each image ("" for none): ``ratio`` of ``n`` in expectation,
    never at the ``exclude`` indices (queries stay clean, as in Market-1501)."""
    expected = ratio * n
    count = int(math.floor(expected)) + int(rng.random() < expected - math.floor(expected))
    allowed = np.setdiff1d(np.arange(n), np.asarray(exclude, dtype=np.int64))
    kinds = [""] * n
    for i in rng.choice(allowed, size=min(count, len(allowed)), replace=False):
        kinds[int(i)] = OUTLIER_KINDS[int(rng.integers(len(OUTLIER_KINDS)))]
    return kinds


def _query_indices(rng: np.random.Generator, cams: np.ndarray, num_queries: int) -> List[int]:
    """One image from each of ``num_queries`` distinct cameras."""
    chosen = rng.choice(np.unique(cams), size=num_queries, replace=False)
    return [int(rng.choice(np.flatnonzero(cams == cam))) for cam in chosen]


def _identity_specs(pid: int, p: Mapping[str, Any], test: bool) -> List[ImageSpec]:
    rng = np.random.default_rng([p["seed"], 5, pid])
    cams = _camera_assignment(rng, p)
    queries = _query_indices(rng, cams, p["queries_per_id"]) if test else []
    outliers = _outlier_kinds(rng, len(cams), p["outlier_ratio"], exclude=queries)
    frames = np.arange(len(cams)) * 125 + rng.integers(0, 125, len(cams))
    specs = []
    for i, cam in enumerate(cams):
        subset = QUERY_DIR if i in queries else (GALLERY_DIR if test else TRAIN_DIR)
        specs.append(ImageSpec(pid, int(cam), i, int(frames[i]), subset, outliers[i]))
    return specs


def num_distractors(num_test_ids: int) -> int:
    """Gallery images with pid 0 (other people and junk detections)."""
    return num_test_ids // 2


def _distractor_specs(p: Mapping[str, Any]) -> List[ImageSpec]:
    rng = np.random.default_rng([p["seed"], 6])
    specs = []
    for j in range(num_distractors(p["num_test_ids"])):
        cam = int(rng.integers(1, p["num_cameras"] + 1))
        kind = "person" if rng.random() < 0.5 else "junk"
        specs.append(ImageSpec(0, cam, j, j * 125 + int(rng.integers(0, 125)), GALLERY_DIR, kind))
    return specs


def split_pids(p: Mapping[str, Any]) -> Tuple[List[int], List[int]]:
    """Train pids ``1..num_train_ids`` and test pids after them."""
    n_tr, n_te = p["num_train_ids"], p["num_test_ids"]
    return list(range(1, n_tr + 1)), list(range(n_tr + 1, n_tr + n_te + 1))


def plan_dataset(params: Optional[Mapping[str, Any]] = None) -> List[ImageSpec]:
    """Every file the generator writes for ``params``, in writing order."""
    p = normalize_params(params)
    train, test = split_pids(p)
    specs = [s for pid in train for s in _identity_specs(pid, p, test=False)]
    specs += [s for pid in test for s in _identity_specs(pid, p, test=True)]
    return specs + _distractor_specs(p)


# ------------------------------------------------------------------------------- writing


class _Renderer:
    """Renders the images of a plan: identities and camera styles built once."""

    def __init__(self, p: Mapping[str, Any]):
        self.p = p
        self.identities = make_identities(p["seed"], split_pids(p))
        self.styles = {c: camera_style(p["seed"], c) for c in range(1, p["num_cameras"] + 1)}

    def __call__(self, spec: ImageSpec) -> Image.Image:
        style = self.styles[spec.cam]
        if spec.pid == 0:
            return self._distractor(spec, style)
        rng = np.random.default_rng([self.p["seed"], 2, spec.pid, spec.index])
        shot = draw_shot(rng, style, spec.outlier)
        return render_image(self.identities[spec.pid], shot, style, rng, self.p["height"])

    def _distractor(self, spec: ImageSpec, style: CameraStyle) -> Image.Image:
        rng = np.random.default_rng([self.p["seed"], 4, spec.index])
        ident: Optional[Identity] = random_identity(rng)
        outlier = ""
        if spec.outlier == "junk":
            outlier = OUTLIER_KINDS[int(rng.integers(len(OUTLIER_KINDS)))]
            ident = None if rng.random() < 0.3 else ident
        shot = draw_shot(rng, style, outlier)
        return render_image(ident, shot, style, rng, self.p["height"])


def save_jpeg(img: Image.Image, path: str) -> None:
    """Deterministic JPEG: fixed quality, 4:4:4 chroma, no metadata."""
    img.save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)


def _write_dataset(folder: str, p: Mapping[str, Any]) -> None:
    for sub in (TRAIN_DIR, GALLERY_DIR, QUERY_DIR):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    specs = plan_dataset(p)
    render = _Renderer(p)
    for spec in tqdm(specs, desc="embedded re-id dataset", unit="img", mininterval=0.5):
        save_jpeg(render(spec), os.path.join(folder, spec.rel_path))
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(_params_key(p), f, sort_keys=True, indent=1)


def is_complete(folder: str, params: Mapping[str, Any]) -> bool:
    """True when ``folder`` holds a finished dataset generated with ``params``."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return json.load(f) == _params_key(params)
    except (OSError, ValueError):
        return False


def _host() -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in socket.gethostname()) or "host"


def _side_path(out_dir: str, tag: str) -> str:
    """A sibling folder name that says which process (pid, host) owns it."""
    name = f".{MARKET_FOLDER}.{tag}-{os.getpid()}-{_host()}-{uuid.uuid4().hex[:8]}"
    return os.path.join(out_dir, name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours
        return True
    return True


def _remove_stale(out_dir: str) -> None:
    """Remove temp/old folders left by runs on this host whose process is gone (killed)."""
    prefix = f".{MARKET_FOLDER}."
    for name in os.listdir(out_dir):
        parts = name[len(prefix):].split("-") if name.startswith(prefix) else []
        if len(parts) < 3 or not parts[1].isdigit():
            continue
        host = "-".join(parts[2:-1]) if len(parts) > 3 else _host()
        if host == _host() and not _pid_alive(int(parts[1])):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def _install(tmp: str, target: str, params: Mapping[str, Any], out_dir: str) -> None:
    """Move the finished ``tmp`` into place, replacing an incomplete or outdated ``target``."""
    if os.path.lexists(target):
        if is_complete(target, params):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = _side_path(out_dir, "old")
        try:
            os.rename(target, old)
        except FileNotFoundError:  # another process moved it away first
            pass
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not is_complete(target, params):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def generate_market_layout(out_dir: str, seed: int = 0, num_train_ids: int = 48,
                           num_test_ids: int = 48, num_cameras: int = 4, images_per_id: int = 16,
                           queries_per_id: int = 2, height: int = 64,
                           outlier_ratio: float = 0.08) -> str:
    """Write (or reuse) the dataset under ``out_dir``; return its Market-1501-v15.09.15 folder.

    Generation goes to a temporary folder next to the target, which is renamed into place once
    complete (with a ``.complete`` marker holding the parameters), so an interrupted run never
    leaves a folder that looks finished. A complete folder with the same parameters is reused.
    """
    params = normalize_params(dict(
        seed=seed, num_train_ids=num_train_ids, num_test_ids=num_test_ids,
        num_cameras=num_cameras, images_per_id=images_per_id, queries_per_id=queries_per_id,
        height=height, outlier_ratio=outlier_ratio))
    out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    target = os.path.join(out_dir, MARKET_FOLDER)
    if is_complete(target, params):
        return target
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale(out_dir)
    tmp = _side_path(out_dir, "tmp")
    try:
        _write_dataset(tmp, params)
        _install(tmp, target, params, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
