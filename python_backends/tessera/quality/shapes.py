"""Procedural captioned shapes with exact labels, at any resolution, seeded and free to generate.

Captions: "a {colour} {shape} at {top|bottom} {left|right}" (4 x 3 x 4 = 48 prompts). Rendering is
resolution-independent (object size and position are fractions of the image), 2x supersampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
RGB = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.85, 0.1)}
RESOLUTIONS = ((64, 64), (64, 128), (128, 64), (128, 128))  # (height, width): GCD 64


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


def render(label: Label, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One image, float32 [H, W, 3] in [0, 1]."""
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
    colour = np.array(RGB[COLOURS[label.colour]], np.float32) * rng.uniform(0.85, 1.0)
    img[mask] = colour
    img = img.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
    img += rng.normal(0, 0.01, size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0)


def batch(n: int, height: int, width: int, rng: np.random.Generator, labels: list[Label] | None = None):
    """n images [n, H, W, 3] and their labels [n, 3] (colour, shape, position)."""
    pool = all_labels()
    labels = labels or [pool[i] for i in rng.integers(0, len(pool), size=n)]
    images = np.stack([render(lb, height, width, rng) for lb in labels])
    return images, np.stack([lb.as_array() for lb in labels]), [lb.caption for lb in labels]
