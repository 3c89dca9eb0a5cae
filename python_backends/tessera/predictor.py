"""Online latency predictor (PatchedServe §1.7): the latency of one engine step from its batch makeup.

Features of a step: 1, the rows x latent cells summed over requests (CFG halves count twice), the
number of requests, the number of distinct resolutions, the number of denoiser rows (patches or
tiles when the executor cuts) and the rows x latent cells of requests stepping with LoRA adapters (their
low-rank products are extra work in every adapted layer: the adapter cost, issue 14).
Least squares on a start-up profile, then refit online from a window of served steps, the profile kept in
every refit: a window that served only some shapes (a policy that runs the large sizes only at degree > 1 sees
only the small ones at degree 1) cannot then bend the line far from what was profiled elsewhere. `observe` records the error of the prediction made before each served step, so the
exported error is on batches the model was not fit on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


STEP_FEATURES = ("const", "cells", "requests", "resolutions", "rows", "adapter_cells", "control_cells")  # BatchShape.features(), in order


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What a step will run: (height_cells, width_cells, rows) per request, and the executor's rows."""

    requests: tuple[tuple[int, int, int], ...]
    denoiser_rows: int = 0  # patches/tiles/latents fed to the denoiser (0: sum of request rows)
    adapter_cells: int = 0  # rows x latent cells of the requests whose rows carry LoRA adapters this step
    control_cells: int = 0  # rows x latent cells x ControlNets, over the requests with ControlNets

    def features(self) -> np.ndarray:
        cells = sum(h * w * r for h, w, r in self.requests)
        distinct = len({(h, w) for h, w, _ in self.requests})
        rows = self.denoiser_rows or sum(r for _, _, r in self.requests)
        return np.array([1.0, cells, len(self.requests), distinct, rows, self.adapter_cells, self.control_cells],
                        dtype=np.float64)


class LatencyPredictor:
    def __init__(self, window: int = 512, refit_every: int = 16, ridge: float = 1e-6):
        self.window: deque[tuple[np.ndarray, float]] = deque(maxlen=window)
        self.anchors: list[tuple[np.ndarray, float]] = []  # the start-up profile (fit): in every refit
        self.coef = np.zeros(len(STEP_FEATURES))
        self.refit_every, self.ridge = refit_every, ridge
        self._since_fit = 0
        self.errors: deque[float] = deque(maxlen=window)  # |pred - actual| / actual, out of sample

    def fit(self, samples: Iterable[tuple[BatchShape, float]]) -> None:
        """The start-up profile: the first fit, and anchors of every online refit."""
        self.anchors.extend((shape.features(), seconds) for shape, seconds in samples)
        self._refit()

    def _refit(self) -> None:
        rows = [*self.anchors, *self.window]
        if not rows:
            return
        x = np.stack([f for f, _ in rows])
        y = np.array([s for _, s in rows])
        # Relative least squares (rows divided by their latency): the error that matters, and is exported,
        # is the percentage error; plain least squares lets the big batches dominate and the small ones
        # (most steps) carry tens of percent. Columns scaled so the ridge term treats them alike.
        w = 1.0 / np.maximum(y, 1e-9)
        xw = x * w[:, None]
        scale = np.maximum(np.abs(xw).max(0), 1e-12)
        xs = xw / scale
        a = xs.T @ xs + self.ridge * np.eye(xs.shape[1])
        coef = np.linalg.solve(a, xs.T @ (y * w)) / scale
        # Then rescaled so the served window's predicted total equals its measured total (the profile's
        # before anything is served): the relative fit sits near the typical step, but served steps are
        # skewed slow (contention with request handling on shared cores), and a queue compounds any
        # shortfall in total time (docs/architecture.md). Served shapes are pulled to their served cost;
        # shapes the window never holds keep (about) their profiled cost.
        level = list(self.window) or self.anchors
        lx = np.stack([f for f, _ in level])
        predicted = float(np.sum(np.maximum(lx @ coef, 0.0)))
        self.coef = coef * (float(sum(s for _, s in level)) / predicted if predicted > 0 else 1.0)
        self._since_fit = 0

    def predict(self, shape: BatchShape) -> float:
        """Seconds for one step of this batch (never below 0)."""
        return max(float(shape.features() @ self.coef), 0.0)

    def observe(self, shape: BatchShape, seconds: float) -> float:
        """Record a served step; returns the relative error of the prediction made before it."""
        err = abs(self.predict(shape) - seconds) / max(seconds, 1e-9)
        self.errors.append(err)
        self.window.append((shape.features(), seconds))
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self._refit()
        return err

    @property
    def mape(self) -> float | None:
        return float(np.mean(self.errors)) if self.errors else None
