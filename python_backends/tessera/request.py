"""Per-request generation parameters (frozen), as parsed and validated from the wire."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GenerationParams:
    prompt: str
    negative_prompt: str
    height: int  # pixels
    width: int  # pixels
    num_steps: int
    guidance_scale: float
    seed: int
    slo_ms: int | None = None  # deadline relative to arrival; recorded now, used by the scheduler
    early_exit: bool | None = None  # entropy early exit for this request; None: the server's default

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance runs when guidance_scale > 1, as in diffusers pipelines."""
        return self.guidance_scale > 1.0
