"""Patch index for PatchedServe patch batching (patches.py): each patch's image, grid cell and neighbours.
Pure (numpy and stdlib only) so the scheduler/simulator side and the layering test stay torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import reduce
from typing import TypeVar

import numpy as np

T = TypeVar("T")

# Neighbour order in the table: up, down, left, right, up-left, up-right, down-left, down-right.
NEIGHBOUR_OFFSETS = ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


@dataclass(frozen=True, slots=True)
class ResolutionGroup:
    height: int  # latent cells
    width: int
    images: tuple[int, ...]  # image ids (positions in the caller's image list), in patch order
    patch_start: int  # ResolutionOffset
    grid_h: int
    grid_w: int


@dataclass(frozen=True, slots=True)
class PatchIndex:
    """The CSP-style index: images are ordered by resolution group, then by request;
    `groups[g].patch_start` and `image_offset[i]` are the first patch of each group and image; every patch
    has its image, grid position and an 8-neighbour table whose entry `n_patches` is the image-border
    sentinel (a zero patch)."""

    patch: int  # patch edge in latent cells
    image_sizes: list[tuple[int, int]]  # per caller image: (h, w) in latent cells
    groups: list[ResolutionGroup]
    image_offset: list[int]  # RequestOffset: first patch of each image (caller order)
    patch_image: np.ndarray  # [N] int64: image id of each patch
    patch_gy: np.ndarray  # [N] int64: grid row inside its image
    patch_gx: np.ndarray  # [N] int64
    neighbours: np.ndarray  # [N, 8] int64; value N = image border (zero patch)
    # Values derived from the index (gather indices, their torch tensors made by patches.py), by key:
    # an index is built once per step, so each is made at most once per step.
    _memo: dict[Hashable, object] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_patches(self) -> int:
        return int(self.patch_image.shape[0])

    @property
    def n_images(self) -> int:
        return len(self.image_sizes)

    @classmethod
    def build(cls, image_sizes: list[tuple[int, int]], patch: int) -> PatchIndex:
        for h, w in image_sizes:
            if h % patch or w % patch:
                raise ValueError(f"patch: {patch} does not divide latent size {h}x{w}")
        order: dict[tuple[int, int], list[int]] = {}
        for i, hw in enumerate(image_sizes):
            order.setdefault(tuple(hw), []).append(i)
        groups, image_offset = [], [0] * len(image_sizes)
        p_img, p_gy, p_gx, nbrs = [], [], [], []
        start = 0
        for (h, w), images in sorted(order.items()):
            gh, gw = h // patch, w // patch
            groups.append(ResolutionGroup(h, w, tuple(images), start, gh, gw))
            for img in images:
                image_offset[img] = start
                for gy in range(gh):
                    for gx in range(gw):
                        p_img.append(img)
                        p_gy.append(gy)
                        p_gx.append(gx)
                        row = []
                        for dy, dx in NEIGHBOUR_OFFSETS:
                            ny, nx = gy + dy, gx + dx
                            inside = 0 <= ny < gh and 0 <= nx < gw
                            row.append(start + ny * gw + nx if inside else -1)
                        nbrs.append(row)
                start += gh * gw
        neighbours = np.array(nbrs, dtype=np.int64).reshape(-1, 8)
        neighbours[neighbours < 0] = start  # the border sentinel
        return cls(
            patch, [tuple(s) for s in image_sizes], groups, image_offset,
            np.array(p_img, dtype=np.int64), np.array(p_gy, dtype=np.int64),
            np.array(p_gx, dtype=np.int64), neighbours,
        )

    def memo(self, key: Hashable, make: Callable[[], T]) -> T:
        """`make()` for `key`, made once per index and kept with it."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]  # type: ignore[return-value]

    def gather_index(self, group: int, edge: int) -> np.ndarray:
        """Flat token indices (patch-major, `edge` x `edge` tokens per patch) of group `group`'s images,
        in each image's row-major order: int64, shape [B_g, H_tok * W_tok]."""

        def make() -> np.ndarray:
            g = self.groups[group]
            b = len(g.images)
            pid = np.arange(b * g.grid_h * g.grid_w, dtype=np.int64).reshape(b, g.grid_h, g.grid_w)
            pid += g.patch_start
            ty = np.arange(edge, dtype=np.int64)
            # [b, gh, ty, gw, tx] -> patch id * T + ty * edge + tx
            idx = (pid[:, :, None, :, None] * edge * edge + ty[None, None, :, None, None] * edge
                   + ty[None, None, None, None, :])
            return idx.reshape(b, -1)

        return self.memo(("gather", group, edge), make)

    def first_patch_of_images(self, group: int) -> np.ndarray:
        """The first patch of each image of group `group`: int64, shape [B_g]."""
        g = self.groups[group]
        per = g.grid_h * g.grid_w
        return np.arange(len(g.images), dtype=np.int64) * per + g.patch_start


def patch_edge(sizes: list[tuple[int, int]], multiple: int, configured: int = 0) -> int:
    """The patch edge (latent cells): `configured` if set, else the GCD of all sizes; a multiple of
    `multiple` (the denoiser's downsampling or DiT patch size)."""
    edge = configured or reduce(math.gcd, [d for hw in sizes for d in hw])
    if edge % multiple:
        raise ValueError(f"patch_size: must be a multiple of {multiple}; got {edge} for sizes {sizes}")
    return edge
