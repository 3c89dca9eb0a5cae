"""Bounded asynchronous LoRA loading (BAL, SwiftDiffusion; ../shared/reference/papers.md §3.3) and the
per-step grouping of denoiser rows by adapter set (issue 14).

Pure: the engine asks `Bal.step` at each step boundary what a request with adapters does next, and
`group_rows` how one step's rows apply theirs; the torch side consumes the frozen answers.

BAL rule, at the boundary before a request's step `step_index` (0-based: steps already run):
  - every adapter of its set in memory: JOIN (applied from this step on; `joined_at_step = step_index`, the
    steps it ran without them), and WITH at every later step;
  - else, before step K: RUN_WITHOUT (this step runs on the base model while the loader works);
  - else (still missing at step K): WAIT (the request sits out this step; every other request steps);
  - any adapter failed to load: FAIL, with the LoraLoadError to answer the request with (never a hang).
K is the smallest over the set's adapters (each from its profile or the server default), and never beyond
the request's last step (K <= total_steps - 1): no request finishes without its adapters. K = 0 is the
synchronous load: the request waits before its first step.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .lora_cache import LoadState, LoraLoader, LoraLoadError
from .lora_spec import NO_LORA, LoraSet


class BalAction(str, enum.Enum):
    BASE = "base"  # the request asked for no adapter
    RUN_WITHOUT = "run_without"  # adapters loading, before step K: this step runs without them
    JOIN = "join"  # adapters in memory: applied from this step on
    WITH = "with"  # joined at an earlier step
    WAIT = "wait"  # adapters still missing at step K: sit out this step
    FAIL = "fail"  # an adapter failed to load: answer the request with `error`


@dataclass(frozen=True, slots=True)
class BalDecision:
    action: BalAction
    lora: LoraSet  # the adapters this step applies to the request's rows (NO_LORA unless JOIN or WITH)
    step_index: int  # steps the request has run
    k: int  # effective K: the step at which a missing adapter makes it wait
    joined_at_step: int | None = None  # set from JOIN on: steps it ran before its adapters joined
    missing: tuple[str, ...] = ()  # adapters not in memory yet (RUN_WITHOUT, WAIT, FAIL)
    error: LoraLoadError | None = None  # FAIL only

    @property
    def runs(self) -> bool:
        """Whether the request takes this step (WAIT and FAIL do not)."""
        return self.action not in (BalAction.WAIT, BalAction.FAIL)


def effective_k(k: int, total_steps: int) -> int:
    """K clamped to [0, total_steps - 1]: the last step always runs with the adapters."""
    return max(0, min(k, total_steps - 1))


def decide(lora: LoraSet, step_index: int, k: int, total_steps: int, states: Mapping[str, LoadState],
           joined_at_step: int | None = None,
           errors: Mapping[str, LoraLoadError] | None = None) -> BalDecision:
    """The BAL rule (module docstring) for one request at one step boundary. `states` holds the load state
    of each adapter of `lora` (a name absent from it counts as missing), `errors` the failures by name."""
    k = effective_k(k, total_steps)
    if not lora:
        return BalDecision(BalAction.BASE, NO_LORA, step_index, k)
    if joined_at_step is not None:
        return BalDecision(BalAction.WITH, lora, step_index, k, joined_at_step)
    missing = tuple(n for n in lora.names if states.get(n) is not LoadState.READY)
    failed = [n for n in missing if states.get(n) is LoadState.FAILED]
    if failed:
        error = (errors or {}).get(failed[0])
        if error is None:
            error = LoraLoadError(failed[0], RuntimeError("load failed"))
        return BalDecision(BalAction.FAIL, NO_LORA, step_index, k, missing=missing, error=error)
    if not missing:
        return BalDecision(BalAction.JOIN, lora, step_index, k, joined_at_step=step_index)
    if step_index < k:
        return BalDecision(BalAction.RUN_WITHOUT, NO_LORA, step_index, k, missing=missing)
    return BalDecision(BalAction.WAIT, NO_LORA, step_index, k, missing=missing)


@dataclass(frozen=True, slots=True)
class BalCounters:
    """BAL's metrics since start (the loader's LoaderStats and the cache's CacheStats hold loads, hits and
    bytes)."""

    requests: int  # requests admitted with adapters
    joins: int
    joined_before_first_step: int  # joins at step 0: cached, loaded in time, or K = 0
    steps_before_join: int  # steps run without their adapters, summed over joins
    wait_steps: int  # step boundaries at which a request sat out, waiting at K
    requests_waited: int  # requests that waited at K at least once
    failures: int  # requests answered with a LoraLoadError
    active: int  # requests with adapters now admitted and not finished


@dataclass(slots=True)
class _Track:
    lora: LoraSet
    k: int  # as profiled for the request's steps, before effective_k
    joined_at_step: int | None = None
    waited: bool = False
    failed: bool = False


class Bal:
    """BAL for every request in flight; called by the engine on its loop thread only.

    `admit` at join (requests the loads, pins the adapters, fixes K), `step` once per step boundary at which
    the request could run, `finish` when it is answered in any way (releases the pins)."""

    def __init__(self, loader: LoraLoader, k_for: Callable[[str, int], int]) -> None:
        """`k_for(name, steps)`: an adapter's K for a request of `steps` steps (the registry's `k_for` with
        the server's default K bound in)."""
        self.loader = loader
        self._k_for = k_for
        self._tracks: dict[str, _Track] = {}
        self._requests = self._joins = self._joined_first = self._steps_before = 0
        self._wait_steps = self._waited = self._failures = 0

    def admit(self, request_id: str, lora: LoraSet, num_steps: int) -> int:
        """Start loading `lora` for `request_id` (returns at once) and return its K (the smallest of its
        adapters'; 0 without adapters)."""
        if request_id in self._tracks:
            raise ValueError(f"Bal.admit: request {request_id!r} admitted twice")
        if not lora:
            return 0
        k = min(self._k_for(name, num_steps) for name in lora.names)
        for name in lora.names:
            self.loader.request(name)
        self._tracks[request_id] = _Track(lora, k)
        self._requests += 1
        return k

    def step(self, request_id: str, step_index: int, total_steps: int) -> BalDecision:
        """What `request_id` does at this step boundary (module docstring). Requests admitted without
        adapters (or never admitted) get BASE."""
        track = self._tracks.get(request_id)
        if track is None:
            return decide(NO_LORA, step_index, 0, total_steps, {})
        states = {name: self.loader.state(name) for name in track.lora.names}
        errors = {name: e for name in track.lora.names if (e := self.loader.error(name)) is not None}
        decision = decide(track.lora, step_index, track.k, total_steps, states, track.joined_at_step, errors)
        if decision.action is BalAction.JOIN:
            track.joined_at_step = step_index
            self._joins += 1
            self._steps_before += step_index
            self._joined_first += step_index == 0
        elif decision.action is BalAction.WAIT:
            self._wait_steps += 1
            self._waited += not track.waited
            track.waited = True
        elif decision.action is BalAction.FAIL:
            self._failures += not track.failed
            track.failed = True
        return decision

    def finish(self, request_id: str) -> None:
        """The request is answered (completed, failed, dropped or cancelled): release its adapters."""
        track = self._tracks.pop(request_id, None)
        if track is not None:
            for name in track.lora.names:
                self.loader.release(name)

    def waiting_for(self) -> frozenset[str]:
        """Adapters that admitted, not yet joined requests still miss: with nothing else to step, the loop
        may block on the loader (`wait`, or its `on_done`) for these instead of spinning."""
        return frozenset(name for t in self._tracks.values() if t.joined_at_step is None
                         for name in t.lora.names if not self.loader.ready(name))

    def counters(self) -> BalCounters:
        return BalCounters(self._requests, self._joins, self._joined_first, self._steps_before,
                           self._wait_steps, self._waited, self._failures, len(self._tracks))


class LoraMode(str, enum.Enum):
    NONE = "none"  # no row of the step has an adapter
    MERGED = "merged"  # every row has the same non-empty set: merge it into the weights for the step
    BATCHED = "batched"  # rows differ (some may have none): per-row y = W x + sum_r s_r B_r A_r x


@dataclass(frozen=True, slots=True)
class LoraRowPlan:
    """How one denoiser call applies adapters, row by row (rows in the executor's order, CFG halves
    included when the caller lists them)."""

    mode: LoraMode
    adapters: tuple[str, ...]  # the step's distinct adapters, sorted by name; row entries index into it
    rows: tuple[tuple[tuple[int, float], ...], ...]  # [row] -> ((adapter index, scale), ...), name order
    merged: LoraSet = NO_LORA  # MERGED: the one set every row has

    def scales(self) -> tuple[tuple[float, ...], ...]:
        """Dense [row][adapter] scales (0.0 where a row does not use an adapter)."""
        dense = []
        for row in self.rows:
            line = [0.0] * len(self.adapters)
            for index, scale in row:
                line[index] = scale
            dense.append(tuple(line))
        return tuple(dense)


def group_rows(lora_sets: Sequence[LoraSet]) -> LoraRowPlan:
    """One step's rows -> MERGED when every row has the same non-empty set, NONE when no row has any,
    BATCHED otherwise (each row its own set, rows without adapters included)."""
    adapters = tuple(sorted({name for s in lora_sets for name in s.names}))
    index = {name: i for i, name in enumerate(adapters)}
    rows = tuple(tuple((index[name], scale) for name, scale in s.entries) for s in lora_sets)
    if not adapters:
        return LoraRowPlan(LoraMode.NONE, (), rows)
    first = lora_sets[0]
    if all(s == first for s in lora_sets):
        return LoraRowPlan(LoraMode.MERGED, adapters, rows, first)
    return LoraRowPlan(LoraMode.BATCHED, adapters, rows)
