"""What crosses the engine's boundaries, frozen: a policy's view and its plan, the engine's outputs and
its per-step records."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .request import FinishReason, RequestState


@dataclass(frozen=True, slots=True)
class EngineView:
    """What a policy sees: read-only lists, oldest first."""

    waiting: tuple[RequestState, ...]
    running: tuple[RequestState, ...]
    step_no: int = 0
    last_advance: frozenset[str] = frozenset()  # ids the previous step's plan advanced (adapters may have
    # set some aside for that step: they stay members of the round)
    places: tuple[tuple[str, tuple[int, ...]], ...] = ()  # the previous step's worker sets (several workers)
    workers: int = 1  # the engine's denoiser workers


@dataclass(frozen=True, slots=True)
class StepPlan:
    """A policy's decision for one step."""

    join: tuple[str, ...]  # waiting requests that start now
    advance: tuple[str, ...]  # requests that take a step now (joining ones included)
    drop: tuple[tuple[str, str], ...] = ()  # (request id, reason): answered at once, never run
    degrade: tuple[tuple[str, int], ...] = ()  # (request id, fewer total steps): waiting ones re-spaced before
    # joining; running ones end after that many steps with "one last step" straight to t = 0
    place: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (request id, its workers): degree-choosing policies;
    # advancing requests not named here are placed by the engine's placer at degree 1

    @classmethod
    def make_empty(cls) -> StepPlan:
        return cls((), ())


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    final: bool
    step_index: int  # steps done
    num_steps: int
    image: np.ndarray | None = None  # final: [H, W, 3] uint8; progress: preview [h, w, 3] or None
    error: Exception | None = None
    finish_reason: FinishReason | None = None
    arrival_s: float | None = None
    done_s: float | None = None
    deadline_s: float | None = None
    slack_at_join: float | None = None
    size: tuple[int, int] | None = None  # (height, width) in pixels
    asked_steps: int | None = None  # the steps the client asked for (step_index: the steps that ran)
    exited: bool = False  # ended early by the entropy rule

    @property
    def ok(self) -> bool:
        return self.finish_reason in (FinishReason.COMPLETED, FinishReason.DEGRADED)


@dataclass(frozen=True, slots=True)
class StepRecord:
    step_no: int
    start_s: float
    end_s: float
    request_ids: tuple[str, ...]
    step_indices: tuple[int, ...]  # each advanced request's step index before this step
    resolutions: tuple[tuple[int, int], ...]  # each advanced request's (height, width)
    batch_per_call: tuple[int, ...]  # denoiser rows per call (latents, patches or tiles)
    resolutions_per_call: tuple[int, ...]
    requests_per_call: tuple[int, ...]
    predicted_s: float | None = None  # the predictor's step latency, made before the step
    measured_s: float | None = None  # denoiser call(s) + sampler updates, as measured
    degrees: tuple[int, ...] = ()  # each advanced request's denoiser workers (empty: the engine has one)

    @property
    def denoiser_calls(self) -> int:
        return len(self.batch_per_call)
