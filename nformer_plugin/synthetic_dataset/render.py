"""Rendering: scene + person + occluder, then the camera's photometry; :class:`Renderer` turns
the :class:`~.plan.ImageSpec` entries of a plan into images.

The person is drawn on a supersampled canvas which is reduced to the output size; then come optics
blur, the camera's gamma, brightness and color cast (times the shot's jitter) and sensor noise.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .cameras import CameraStyle, camera_style
from .drawing import Frame, draw_person
from .identities import Identity, make_identities, random_identity
from .params import SyntheticParams
from .plan import ImageSpec, split_pids
from .scene import draw_occluder, render_background
from .shots import OUTLIER_KINDS, Shot, draw_shot

__all__ = ["Renderer", "apply_camera", "render_image"]


def _supersample(height: int) -> int:
    return max(1, min(4, 256 // height))


def apply_camera(img: Image.Image, style: CameraStyle, shot: Shot, rng: np.random.Generator,
                 height: int) -> Image.Image:
    """Optics blur, then the camera's gamma, brightness and color cast, then sensor noise."""
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
    fr = Frame(cx=shot.cx * w, top=shot.top * h, unit=shot.scale * stature * h)
    if ident is not None:
        draw_person(draw, ident, shot.pose, fr)
    draw_occluder(draw, shot, style, rng, fr, w, h)
    return apply_camera(img.reduce(ss) if ss > 1 else img, style, shot, rng, height)


class Renderer:
    """Renders the images of a plan: identities and camera styles built once."""

    def __init__(self, p: SyntheticParams):
        self.p = p
        self.identities = make_identities(p.seed, split_pids(p))
        self.styles = {c: camera_style(p.seed, c, p.domain) for c in range(1, p.num_cameras + 1)}

    def __call__(self, spec: ImageSpec) -> Image.Image:
        style = self.styles[spec.cam]
        if spec.pid == 0:
            return self._distractor(spec, style)
        rng = np.random.default_rng([self.p.seed, 2, spec.pid, spec.index])
        shot = draw_shot(rng, style, spec.outlier)
        return render_image(self.identities[spec.pid], shot, style, rng, self.p.height)

    def _distractor(self, spec: ImageSpec, style: CameraStyle) -> Image.Image:
        rng = np.random.default_rng([self.p.seed, 4, spec.index])
        ident: Optional[Identity] = random_identity(rng)
        outlier = ""
        if spec.outlier == "junk":
            outlier = OUTLIER_KINDS[int(rng.integers(len(OUTLIER_KINDS)))]
            ident = None if rng.random() < 0.3 else ident
        shot = draw_shot(rng, style, outlier)
        return render_image(ident, shot, style, rng, self.p.height)
