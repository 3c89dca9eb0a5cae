"""Procedural captioned shapes with exact labels, at any resolution, seeded and free to generate.

Captions: "a {colour} {shape} at {top|bottom} {left|right}" (4 x 3 x 4 = 48 prompts). Rendering is
resolution-independent (object size and position are fractions of the image), 2x supersampled.

Styles (`STYLES`, for the reference LoRA adapters of issue 14; never part of the caption):
  plain     today's rendering, the default (byte-identical to the rendering before styles existed)
  outlined  only a ring of the shape is drawn in its colour (inner part at 50% of the size left as background)
  striped   the fill alternates the colour with a dark shade of it in horizontal bands (2 pairs per object:
            coarse enough for the 8x VAE at 128 px; finer bands do not survive its round trip)
  dark      the same object on a near-black background (the background's brightness x 0.15)
Every style draws the same random numbers in the same order as plain, so one label and seed give the same
geometry, colour and pixel noise in every style: only the style differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
RGB = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
RESOLUTIONS = ((64, 64), (64, 128), (128, 64), (128, 128))  # (height, width): GCD 64
STYLES = ("plain", "outlined", "striped", "dark")
OUTLINE_INNER = 0.5  # outlined: the inner shape (left as background) at this fraction of the object's size
STRIPE_PAIRS = 2  # striped: colour/shade band pairs across the object's height
STRIPE_SHADE = 0.3  # striped: the dark bands' brightness relative to the colour
DARK_FACTOR = 0.15  # dark: background brightness relative to plain's


@dataclass(frozen=True, slots=True)
class Label:
    colour: int
    shape: int
    position: int

    @property
    def caption(self) -> str:
        return f"a {COLOURS[self.colour]} {SHAPES[self.shape]} at {POSITIONS[self.position]}"

    def as_array(self) -> np.ndarray:
        return np.array([self.colour, self.shape, self.position], dtype=np.int64)


def all_labels() -> list[Label]:
    return [Label(c, s, p) for c in range(len(COLOURS)) for s in range(len(SHAPES)) for p in range(len(POSITIONS))]


def parse_caption(caption: str) -> Label:
    for label in all_labels():
        if label.caption == caption:
            return label
    raise ValueError(f"caption: not a shapes caption; allowed 'a <colour> <shape> at <top|bottom> <left|right>', got {caption!r}")


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return dx**2 + dy**2 <= 1.0
    if shape == "square":
        return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    return (dy <= 0.8) & (dy >= -1.0 + 1.8 * np.abs(dx) / 1.0) & (np.abs(dx) <= 1.0)  # triangle, apex up


def render(label: Label, height: int, width: int, rng: np.random.Generator, style: str = "plain",
           with_mask: bool = False):
    """One image, float32 [H, W, 3] in [0, 1], in one of `STYLES` (plain: the original rendering).
    with_mask: also the object's silhouette, bool [H, W] (the filled shape, whatever the style; the same
    random draws, so the image is the one drawn without it)."""
    if style not in STYLES:
        raise ValueError(f"style: allowed {STYLES}, got {style!r}")
    ss = 2
    h, w = height * ss, width * ss
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = (yy + 0.5) / h, (xx + 0.5) / w  # fractions of the image
    base = rng.uniform(0.12, 0.28)
    tint = rng.uniform(-0.03, 0.03, size=3)
    grad = rng.uniform(-0.06, 0.06)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (base + tint)[None, None, :]
    img += (grad * (yy - 0.5))[..., None]
    if style == "dark":
        img *= DARK_FACTOR
    row, col = divmod(label.position, 2)
    cy = (0.25 + 0.5 * row) + rng.uniform(-0.06, 0.06)
    cx = (0.25 + 0.5 * col) + rng.uniform(-0.06, 0.06)
    r = rng.uniform(0.13, 0.20)  # of the smaller side
    aspect = h / w
    dy = (yy - cy) / r
    dx = (xx - cx) / r / aspect if aspect < 1 else (xx - cx) / r
    if aspect > 1:
        dy = dy * aspect
    shape = SHAPES[label.shape]
    if shape == "circle":
        mask = dx**2 + dy**2 <= 1.0
    elif shape == "square":
        mask = (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    else:  # triangle, apex up
        mask = (dy <= 0.8) & (dy >= -1.0 + 1.8 * np.abs(dx) / 1.0) & (np.abs(dx) <= 1.0)
    silhouette = mask.reshape(height, ss, width, ss).mean(axis=(1, 3)) >= 0.5
    colour = np.array(RGB[COLOURS[label.colour]], np.float32) * rng.uniform(0.85, 1.0)
    if style == "outlined":
        # The inner shape, scaled about the shape's own centre (the triangle's spans dy in [-1, 0.8]).
        oy = -0.1 if shape == "triangle" else 0.0
        mask &= ~_shape_mask(shape, dx / OUTLINE_INNER, (dy - oy) / OUTLINE_INNER + oy)
    if style == "striped":
        top, bottom = (-1.0, 0.8) if shape == "triangle" else (-0.85, 0.85) if shape == "square" else (-1.0, 1.0)
        band = np.floor((dy - top) / (bottom - top) * (2 * STRIPE_PAIRS)).astype(np.int64)
        shade = mask & (band % 2 == 1)
        img[mask & ~shade] = colour
        img[shade] = colour * STRIPE_SHADE
    else:
        img[mask] = colour
    img = img.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
    img += rng.normal(0, 0.01, size=img.shape).astype(np.float32)
    img = np.clip(img, 0.0, 1.0)
    return (img, silhouette) if with_mask else img


def batch(n: int, height: int, width: int, rng: np.random.Generator, labels: list[Label] | None = None,
          style: str = "plain"):
    """n images [n, H, W, 3] and their labels [n, 3] (colour, shape, position), all in `style` (the caption
    never names it)."""
    pool = all_labels()
    labels = labels or [pool[i] for i in rng.integers(0, len(pool), size=n)]
    images = np.stack([render(lb, height, width, rng, style) for lb in labels])
    return images, np.stack([lb.as_array() for lb in labels]), [lb.caption for lb in labels]
