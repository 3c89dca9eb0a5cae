"""The step-level engine (PatchedServe §1): every in-flight request, one denoising step at a time.

`Engine.step(now_s)` is the whole contract, numbered as in the code:
  (1) the policy plans this step from a read-only view (who joins, who advances);
  (2) joining requests start: prompt encoding and seeded noise (Txt2Img.start);
  (3) ONE denoiser executor run for every advancing request (the executor may batch by resolution,
      by patches or by tiles);
  (4) each request's own sampler takes its step (Txt2Img.apply);
  (5) finished requests are decoded and leave at once; progress events for streaming requests;
  (6) a StepRecord for metrics and tests.
No threads and no Triton here: EngineLoop (loop.py) owns the thread; the clock is passed in.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .generation import RequestRun, Txt2Img
from .request import GenerationParams

log = logging.getLogger(__name__)


class FinishReason(str, enum.Enum):
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    ERROR = "error"
    DROPPED = "dropped"


@dataclass(slots=True)
class RequestState:
    """Mutable per-request state; only the Engine writes it."""

    request_id: str
    params: GenerationParams
    arrival_s: float
    progress: bool = False  # send a progress event after every step
    preview: bool = False  # include a cheap preview image in progress events
    run: RequestRun | None = None  # set when the request joins
    joined_s: float | None = None
    step_s: list[float] = field(default_factory=list)  # end time of each step
    done_s: float | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.params.height, self.params.width

    @property
    def step_index(self) -> int:
        return 0 if self.run is None else self.run.step_index

    @property
    def steps_left(self) -> int:
        return self.params.num_steps if self.run is None else self.run.steps_left


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    final: bool
    step_index: int  # steps done
    num_steps: int
    image: np.ndarray | None = None  # final: [H, W, 3] uint8; progress: preview or None
    error: Exception | None = None
    finish_reason: FinishReason | None = None
    arrival_s: float | None = None
    done_s: float | None = None


@dataclass(frozen=True, slots=True)
class StepPlan:
    join: tuple[str, ...]  # waiting requests that start now
    advance: tuple[str, ...]  # requests that take a step now (joining ones included)

    @classmethod
    def make_empty(cls) -> StepPlan:
        return cls((), ())


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

    @property
    def denoiser_calls(self) -> int:
        return len(self.batch_per_call)


@dataclass(frozen=True, slots=True)
class EngineView:
    """What a policy sees: read-only lists, oldest first."""

    waiting: tuple[RequestState, ...]
    running: tuple[RequestState, ...]


class Engine:
    def __init__(self, pipeline: Txt2Img, denoiser, policy, history: int = 10_000):
        self.pipeline = pipeline
        self.denoiser = denoiser
        self.policy = policy
        self.waiting: dict[str, RequestState] = {}
        self.running: dict[str, RequestState] = {}
        self.records: deque[StepRecord] = deque(maxlen=history)
        self.step_no = 0

    # -- membership ---------------------------------------------------------------------------------
    def add(self, state: RequestState) -> None:
        if state.request_id in self.waiting or state.request_id in self.running:
            raise ValueError(f"request_id: already in flight, got {state.request_id!r}")
        self.waiting[state.request_id] = state

    def abort(self, request_id: str, now_s: float, reason: FinishReason = FinishReason.CANCELLED,
              error: Exception | None = None) -> RequestOutput | None:
        """Remove a request at a step boundary and free its state; None if it is not in flight."""
        state = self.waiting.pop(request_id, None) or self.running.pop(request_id, None)
        if state is None:
            return None
        state.done_s = now_s
        return self._final(state, reason, error=error)

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def view(self) -> EngineView:
        return EngineView(tuple(self.waiting.values()), tuple(self.running.values()))

    # -- the step ------------------------------------------------------------------------------------
    def step(self, now_s: float, clock=None) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        # (1) plan
        plan = self.policy.schedule(self.view(), now_s)
        # (2) join: encode prompts, draw seeded noise
        for rid in plan.join:
            state = self.waiting.pop(rid)
            try:
                state.run = self.pipeline.start(state.params)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the loop
                log.exception("[tessera] request %s failed to start", rid)
                state.done_s = now_s
                outputs.append(self._final(state, FinishReason.ERROR, error=e))
                continue
            state.joined_s = now_s
            self.running[rid] = state
        advancing = [self.running[rid] for rid in plan.advance if rid in self.running]
        if not advancing:
            return outputs
        # (3) one executor run for every advancing request
        before = tuple(s.step_index for s in advancing)
        items = [self.pipeline.denoiser_inputs(s.run) for s in advancing]
        try:
            preds, stats = self.denoiser.run(items)
        except Exception as e:  # noqa: BLE001
            log.error("[tessera] denoiser failed on step %d (%d requests, sizes %s): %s", self.step_no,
                      len(advancing), sorted({s.size for s in advancing}), e)
            for s in advancing:
                self.running.pop(s.request_id, None)
                s.done_s = now_s
                outputs.append(self._final(s, FinishReason.ERROR, error=e))
            return outputs
        end_s = clock() if clock else now_s
        # (4) per-request sampler update; (5) progress, finish
        for s, pred in zip(advancing, preds, strict=True):
            self.pipeline.apply(s.run, pred)
            s.step_s.append(end_s)
            if s.run.done:
                self.running.pop(s.request_id)
                try:
                    image = self.pipeline.finish(s.run)
                except Exception as e:  # noqa: BLE001
                    s.done_s = clock() if clock else end_s
                    outputs.append(self._final(s, FinishReason.ERROR, error=e))
                    continue
                s.done_s = clock() if clock else end_s
                outputs.append(self._final(s, FinishReason.COMPLETED, image=image))
            elif s.progress:
                preview = self.pipeline.preview(s.run) if s.preview else None
                outputs.append(RequestOutput(s.request_id, False, s.step_index, s.params.num_steps, preview))
        # (6) record
        self.records.append(
            StepRecord(
                self.step_no, now_s, end_s, tuple(s.request_id for s in advancing), before,
                tuple(s.size for s in advancing), stats.batch, stats.resolutions, stats.requests,
            )
        )
        self.step_no += 1
        return outputs

    def _final(self, s: RequestState, reason: FinishReason, image=None, error=None) -> RequestOutput:
        return RequestOutput(
            s.request_id, True, s.step_index, s.params.num_steps, image, error, reason, s.arrival_s, s.done_s
        )
