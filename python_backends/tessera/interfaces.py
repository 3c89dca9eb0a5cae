"""The small interfaces the engine is typed against: a request's run, the pipeline that starts, steps and
decodes runs, and the denoiser executor. Implementations: generation.Txt2Img and executors.denoise
(torch/ONNX), bench.simulate (a virtual clock). Nothing here imports torch or Triton."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

Inputs = dict[str, np.ndarray]  # one request's denoiser inputs (ONNX names, batch first)


class Run(Protocol):
    """One request's denoising run (generation.RequestRun)."""

    step_index: int  # steps done
    entropies: list[float]  # early_exit.gaussian_entropy of the predicted clean latent after each step
    jump_last: bool  # the last step's update goes straight to t = 0

    @property
    def steps_left(self) -> int: ...

    @property
    def done(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class CallStats:
    """One entry per denoiser call made for a step."""

    batch: tuple[int, ...]  # rows per call (patches, tiles or whole latents)
    resolutions: tuple[int, ...]  # distinct latent resolutions per call
    requests: tuple[int, ...]  # requests per call

    @property
    def calls(self) -> int:
        return len(self.batch)


class Denoiser(Protocol):
    """Runs one denoising step for many requests at once (executors.denoise)."""

    def run(self, items: list[Inputs], adapters: list[Any] | None = None,
            controls: list[Any] | None = None, places: list | None = None) -> tuple[list[Any], CallStats]:
        """`adapters`: per item, its (loaded adapter, scale) pairs for this step (None: nobody has any);
        `controls`: per item, its controlnet.ControlCall or None (None: nobody has a ControlNet; only
        executors.control.ControlDenoiser takes them); `places`: per item, the denoiser workers that run it
        (None: one worker; only executors.workers.PooledDenoiser has several)."""
        ...


class Pipeline(Protocol):
    """Starts, steps and decodes runs (generation.Txt2Img)."""

    def start(self, params: Any) -> Run: ...

    def denoiser_inputs(self, run: Run) -> Inputs: ...

    def apply(self, run: Run, noise_pred: Any) -> None: ...

    def truncate(self, run: Run, total: int, clean: bool = True) -> None: ...

    def finish(self, run: Run) -> np.ndarray: ...

    def preview(self, run: Run) -> np.ndarray: ...
