"""The step-level engine (PatchedServe §1): every in-flight request, one denoising step at a time.

`Engine.step()` is the whole contract, numbered as in the code:
  (1) the policy plans this step from a read-only view (who joins, who advances, who is dropped or
      degraded); drops are answered and degrades applied at once;
  (2) joining requests start: prompt encoding and seeded noise (Pipeline.start);
  (3) the adapters decide who of the advancing requests steps now and with which adapters (a request
      whose adapters are still loading at its step K sits the step out; adapters.py), then ONE denoiser
      executor run for every stepping request (the executor may batch by resolution, patches or tiles);
  (4) each request's own sampler takes its step (Pipeline.apply), then the entropy early-exit rule;
  (5) finished requests go to the decoder (decode.py: on the loop, earliest deadline first, or pipelined on
      a thread of its own beside the next steps) and are answered as their decodes are ready; progress events;
  (6) a StepRecord for metrics (appended before (5) answers: a final's metrics hold its last step).
  The cost model learns from what was measured along the way (joins, the step, each decode with its
  answer).
Failures are contained: a request whose own work raises (start, sampler, decode, preview) fails alone
with INTERNAL naming it; if the step as a whole raises (the plan, the denoiser run) every request of
that step is answered with INTERNAL and the engine stays usable. No threads and no Triton here: EngineLoop
(loop.py) owns the thread. One clock, `self.clock` (monotonic seconds; the simulator passes a virtual one).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from .adapters import NoAdapters
from .cost import CostModel
from .decode import LoopDecode
from .early_exit import ExitRule
from .errors import CancelledError, DeadlineUnreachableError, RequestFailedError
from .interfaces import Denoiser, Pipeline
from .options import LastStep
from .placement import OneWorker, groups_of
from .plan import EngineView, RequestOutput, StepPlan, StepRecord
from .request import FinishReason, RequestState
from .scheduler import Policy

log = logging.getLogger(__name__)

Emit = Callable[[RequestOutput], None]


class Engine:
    def __init__(self, pipeline: Pipeline, denoiser: Denoiser, policy: Policy, cost: CostModel | None = None,
                 slo_scale: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 exit_rule: ExitRule | None = None, early_exit: bool = False, history: int = 10_000,
                 adapters=None, placer=None, decoder=None):
        self.pipeline = pipeline
        self.denoiser = denoiser
        self.policy = policy
        self.cost = cost  # predicted step/join/finish times (None: no deadlines, nothing learned)
        self.slo_scale = slo_scale
        self.clock = clock
        self.exit_rule = exit_rule or ExitRule()  # early exit: the server's rule ...
        self.early_exit = early_exit  # ... and whether it applies to requests that do not say
        self.adapters = adapters or NoAdapters()  # per-request adapters (adapters.py): admit, gate, release
        self.placer = placer or OneWorker()  # which denoiser workers run whom (placement.py; one worker: none)
        self.decoder = decoder or LoopDecode(pipeline, clock)  # where finished requests decode (decode.py)
        self.finishing: dict[str, RequestState] = {}  # handed to the decoder, not answered yet
        self.last_places: dict[str, tuple[int, ...]] = {}
        self.waiting: dict[str, RequestState] = {}
        self.running: dict[str, RequestState] = {}
        self.records: deque[StepRecord] = deque(maxlen=history)
        self.step_no = 0
        self.last_advance: frozenset[str] = frozenset()
        self._busy_end_s: float | None = None  # end of the last step, if work was left after it
        self._drops_unlogged, self._last_drop_log_s = 0, -math.inf

    # -- membership ---------------------------------------------------------------------------------
    def admit(self, state: RequestState) -> None:
        """Resolve a newcomer's early-exit choice, predicted isolated latency and deadline (its slo_ms,
        else slo_scale x isolated), and give the placer its arrival (round-robin's turn; the placer locks its own
        state). Reads only the cost model otherwise: safe before the request is added."""
        choice = state.params.early_exit
        state.early_exit = self.early_exit if choice is None else bool(choice)
        self.placer.arrive(state)  # round-robin's turn is taken at arrival
        if self.cost is not None:
            state.isolated_s = self.cost.isolated_s(state)
        if state.params.slo_ms is not None:
            state.deadline_s = state.arrival_s + state.params.slo_ms / 1e3
        elif self.cost is not None:
            state.deadline_s = state.arrival_s + self.slo_scale * state.isolated_s

    def add(self, state: RequestState, admitted: bool = False) -> None:
        """Queue a request (admitting it first unless the caller already did)."""
        if state.request_id in self.waiting or state.request_id in self.running:
            raise ValueError(f"request_id: already in flight, got {state.request_id!r}")
        if not admitted:
            self.admit(state)
        self.adapters.admit(state)  # adapter loads start now, off the step loop
        self.waiting[state.request_id] = state

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED,
              error: Exception | None = None) -> RequestOutput | None:
        """Remove a request at a step boundary and free its state; None if it is not in flight."""
        state = (self.waiting.pop(request_id, None) or self.running.pop(request_id, None)
                 or self.finishing.pop(request_id, None))  # a decode still running is not waited for
        if state is None:
            return None
        if not self.has_work():
            self.idle()
        state.done_s = self.clock()
        if error is None and reason is FinishReason.CANCELLED:
            error = CancelledError("request cancelled")
        return self._final(state, reason, error=error)

    def idle(self) -> None:
        """The engine waits for work: the time until the next step is nobody's (not a loop gap)."""
        self._busy_end_s = None

    @property
    def in_flight(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.finishing)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.finishing)

    def _stepping(self) -> bool:
        return bool(self.waiting or self.running)

    def view(self) -> EngineView:
        return EngineView(tuple(self.waiting.values()), tuple(self.running.values()), self.step_no,
                          self.last_advance, tuple(self.last_places.items()), self.placer.workers)

    def snapshot(self) -> EngineView:
        """The view with frozen copies: for planning on another thread (early refusal) while steps run."""
        return EngineView(tuple(s.frozen() for s in self.waiting.values()),
                          tuple(s.frozen() for s in self.running.values()), self.step_no, self.last_advance,
                          tuple(self.last_places.items()), self.placer.workers)

    # -- the step ------------------------------------------------------------------------------------
    def step(self, emit: Emit | None = None) -> list[RequestOutput]:
        """One engine step; returns its outputs. `emit`, if given, is handed each output the moment it
        exists: a request decoded first in a step is answered before the others' decodes."""
        outputs: list[RequestOutput] = []

        def put(out: RequestOutput | None) -> None:
            if out is not None:
                outputs.append(out)
                if emit is not None:
                    emit(out)

        self._answer_decoded(put, wait_s=0.0 if self._stepping() else 0.005)  # decodes done meanwhile
        if not self._stepping():
            return outputs  # only decodes in flight: nothing to plan
        now_s = self.clock()
        self._observe_gap(now_s)
        involved = (*self.waiting, *self.running)  # answered with INTERNAL if the step fails as a whole
        try:
            plan = self.policy.schedule(self.view(), now_s)  # (1)
            involved = (*plan.join, *plan.advance)
            self._apply_plan(plan, put)
            self._join(plan.join, now_s, put)  # (2)
            gate = self.adapters.gate([self.running[rid] for rid in plan.advance if rid in self.running])
            for s, e in gate.failed:  # (3a) adapters: who steps now and with which; a failed load fails alone
                put(self._fail(self.running.pop(s.request_id), "adapter load", e))
            # the plan's members stay members while the adapters make some sit a step out (rounds keeps them)
            self.last_advance = frozenset(rid for rid in plan.advance if rid in self.running)
            involved = tuple(s.request_id for s in gate.step)  # who sat the step out did not run: not failed
            places = self.placer.place(list(gate.step), dict(plan.place))  # (3b) which workers run whom
            self.last_places = dict(zip((s.request_id for s in gate.step), places or (), strict=False))
            if gate.step:
                self._advance(list(gate.step), gate.rows, gate.controls, places, now_s, put)  # (3)-(6)
        except Exception as e:  # noqa: BLE001 - the step's requests are answered, the engine goes on
            self._fail_step(involved, e, put)
        if self._stepping():
            self._busy_end_s = self.clock()
        return outputs

    def _apply_plan(self, plan: StepPlan, put: Emit) -> None:
        """(1) Drops are answered at once; degrades shorten waiting requests before they join and give
        running ones a step budget that ends with one last step to t = 0."""
        for rid, reason in plan.drop:
            out = self.abort(rid, FinishReason.DROPPED, DeadlineUnreachableError(reason))
            if out is not None:
                self._warn_drop(rid, reason)
                put(out)
        for rid, steps in plan.degrade:
            if (state := self.waiting.get(rid)) is not None and steps < state.params.num_steps:
                state.asked_steps = state.asked_steps or state.params.num_steps
                state.params = replace(state.params, num_steps=steps)
            elif (state := self.running.get(rid)) is not None and state.step_index < steps < state.step_index + state.steps_left:
                state.asked_steps = state.asked_steps or state.params.num_steps
                try:
                    self.pipeline.truncate(state.run, steps, clean=True)
                except Exception as e:  # noqa: BLE001 - one request's own work: it alone fails
                    put(self._fail(self.running.pop(rid), "degrade", e))

    def _join(self, join: tuple[str, ...], now_s: float, put: Emit) -> None:
        """(2) Encode prompts and draw seeded noise; a request that fails to start fails alone."""
        for rid in join:  # a request stays in `waiting` or `running` until answered: never lost
            state = self.waiting[rid]
            if self.cost is not None and state.isolated_s > 0:
                state.slack_at_join = (state.deadline_s - now_s - self.cost.alone_s(state)) / state.isolated_s
            t0 = self.clock()
            try:
                state.run = self.pipeline.start(state.params)
            except Exception as e:  # noqa: BLE001
                put(self._fail(self.waiting.pop(rid), "prompt encoding", e))
                continue
            if self.cost is not None:
                self.cost.observe_start(self.clock() - t0)
            state.joined_s = now_s
            self.running[rid] = self.waiting.pop(rid)

    def _advance(self, batch: list[RequestState], rows, controls, places, now_s: float, put: Emit) -> None:
        before = tuple(s.step_index for s in batch)
        adapted = [bool(a) for a in rows] if rows is not None else [False] * len(batch)
        groups = groups_of(batch, adapted, places)  # one per worker set (one group on one worker)
        predicted = self.cost.sets_s(groups) if self.cost is not None else None
        t0 = self.clock()
        # (3) one executor run for every advancing request (if it raises, the step fails as a whole)
        preds, stats = self.denoiser.run([self.pipeline.denoiser_inputs(s.run) for s in batch],
                                         list(rows) if rows is not None else None,
                                         list(controls) if controls is not None else None, places)
        # (4) each request's sampler update and the early-exit rule; a failure fails that request alone
        for s, pred in zip(batch, preds, strict=True):
            try:
                self.pipeline.apply(s.run, pred)
                self._early_exit(s)
            except Exception as e:  # noqa: BLE001
                put(self._fail(self.running.pop(s.request_id), "sampler update", e))
        measured = self.clock() - t0
        if self.cost is not None:
            self.cost.observe_step(groups, measured)
        end_s = self.clock()
        # (6) the StepRecord, written before anyone is answered: a final's metrics include its own last step
        self.records.append(StepRecord(
            self.step_no, now_s, end_s, tuple(s.request_id for s in batch), before, tuple(s.size for s in batch),
            stats.batch, stats.resolutions, stats.requests, predicted, measured, tuple(len(p) for p in places or ()),
        ))
        self.step_no += 1
        # (5) finished requests to the decoder, earliest deadline first (as CostModel.finish_times assumes),
        # each answered as soon as its decode is ready: a small image is not held behind a big one's decode
        for s in sorted(batch, key=lambda s: s.deadline_s):
            if s.request_id not in self.running:
                continue  # failed in (4)
            s.step_s.append(end_s)
            if not s.run.done:
                put(self._progress(s))
                continue
            self.finishing[s.request_id] = self.running.pop(s.request_id)
            self.decoder.submit(s)
            self._answer_decoded(put)

    def _answer_decoded(self, put: Emit, wait_s: float = 0.0) -> None:
        """Answer every decode the decoder has ready (waiting up to `wait_s` for one); a request aborted
        meanwhile was answered already."""
        for d in self.decoder.collect(wait_s):
            s = self.finishing.pop(d.state.request_id, None)
            if s is None:
                continue
            if d.error is not None:
                put(self._fail(s, "decode", d.error))
                continue
            s.done_s = d.done_s
            t0 = self.clock()
            put(self._final(s, FinishReason.DEGRADED if s.asked_steps else FinishReason.COMPLETED, image=d.image))
            # a finish holds the loop for its answer, and on the loop for its decode: the cost model learns both
            self._observe_finish(s, d.seconds + self.clock() - t0)

    def _observe_finish(self, s: RequestState, seconds: float) -> None:
        if self.cost is None:
            return
        try:
            self.cost.observe_finishes([(self.cost.cells(s), seconds)])
        except Exception:  # noqa: BLE001 - learning must not fail a request already answered
            log.exception("[tessera] cost model update failed after %s", s.request_id)

    def _progress(self, s: RequestState) -> RequestOutput | None:
        if not s.progress:
            return None
        try:
            preview = self.pipeline.preview(s.run) if s.preview else None
        except Exception as e:  # noqa: BLE001
            return self._fail(self.running.pop(s.request_id), "preview", e)
        return RequestOutput(s.request_id, False, s.step_index, s.params.num_steps, preview)

    def _early_exit(self, s: RequestState) -> None:
        """(4b) The entropy rule: a request whose predicted clean latent has settled ends now, or after one
        last step straight to t = 0 (ExitRule.last_step)."""
        run, rule = s.run, self.exit_rule
        if not s.early_exit or run.done or run.jump_last or not rule.should_stop(run.entropies, s.params.num_steps):
            return
        s.exited = True
        total = run.step_index + (1 if rule.last_step is LastStep.JUMP else 0)
        self.pipeline.truncate(run, total, clean=rule.last_step is not LastStep.NONE)

    def _observe_gap(self, now_s: float) -> None:
        """The loop's own time between busy steps (responses, admissions, cancellation checks)."""
        if self._busy_end_s is not None and self.cost is not None:
            self.cost.observe_gap(now_s - self._busy_end_s)
        self._busy_end_s = None

    def _fail(self, s: RequestState, stage: str, e: Exception) -> RequestOutput:
        """One request's own work raised: it alone fails, with INTERNAL naming it and the stage."""
        log.error("[tessera] request %s failed in %s: %s: %s", s.request_id, stage, type(e).__name__, e)
        s.done_s = self.clock()
        error = RequestFailedError(f"request {s.request_id}: {stage} failed: {type(e).__name__}: {e}")
        return self._final(s, FinishReason.ERROR, error=error)

    def _fail_step(self, involved: tuple[str, ...], e: Exception, put: Emit) -> None:
        """The step as a whole raised: each of its requests still in flight is answered with INTERNAL."""
        sizes = sorted({s.size for rid in involved if (s := self.running.get(rid) or self.waiting.get(rid))})
        log.exception("[tessera] engine step %d failed (%d requests, sizes %s)", self.step_no, len(involved), sizes)
        error = RequestFailedError(f"engine step {self.step_no} failed: {type(e).__name__}: {e}")
        for rid in dict.fromkeys(involved):
            put(self.abort(rid, FinishReason.ERROR, error))
        self.step_no += 1

    def _warn_drop(self, rid: str, reason: str) -> None:
        """WARNING for drops, at most one line per second (with the count since the last line)."""
        self._drops_unlogged += 1
        now_s = self.clock()
        if now_s - self._last_drop_log_s >= 1.0:
            log.warning("[tessera] dropped %d request(s), latest %s: %s", self._drops_unlogged, rid, reason)
            self._drops_unlogged, self._last_drop_log_s = 0, now_s

    def _final(self, s: RequestState, reason: FinishReason, image=None, error=None) -> RequestOutput:
        self.adapters.release(s.request_id)  # every answer passes here: its adapters are unpinned
        return RequestOutput(
            s.request_id, True, s.step_index, s.params.num_steps, image, error, reason, s.arrival_s, s.done_s,
            s.deadline_s, s.slack_at_join, s.size, s.asked_steps or s.params.num_steps, s.exited,
        )
