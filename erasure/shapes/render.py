"""Procedural renderer for the shapes world: one drawn shape on a light, low-saturation background.

Every image is a pure function of ``(shape, color, fill, seed)``: position, size, rotation, colour jitter,
pattern phase and the background are drawn from ``numpy.random.default_rng`` seeded with ``seed`` and the
concept indices. Shapes are drawn at ``4x`` the output resolution and box-downsampled (anti-aliasing).

Fills:
    ``solid``   the whole shape in its colour;
    ``striped`` a coloured border plus parallel stripes (period 10/64 of the image) rotated with the shape;
    ``dotted``  a coloured border plus a grid of dots (spacing 10/64 of the image) rotated with the shape;
    ``outline`` a thick coloured border only.

The background is near-grey (saturation below ~0.08, value 0.78-0.96) with a gentle gradient and pixel noise,
so it is never confusable with the six saturated shape colours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "COLORS", "FILLS", "COLOR_RGB", "ShapeSpec", "render", "render_spec", "sample_spec"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
FILLS: tuple[str, ...] = ("solid", "striped", "dotted", "outline")

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "green": (30, 155, 50),
    "blue": (30, 70, 215),
    "yellow": (240, 205, 15),
    "purple": (135, 40, 175),
    "orange": (245, 125, 15),
}

_SS = 4  # supersampling factor


@dataclass(frozen=True)
class ShapeSpec:
    """One image's concepts."""

    shape: str
    color: str
    fill: str

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; known: {COLORS}")
        if self.fill not in FILLS:
            raise ValueError(f"unknown fill {self.fill!r}; known: {FILLS}")


def sample_spec(rng: np.random.Generator) -> ShapeSpec:
    """A uniformly random (shape, color, fill)."""
    return ShapeSpec(
        SHAPES[int(rng.integers(len(SHAPES)))], COLORS[int(rng.integers(len(COLORS)))], FILLS[int(rng.integers(len(FILLS)))]
    )


def _unit_outline(shape: str) -> np.ndarray:
    """Polygon (N, 2) of a shape centred at 0 with "radius" about 1 (y down)."""
    if shape == "circle":
        a = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        return np.stack([np.cos(a), np.sin(a)], 1) * 0.92
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float) * 0.8
    if shape == "triangle":
        a = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        pts = np.stack([np.cos(a), np.sin(a)], 1)
        return pts * 1.05 + np.array([0.0, 0.15])
    if shape == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.05, 0.5)
        return np.stack([np.cos(a) * r, np.sin(a) * r], 1)
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], 1) / 16.0
        return (pts - np.array([0.0, 0.1])) * 0.95
    if shape == "cross":
        w = 0.36
        q = np.array(
            [[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w]]
        )
        return q * 0.95
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    base = rng.uniform(200, 245)
    tint = rng.uniform(-7, 7, size=3)
    bg = np.full((n, n, 3), base, dtype=np.float32) + tint.astype(np.float32)
    # gentle linear gradient in a random direction
    ang = rng.uniform(0, 2 * np.pi)
    amp = rng.uniform(0, 12)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n - 0.5
    bg += (amp * (np.cos(ang) * xx + np.sin(ang) * yy))[..., None]
    return bg


def render_spec(spec: ShapeSpec, seed: int, size: int = 64) -> Image.Image:
    """Render ``spec`` with the random layout drawn from ``seed``; see :func:`render`."""
    key = (SHAPES.index(spec.shape), COLORS.index(spec.color), FILLS.index(spec.fill))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, *key])
    n = size * _SS
    unit = size / 64.0  # pattern scales are defined for 64 px and scale with the output size

    radius = rng.uniform(0.25, 0.40) * n
    rot = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.9, 1.1)
    pts = _unit_outline(spec.shape) * np.array([aspect, 1.0 / aspect])
    c, s = math.cos(rot), math.sin(rot)
    pts = pts @ np.array([[c, s], [-s, c]]) * radius
    lo, hi = pts.min(0), pts.max(0)
    margin = 1.5 * _SS * unit
    cx = rng.uniform(margin - lo[0], n - margin - hi[0])
    cy = rng.uniform(margin - lo[1], n - margin - hi[1])
    pts = pts + np.array([cx, cy])
    poly = [tuple(p) for p in pts.tolist()]

    mask_img = Image.new("L", (n, n), 0)
    ImageDraw.Draw(mask_img).polygon(poly, fill=255)
    inside = np.asarray(mask_img, dtype=np.float32) / 255.0

    if spec.fill == "solid":
        paint = inside
    else:
        border_w = (3.2 if spec.fill == "outline" else 2.2) * unit * _SS
        stroke = Image.new("L", (n, n), 0)
        ImageDraw.Draw(stroke).line(poly + [poly[0]], fill=255, width=int(round(2 * border_w)), joint="curve")
        border = np.minimum(np.asarray(stroke, dtype=np.float32) / 255.0, inside)
        paint = border
        if spec.fill in ("striped", "dotted"):
            yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
            period = 10.0 * unit * _SS
            pa = rot + rng.uniform(-0.2, 0.2)
            u = xx * math.cos(pa) + yy * math.sin(pa) + rng.uniform(0, period)
            if spec.fill == "striped":
                pattern = ((u % period) < period * 0.5).astype(np.float32)
            else:
                v = -xx * math.sin(pa) + yy * math.cos(pa) + rng.uniform(0, period)
                du = (u % period) - period / 2
                dv = (v % period) - period / 2
                pattern = ((du * du + dv * dv) < (2.6 * unit * _SS) ** 2).astype(np.float32)
            paint = np.maximum(border, pattern * inside)

    bg = _background(rng, n)
    col = np.array(COLOR_RGB[spec.color], dtype=np.float32) + rng.uniform(-14, 14, size=3).astype(np.float32)
    col = col * rng.uniform(0.9, 1.05)
    img = bg * (1 - paint[..., None]) + col[None, None, :] * paint[..., None]
    img = np.clip(img, 0, 255).astype(np.uint8)
    out = Image.fromarray(img, "RGB").resize((size, size), Image.BOX)
    arr = np.asarray(out, dtype=np.float32) + rng.normal(0, 2.0, size=(size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "RGB")


def render(shape: str, color: str, fill: str, seed: int, size: int = 64) -> Image.Image:
    """Render one shape on a background.

    Args:
        shape (`str`): one of :data:`SHAPES`.
        color (`str`): one of :data:`COLORS`.
        fill (`str`): one of :data:`FILLS`.
        seed (`int`): layout seed (position, size, rotation, aspect, colour jitter, pattern phase, background).
        size (`int`, *optional*, defaults to 64): output width and height in pixels.

    Returns:
        `PIL.Image.Image`: an RGB image, identical for identical arguments.
    """
    return render_spec(ShapeSpec(shape, color, fill), seed, size)
