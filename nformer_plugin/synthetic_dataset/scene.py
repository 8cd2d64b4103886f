"""The scene around the main person: a camera-styled background with clutter and small
pedestrians in the distance, and the occluder in front (pole, box/bench, wall edge, pedestrian).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .cameras import CameraStyle
from .drawing import Frame, draw_person
from .identities import random_identity
from .sampling import Color, random_sign, shade_color, weighted_index
from .shots import Shot, random_pose

__all__ = ["draw_occluder", "render_background"]

POLE_PALETTE = ((130, 130, 135), (80, 80, 85), (170, 160, 120), (60, 90, 60), (200, 200, 205))


def _texture(rng: np.random.Generator, w: int, h: int, strength: float) -> np.ndarray:
    """Low-frequency noise (h, w, 3), zero mean: mostly brightness, a little color."""
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
        return shade_color(pal[int(rng.integers(len(pal)))], float(rng.uniform(0.7, 1.2)))

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
            draw.line([(x, 0), (x, horizon)], fill=shade_color(style.wall, 0.7),
                      width=max(1, h // 80))
        if rng.random() < 0.7:
            dx = rng.uniform(-0.2, 0.8) * w
            draw.rectangle([dx, 0.25 * horizon, dx + 0.35 * w, horizon], fill=color())
        for y in np.arange(horizon, h, (h - horizon) / 4):
            draw.line([(0, y), (w, y)], fill=shade_color(style.floor, 0.75), width=max(1, h // 100))
    elif style.scene == "park":  # foliage blobs above, path below
        for _ in range(int(rng.integers(6, 12))):
            cx, cy, rr = rng.uniform(0, w), rng.uniform(0, horizon), rng.uniform(0.1, 0.3) * w
            draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr],
                         fill=shade_color((60, 120, 55), float(rng.uniform(0.6, 1.3))))
        px = rng.uniform(0.2, 0.8) * w
        draw.polygon([(px - 0.1 * w, horizon), (px + 0.1 * w, horizon), (px + 0.6 * w, h),
                      (px - 0.6 * w, h)], fill=shade_color(style.floor, 1.25))
    else:  # plaza: pillars and a tiled floor
        for _ in range(int(rng.integers(1, 4))):
            x = rng.uniform(-0.1, 1.0) * w
            draw.rectangle([x, 0, x + rng.uniform(0.08, 0.2) * w, horizon], fill=color())
        step = rng.uniform(0.2, 0.35) * w
        for x in np.arange(rng.uniform(0, step), w, step):
            draw.line([(x, horizon), (x + (x - w / 2) * 0.6, h)],
                      fill=shade_color(style.floor, 0.7), width=max(1, h // 100))
    for _ in range(int(rng.integers(2, 6))):  # clutter anywhere
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        sw, sh = rng.uniform(0.05, 0.3) * w, rng.uniform(0.03, 0.2) * h
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x, y, x + sw, y + sh], fill=color())


def _draw_bystanders(draw: ImageDraw.ImageDraw, style: CameraStyle, rng: np.random.Generator,
                     w: int, h: int) -> None:
    """Small pedestrians in the distance."""
    for _ in range(weighted_index(rng, (0.6, 0.3, 0.1))):
        unit = h * rng.uniform(0.25, 0.45)
        fr = Frame(cx=rng.uniform(0, w), top=style.horizon * h - unit * rng.uniform(0.6, 0.9),
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


def draw_occluder(draw: ImageDraw.ImageDraw, shot: Shot, style: CameraStyle,
                   rng: np.random.Generator, fr: Frame, w: int, h: int) -> None:
    kind, amount = shot.occluder, shot.occ_amount
    if kind == "pole":
        pw = w * amount * 0.6
        x = fr.cx + rng.uniform(-0.6, 0.6) * w * 0.4 - pw / 2
        col = POLE_PALETTE[int(rng.integers(len(POLE_PALETTE)))]
        draw.rectangle([x, 0, x + pw, h], fill=col)
        draw.rectangle([x + pw * 0.2, 0, x + pw * 0.35, h], fill=shade_color(col, 1.25))
    elif kind == "box":
        y = h * (1.0 - amount)
        if rng.random() < 0.5:
            x0, x1 = 0.0, w * rng.uniform(0.6, 1.0)
        else:
            x0, x1 = w * rng.uniform(0.0, 0.4), float(w)
        col = style.clutter[int(rng.integers(len(style.clutter)))]
        draw.rectangle([x0, y, x1, h], fill=col)
        draw.rectangle([x0, y + 0.15 * (h - y), x1, y + 0.3 * (h - y)], fill=shade_color(col, 0.7))
    elif kind == "side":
        s = rng.random() < 0.5
        x = w * amount if s else w * (1 - amount)
        col = style.clutter[int(rng.integers(len(style.clutter)))]
        draw.rectangle([0, 0, x, h] if s else [x, 0, w, h], fill=col)
    elif kind == "person":
        s = random_sign(rng)
        cx = w * (0.5 + s * (0.75 - amount))
        other = Frame(cx=cx, top=fr.top + rng.normal(0, 0.05) * h,
                       unit=fr.unit * rng.uniform(0.95, 1.15))
        draw_person(draw, random_identity(rng), random_pose(rng, style.view_probs), other)

