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
import math
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from .early_exit import ExitRule
from .errors import TesseraError
from .generation import RequestRun, Txt2Img
from .request import GenerationParams

log = logging.getLogger(__name__)


class FinishReason(str, enum.Enum):
    COMPLETED = "completed"
    DEGRADED = "degraded"  # completed with fewer steps than asked, to meet its deadline
    CANCELLED = "cancelled"
    ERROR = "error"
    DROPPED = "dropped"  # its deadline could not be met


class DeadlineUnreachableError(TesseraError, RuntimeError):
    """The request cannot meet its deadline even if run alone now (answered UNAVAILABLE)."""


@dataclass(slots=True)
class RequestState:
    """Mutable per-request state; only the Engine writes it."""

    request_id: str
    params: GenerationParams
    arrival_s: float
    progress: bool = False  # send a progress event after every step
    preview: bool = False  # include a cheap preview image in progress events
    run: RequestRun | None = None  # set when the request joins
    deadline_s: float = math.inf  # absolute, same clock as arrival_s
    isolated_s: float = 0.0  # predicted latency of this request alone (k x isolated is the default SLO)
    asked_steps: int | None = None  # set when degraded: the steps the client asked for
    slack_at_join: float | None = None  # (deadline - join - predicted remaining) / isolated
    early_exit: bool = False  # resolved at add: the request's choice, else the server's default
    exited: bool = False  # stopped by the entropy rule
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
    deadline_s: float | None = None
    slack_at_join: float | None = None
    size: tuple[int, int] | None = None  # (height, width) in pixels
    asked_steps: int | None = None  # the steps the client asked for (step_index: the steps that ran)
    exited: bool = False  # ended early by the entropy rule


@dataclass(frozen=True, slots=True)
class StepPlan:
    join: tuple[str, ...]  # waiting requests that start now
    advance: tuple[str, ...]  # requests that take a step now (joining ones included)
    drop: tuple[tuple[str, str], ...] = ()  # (request id, reason): answered at once, never run
    degrade: tuple[tuple[str, int], ...] = ()  # (request id, fewer total steps): waiting ones re-spaced before
    # joining; running ones end after that many steps with "one last step" straight to t = 0

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
    predicted_s: float | None = None  # the predictor's step latency, made before the step
    measured_s: float | None = None  # denoiser call(s) + sampler updates, as measured

    @property
    def denoiser_calls(self) -> int:
        return len(self.batch_per_call)


@dataclass(frozen=True, slots=True)
class EngineView:
    """What a policy sees: read-only lists, oldest first."""

    waiting: tuple[RequestState, ...]
    running: tuple[RequestState, ...]
    step_no: int = 0
    last_advance: frozenset = frozenset()  # ids advanced by the previous step


class Engine:
    def __init__(self, pipeline: Txt2Img, denoiser, policy, history: int = 10_000, cost=None,
                 slo_scale: float = 5.0, clock=time.monotonic, exit_rule: ExitRule | None = None,
                 early_exit: bool = False):
        self.pipeline = pipeline
        self.exit_rule = exit_rule or ExitRule()  # early exit: the server's rule
        self.early_exit = early_exit  # ... and whether it applies to requests that do not say
        self.denoiser = denoiser
        self.policy = policy
        self.cost = cost  # scheduler.CostModel: predicted step/join/finish times (None: no deadlines)
        self.slo_scale = slo_scale
        self.clock = clock
        self.last_advance: frozenset = frozenset()
        self.waiting: dict[str, RequestState] = {}
        self.running: dict[str, RequestState] = {}
        self.records: deque[StepRecord] = deque(maxlen=history)
        self.step_no = 0
        self._busy_end_s: float | None = None  # end of the last step, if work was left after it

    # -- membership ---------------------------------------------------------------------------------
    def add(self, state: RequestState) -> None:
        """Queue a request; its deadline is its slo_ms, else slo_scale x its predicted isolated latency."""
        if state.request_id in self.waiting or state.request_id in self.running:
            raise ValueError(f"request_id: already in flight, got {state.request_id!r}")
        choice = state.params.early_exit
        state.early_exit = self.early_exit if choice is None else bool(choice)
        if self.cost is not None:
            state.isolated_s = self.cost.isolated_s(state)
        if state.params.slo_ms is not None:
            state.deadline_s = state.arrival_s + state.params.slo_ms / 1e3
        elif self.cost is not None:
            state.deadline_s = state.arrival_s + self.slo_scale * state.isolated_s
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
        return EngineView(tuple(self.waiting.values()), tuple(self.running.values()), self.step_no,
                          self.last_advance)

    # -- the step ------------------------------------------------------------------------------------
    def step(self, now_s: float, clock=None, emit=None) -> list[RequestOutput]:
        """One engine step; returns its outputs. `emit`, if given, is handed each output the moment it
        exists: a request decoded first in a step is answered before the others' decodes."""
        outputs: list[RequestOutput] = []

        def put(out: RequestOutput) -> None:
            outputs.append(out)
            if emit is not None:
                emit(out)

        if self._busy_end_s is not None and self.cost is not None:  # the loop's own time between steps
            self.cost.observe_gap(now_s - self._busy_end_s)
        self._busy_end_s = None
        # (1) plan; drops are answered at once, degrades shorten waiting requests before they join
        plan = self.policy.schedule(self.view(), now_s)
        for rid, reason in plan.drop:
            out = self.abort(rid, now_s, FinishReason.DROPPED, DeadlineUnreachableError(reason))
            if out is not None:
                self._warn_drop(rid, reason, now_s)
                put(out)
        for rid, steps in plan.degrade:
            state = self.waiting.get(rid)
            if state is not None and steps < state.params.num_steps:
                state.asked_steps = state.asked_steps or state.params.num_steps
                state.params = replace(state.params, num_steps=steps)
            elif (state := self.running.get(rid)) is not None and state.step_index < steps < len(state.run.timesteps):
                state.asked_steps = state.asked_steps or state.params.num_steps
                self.pipeline.truncate(state.run, steps, clean=True)
        # (2) join: encode prompts, draw seeded noise
        for rid in plan.join:
            state = self.waiting.pop(rid)
            if self.cost is not None and state.isolated_s > 0:
                state.slack_at_join = (state.deadline_s - now_s - self.cost.alone_s(state)) / state.isolated_s
            t_join = self.clock()
            try:
                state.run = self.pipeline.start(state.params)
                if self.cost is not None:
                    self.cost.observe_start(self.clock() - t_join)
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the loop
                log.exception("[tessera] request %s failed to start", rid)
                state.done_s = now_s
                put(self._final(state, FinishReason.ERROR, error=e))
                continue
            state.joined_s = now_s
            self.running[rid] = state
        advancing = [self.running[rid] for rid in plan.advance if rid in self.running]
        self.last_advance = frozenset(s.request_id for s in advancing)
        if not advancing:
            return outputs
        # (3) one executor run for every advancing request
        before = tuple(s.step_index for s in advancing)
        shape = self.cost.shape(advancing) if self.cost is not None else None
        predicted = self.cost.predictor.predict(shape) if shape is not None else None
        t_step = self.clock()
        items = [self.pipeline.denoiser_inputs(s.run) for s in advancing]
        try:
            preds, stats = self.denoiser.run(items)
        except Exception as e:  # noqa: BLE001
            log.error("[tessera] denoiser failed on step %d (%d requests, sizes %s): %s", self.step_no,
                      len(advancing), sorted({s.size for s in advancing}), e)
            for s in advancing:
                self.running.pop(s.request_id, None)
                s.done_s = now_s
                put(self._final(s, FinishReason.ERROR, error=e))
            return outputs
        # (4) per-request sampler update; (5) progress, finish
        for s, pred in zip(advancing, preds, strict=True):
            self.pipeline.apply(s.run, pred)
            self._early_exit(s)
        measured = self.clock() - t_step
        if shape is not None:
            self.cost.predictor.observe(shape, measured)
        end_s = clock() if clock else now_s
        # Finishing requests are decoded one by one, earliest deadline first (as CostModel.finish_times
        # assumes): a small image is not held behind a big one's decode that has time to spare.
        for s in sorted(advancing, key=lambda s: s.deadline_s):
            s.step_s.append(end_s)
            if s.run.done:
                self.running.pop(s.request_id)
                t_finish = self.clock()
                try:
                    image = self.pipeline.finish(s.run)
                except Exception as e:  # noqa: BLE001
                    s.done_s = clock() if clock else end_s
                    put(self._final(s, FinishReason.ERROR, error=e))
                    continue
                s.done_s = clock() if clock else end_s
                reason = FinishReason.DEGRADED if s.asked_steps else FinishReason.COMPLETED
                put(self._final(s, reason, image=image))  # answered now (emit)
                if self.cost is not None:  # a finish holds the loop for its decode and its answer
                    self.cost.observe_finishes([(self.cost.cells(s), self.clock() - t_finish)])
            elif s.progress:
                preview = self.pipeline.preview(s.run) if s.preview else None
                put(RequestOutput(s.request_id, False, s.step_index, s.params.num_steps, preview))
        if self.has_work():
            self._busy_end_s = clock() if clock else None
        # (6) record
        self.records.append(
            StepRecord(
                self.step_no, now_s, end_s, tuple(s.request_id for s in advancing), before,
                tuple(s.size for s in advancing), stats.batch, stats.resolutions, stats.requests,
                predicted, measured,
            )
        )
        self.step_no += 1
        return outputs

    def _early_exit(self, s: RequestState) -> None:
        """(4b) The entropy rule: a request whose predicted clean latent has settled ends now, or after one
        last step straight to t = 0 (ExitRule.last_step)."""
        run, rule = s.run, self.exit_rule
        if not s.early_exit or run.done or run.jump_last or not rule.should_stop(run.entropies, s.params.num_steps):
            return
        s.exited = True
        total = run.step_index + (1 if rule.last_step == "jump" else 0)
        self.pipeline.truncate(run, total, clean=rule.last_step != "none")

    def _warn_drop(self, rid: str, reason: str, now_s: float) -> None:
        """WARNING for drops, at most one line per second (with the count since the last line)."""
        self._drops_unlogged = getattr(self, "_drops_unlogged", 0) + 1
        if now_s - getattr(self, "_last_drop_log_s", -math.inf) >= 1.0:
            log.warning("[tessera] dropped %d request(s), latest %s: %s", self._drops_unlogged, rid, reason)
            self._drops_unlogged, self._last_drop_log_s = 0, now_s

    def _final(self, s: RequestState, reason: FinishReason, image=None, error=None) -> RequestOutput:
        return RequestOutput(
            s.request_id, True, s.step_index, s.params.num_steps, image, error, reason, s.arrival_s, s.done_s,
            s.deadline_s, s.slack_at_join, s.size, s.asked_steps or s.params.num_steps, s.exited,
        )
