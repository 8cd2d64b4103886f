"""Drawing one pedestrian with PIL polygons in person coordinates.

Viewpoints: front (face, logo, jacket opening, backpack straps), back (hair, backpack, no logo),
side (narrow silhouette, stride, backpack beside the body); the bag side is mirrored between
front and back views.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Tuple

from PIL import ImageDraw

from .identities import Identity
from .sampling import shade_color
from .shots import Pose

__all__ = ["Frame", "draw_person"]


@dataclasses.dataclass(frozen=True)
class Frame:
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
    """A torso-like trapezoid: center ``u``, rows ``v0..v1``, half-widths ``h0`` (top), ``h1``."""

    u: float
    v0: float
    v1: float
    h0: float
    h1: float

    def point(self, s: float, t: float) -> Tuple[float, float]:
        """(u, v) at depth share ``s`` (0 top, 1 bottom) and across share ``t`` (0 left)."""
        half = self.h0 + s * (self.h1 - self.h0)
        return (self.u + (2.0 * t - 1.0) * half, self.v0 + s * (self.v1 - self.v0))

    def quad(self, fr: Frame, s0: float, s1: float, t0: float, t1: float) -> List[Tuple]:
        corners = ((s0, t0), (s0, t1), (s1, t1), (s1, t0))
        return [fr.xy(*self.point(s, t)) for s, t in corners]


def _limb(fr: Frame, p0: Tuple[float, float], p1: Tuple[float, float], w0: float, w1: float,
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


def _draw_leg(draw: ImageDraw.ImageDraw, fr: Frame, b: _Body, i: int, shade: float) -> None:
    ident = b.ident
    hip, foot = b.hips[i], b.feet[i]
    w0 = 0.075 if b.pose.view == "side" else ident.hip * 0.95
    skin, lower = shade_color(ident.skin, shade), shade_color(ident.lower, shade)
    if ident.lower_type == "trousers":
        draw.polygon(_limb(fr, hip, foot, w0, 0.045), fill=lower)
    else:
        draw.polygon(_limb(fr, hip, foot, w0 * 0.8, 0.04), fill=skin)
        if ident.lower_type == "shorts":
            draw.polygon(_limb(fr, hip, foot, w0, 0.05, 0.0, 0.4), fill=lower)
    d = b.pose.facing if b.pose.view == "side" else 0
    draw.ellipse(fr.box(foot[0] - 0.032 + 0.012 * d, foot[1] - 0.02,
                        foot[0] + 0.032 + 0.012 * d, foot[1] + 0.018),
                 fill=shade_color(ident.shoes, shade))


def _draw_hips(draw: ImageDraw.ImageDraw, fr: Frame, b: _Body) -> None:
    t, ident = b.torso, b.ident
    if ident.lower_type == "skirt":
        skirt = _Trapezoid(t.u, t.v1 - 0.03, t.v1 + 0.2, t.h1 * 1.05, t.h1 * 1.5)
        draw.polygon(skirt.quad(fr, 0, 1, 0, 1), fill=ident.lower)
    else:
        crotch = _Trapezoid(t.u, t.v1 - 0.03, t.v1 + 0.06, t.h1, t.h1 * 0.9)
        draw.polygon(crotch.quad(fr, 0, 1, 0, 1), fill=ident.lower)


def _draw_arm(draw: ImageDraw.ImageDraw, fr: Frame, b: _Body, i: int, shade: float) -> None:
    ident = b.ident
    sh, hand = b.shoulders[i], b.hands[i]
    sleeve = 0.35 if ident.short_sleeves else 1.0
    draw.polygon(_limb(fr, sh, hand, 0.05, 0.036), fill=shade_color(ident.skin, shade))
    draw.polygon(_limb(fr, sh, hand, 0.052, 0.04, 0.0, sleeve),
                 fill=shade_color(ident.upper, shade))
    draw.ellipse(fr.box(hand[0] - 0.02, hand[1] - 0.02, hand[0] + 0.02, hand[1] + 0.022),
                 fill=shade_color(ident.skin, shade))


def _draw_torso(draw: ImageDraw.ImageDraw, fr: Frame, b: _Body) -> None:
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


def _draw_long_hair(draw: ImageDraw.ImageDraw, fr: Frame, b: _Body) -> None:
    r, (hu, hv) = b.ident.head, b.head_c
    if b.pose.view == "side":
        u0 = hu - b.pose.facing * r * 0.95
        draw.rectangle(fr.box(u0, hv, hu, b.torso.v0 + 0.06), fill=b.ident.hair)
    else:
        width = 1.05 if b.pose.view == "front" else 0.9
        draw.rectangle(fr.box(hu - width * r, hv, hu + width * r, b.torso.v0 + 0.08),
                       fill=b.ident.hair)


def _draw_head(draw: ImageDraw.ImageDraw, fr: Frame, b: _Body) -> None:
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


def _draw_backpack(draw: ImageDraw.ImageDraw, fr: Frame, b: _Body, layer: str) -> None:
    t, ident, view = b.torso, b.ident, b.pose.view
    color, dark = ident.bag_color, shade_color(ident.bag_color, 0.7)
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


def _draw_side_bag(draw: ImageDraw.ImageDraw, fr: Frame, b: _Body, layer: str) -> None:
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
                      fill=shade_color(ident.bag_color, 0.8), width=max(1, int(0.016 * fr.unit)))
        draw.rectangle(fr.box(side_u - 0.05, t.v1 - 0.05, side_u + 0.05, t.v1 + 0.06),
                       fill=ident.bag_color)
    elif ident.bag == "hand":
        draw.rectangle(fr.box(hand[0] - 0.035, hand[1], hand[0] + 0.035, hand[1] + 0.08),
                       fill=ident.bag_color)


def _draw_bags(draw: ImageDraw.ImageDraw, fr: Frame, b: _Body, layer: str) -> None:
    if b.ident.bag == "backpack":
        _draw_backpack(draw, fr, b, layer)
    elif b.ident.bag in ("shoulder", "hand"):
        _draw_side_bag(draw, fr, b, layer)


def draw_person(draw: ImageDraw.ImageDraw, ident: Identity, pose: Pose, fr: Frame) -> None:
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

