"""Request scheduling policies (PatchedServe §1.8, TetriServe §5). A policy reads an EngineView and
returns a StepPlan (who joins, who advances, who is dropped or degraded); it never touches request
state, tensors or executors, so perf/simulate.py replays the same code on a virtual clock.

  image-fcfs  the Triton tutorial's behaviour: one request's whole loop at a time, batching only
              same-resolution requests waiting together; nobody joins mid-loop.
  step-fcfs   continuous batching, first come first served.
  slack       least slack first; a schedulability test never admits a request that would make an
              on-time active request late; throughput mode (admit FCFS) while every slack is relaxed;
              hopeless requests dropped or degraded.
  rounds      re-plan every g steps: EDF packing of running + waiting requests into the batch,
              keeping only sets in which every member still meets its deadline (most requests on time);
              the rest wait (running ones pause); hopeless requests dropped or degraded.
"""

from __future__ import annotations

import math

from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from .engine import EngineView, RequestState, StepPlan
from .errors import ConfigError
from .predictor import STEP_FEATURES, BatchShape, LatencyPredictor

HOPELESS = ("drop", "degrade")


@dataclass
class CostModel:
    """Predicted time of steps, joins (prompt encoding) and finishes (VAE decode) on one engine. Seeded by
    the start-up profile; the engine keeps every term current from what it serves (the predictor is
    refit from served steps, joins and finishes from served joins and decodes, the loop gap measured)."""

    predictor: LatencyPredictor
    vae_factor: int
    start_s: float = 0.0  # per joining request
    finish_base_s: float = 0.0  # per finishing request
    finish_s_per_cell: float = 0.0
    gap_s: float = 0.0  # loop time between engine steps (responses, admissions, cancellation checks),
    # measured by the engine while it is busy; part of every step as the policies plan it
    gaps: int = 0  # gaps observed, and their total (for the long-run mean)
    gap_total_s: float = 0.0
    finishes: deque = field(default_factory=lambda: deque(maxlen=64))  # recent (latent cells, seconds)

    def observe_gap(self, seconds: float, alpha: float = 0.05) -> None:
        seconds = max(seconds, 0.0)
        self.gap_s += alpha * (seconds - self.gap_s)
        self.gaps += 1
        self.gap_total_s += seconds

    def observe_start(self, seconds: float, alpha: float = 0.05) -> None:
        self.start_s += alpha * (max(seconds, 0.0) - self.start_s)

    def cells(self, s: RequestState) -> int:
        return (s.params.height // self.vae_factor) * (s.params.width // self.vae_factor)

    def observe_finishes(self, samples) -> None:
        """(latent cells, seconds) of decodes; finish = base + per_cell x cells, least squares over the
        recent window (one size only in the window: the line is rescaled to it)."""
        self.finishes.extend(samples)
        cells = np.array([c for c, _ in self.finishes], dtype=np.float64)
        secs = np.array([t for _, t in self.finishes], dtype=np.float64)
        if len(cells) == 0:
            return
        if len(set(cells.tolist())) > 1:
            per_cell = max(float(np.polyfit(cells, secs, 1)[0]), 0.0)
            self.finish_s_per_cell = per_cell
            self.finish_base_s = max(float(np.mean(secs - per_cell * cells)), 0.0)
        else:
            now = self.finish_base_s + self.finish_s_per_cell * cells[0]
            if now > 0:
                k = float(np.mean(secs)) / now
                self.finish_base_s, self.finish_s_per_cell = self.finish_base_s * k, self.finish_s_per_cell * k
            else:
                self.finish_s_per_cell = float(np.mean(secs)) / max(cells[0], 1.0)

    def terms(self) -> dict[str, float]:
        """Every number the policies plan with (exported as metrics; the simulator can replay them)."""
        return {"start_s": self.start_s, "finish_base_s": self.finish_base_s,
                "finish_s_per_cell": self.finish_s_per_cell, "gap_s": self.gap_s,
                **{f"step_{n}": float(c) for n, c in zip(STEP_FEATURES, self.predictor.coef, strict=True)}}

    @classmethod
    def from_terms(cls, terms: dict[str, float], vae_factor: int) -> CostModel:
        pred = LatencyPredictor()
        pred.coef = np.array([terms[f"step_{n}"] for n in STEP_FEATURES], dtype=np.float64)
        return cls(pred, vae_factor, terms["start_s"], terms["finish_base_s"], terms["finish_s_per_cell"],
                   terms["gap_s"])

    def shape(self, states) -> BatchShape:
        f = self.vae_factor
        return BatchShape(tuple((s.params.height // f, s.params.width // f, 2 if s.params.do_cfg else 1) for s in states))

    def step_s(self, states) -> float:
        return self.predictor.predict(self.shape(states)) + self.gap_s if states else 0.0

    def finish_s(self, s: RequestState) -> float:
        return self.finish_base_s + self.finish_s_per_cell * self.cells(s)

    def alone_s(self, s: RequestState, steps: int | None = None) -> float:
        """Remaining time if `s` ran alone from now (join included if it has not started)."""
        steps = s.steps_left if steps is None else steps
        return (self.start_s if s.run is None else 0.0) + steps * self.step_s([s]) + self.finish_s(s)

    def isolated_s(self, s: RequestState) -> float:
        return self.start_s + s.params.num_steps * self.step_s([s]) + self.finish_s(s)

    def finish_times(self, states, now_s: float) -> dict[str, float]:
        """Predicted finish of each request if `states` run together from now, nobody else joining:
        the batch shrinks as members finish; joins and decodes hold the (single) loop (the engine decodes
        requests finishing together earliest deadline first)."""
        t = now_s + sum(self.start_s for s in states if s.run is None)
        active = sorted(states, key=lambda s: (s.steps_left, s.deadline_s))  # decodes: earliest deadline first
        done_steps = 0
        out = {}
        while active:
            k = active[0].steps_left - done_steps
            t += k * self.step_s(active)
            done_steps += k
            while active and active[0].steps_left - done_steps <= 0:
                s = active.pop(0)
                t += self.finish_s(s)
                out[s.request_id] = t
        return out


def _on_time(cost: CostModel, states, now_s: float, must: set[str], margin: float = 0.0) -> bool:
    ft = cost.finish_times(states, now_s)
    return all(_fits(ft[s.request_id], s, now_s, margin) for s in states if s.request_id in must)


def _fits(finish_s: float, s: RequestState, now_s: float, margin: float) -> bool:
    """A predicted finish meets the deadline with the time still to run stretched by `margin`."""
    return now_s + (finish_s - now_s) * (1.0 + margin) <= s.deadline_s


class _DeadlinePolicy:
    """Shared by slack and rounds: hopeless handling (drop, or degrade to fewer steps: re-spaced at join,
    cut short with one last step while running)."""

    def __init__(self, max_batch: int, cost: CostModel, on_hopeless: str = "drop", min_steps: int = 4,
                 margin: float = 0.1):
        if on_hopeless not in HOPELESS:
            raise ConfigError(f"on_hopeless: unknown value; allowed {', '.join(HOPELESS)}, got {on_hopeless!r}")
        self.max_batch, self.cost, self.on_hopeless, self.min_steps = max_batch, cost, on_hopeless, min_steps
        self.margin = margin  # planned time still to run is stretched by this fraction (jitter)

    def hopeless(self, s: RequestState, now_s: float) -> bool:
        return now_s + self.cost.alone_s(s) > s.deadline_s

    def triage(self, view: EngineView, now_s: float):
        """(waiting kept, running kept, drop, degrade) after removing or shortening hopeless requests;
        degraded waiting requests are returned as view copies with their fewer steps."""
        drop, degrade, waiting, running = [], [], [], []
        for s in view.waiting:
            if not self.hopeless(s, now_s):
                waiting.append(s)
                continue
            steps = self._fitting_steps(s, now_s) if self.on_hopeless == "degrade" else 0
            if steps >= min(self.min_steps, s.params.num_steps):
                degrade.append((s.request_id, steps))
                waiting.append(s)
            else:
                drop.append((s.request_id, self._reason(s, now_s)))
        for s in view.running:
            if not self.hopeless(s, now_s):
                running.append(s)
                continue
            # Degrade a running request: its remaining steps lowered to what the deadline allows, the
            # last one straight to t = 0 (never below the floor; below it, it is dropped like a waiting one).
            total = s.step_index + max(self._fitting_steps(s, now_s, joined=True), 1)
            if self.on_hopeless == "degrade" and total >= min(self.min_steps, s.params.num_steps):
                if total < s.step_index + s.steps_left:
                    degrade.append((s.request_id, total))
                running.append(s)
            else:
                drop.append((s.request_id, self._reason(s, now_s)))
        shorter = dict(degrade)
        waiting = [_with_total(s, shorter[s.request_id]) if s.request_id in shorter else s for s in waiting]
        running = [_with_total(s, shorter[s.request_id]) if s.request_id in shorter else s for s in running]
        return waiting, running, tuple(drop), tuple(degrade)

    def _fitting_steps(self, s: RequestState, now_s: float, joined: bool = False) -> int:
        """Steps that fit before the deadline if `s` ran alone from now."""
        per = self.cost.step_s([s])
        budget = s.deadline_s - now_s - (0.0 if joined else self.cost.start_s) - self.cost.finish_s(s)
        return int(budget // per) if per > 0 else s.params.num_steps

    def _reason(self, s: RequestState, now_s: float) -> str:
        finish_ms = (now_s + self.cost.alone_s(s) - s.arrival_s) * 1e3
        return (f"deadline cannot be met: predicted finish {finish_ms:.0f} ms after arrival even if run alone, "
                f"deadline {(s.deadline_s - s.arrival_s) * 1e3:.0f} ms")


@dataclass(frozen=True)
class _Budget:
    """Stands in for a running request's run in a view copy: its progress under a lowered step total."""

    step_index: int
    steps_left: int


def _with_total(s: RequestState, total: int) -> RequestState:
    """A view copy of `s` that ends after `total` steps (for predictions only): a waiting request with
    fewer steps, a running one with a lowered budget."""
    if s.run is None:
        return replace(s, params=replace(s.params, num_steps=total))
    return replace(s, run=_Budget(s.step_index, max(total - s.step_index, 0)))


class StepFcfsPolicy:
    name = "step-fcfs"

    def __init__(self, max_batch: int = 16, **_):
        self.max_batch = max_batch

    def schedule(self, view: EngineView, now_s: float) -> StepPlan:
        room = max(self.max_batch - len(view.running), 0)
        join = tuple(s.request_id for s in view.waiting[:room])
        return StepPlan(join, tuple(s.request_id for s in view.running) + join)


class ImageFcfsPolicy:
    name = "image-fcfs"

    def __init__(self, max_batch: int = 16, **_):
        self.max_batch = max_batch

    def schedule(self, view: EngineView, now_s: float) -> StepPlan:
        if view.running:
            return StepPlan((), tuple(s.request_id for s in view.running))
        if not view.waiting:
            return StepPlan.make_empty()
        size = view.waiting[0].size
        join = tuple(s.request_id for s in view.waiting if s.size == size)[: self.max_batch]
        return StepPlan(join, join)


class SlackPolicy(_DeadlinePolicy):
    name = "slack"

    def __init__(self, max_batch: int = 16, cost: CostModel | None = None, on_hopeless: str = "drop",
                 min_steps: int = 4, relaxed_slack: float = 2.0, margin: float = 0.1, **_):
        super().__init__(max_batch, cost, on_hopeless, min_steps, margin)
        self.relaxed_slack = relaxed_slack

    def slack(self, s: RequestState, now_s: float) -> float:
        """(deadline - now - predicted remaining alone) / isolated latency."""
        return (s.deadline_s - now_s - self.cost.alone_s(s)) / max(s.isolated_s, 1e-9)

    def schedule(self, view: EngineView, now_s: float) -> StepPlan:
        waiting, running, drop, degrade = self.triage(view, now_s)
        batch = list(running)
        everyone = batch + waiting
        relaxed = everyone and min(self.slack(s, now_s) for s in everyone) > self.relaxed_slack
        join = []
        if relaxed:  # throughput mode: nobody is close to a deadline, fill the batch in arrival order
            for s in waiting[: max(self.max_batch - len(batch), 0)]:
                join.append(s)
            batch += join
        else:
            on_time = {s.request_id for s, t in zip(batch, self._finishes(batch, now_s), strict=True)
                       if _fits(t, s, now_s, self.margin)}
            for s in sorted(waiting, key=lambda s: self.slack(s, now_s)):
                if len(batch) >= self.max_batch:
                    break
                if _on_time(self.cost, batch + [s], now_s, on_time | {s.request_id}, self.margin):
                    batch.append(s)
                    join.append(s)
                    on_time.add(s.request_id)
        ids = tuple(s.request_id for s in join)
        return StepPlan(ids, tuple(s.request_id for s in running) + ids, drop, degrade)

    def _finishes(self, batch, now_s):
        ft = self.cost.finish_times(batch, now_s)
        return [ft[s.request_id] for s in batch]


class RoundsPolicy(_DeadlinePolicy):
    name = "rounds"

    def __init__(self, max_batch: int = 16, cost: CostModel | None = None, on_hopeless: str = "drop",
                 min_steps: int = 4, round_steps: int = 5, margin: float = 0.1, **_):
        super().__init__(max_batch, cost, on_hopeless, min_steps, margin)
        self.round_steps = round_steps

    def schedule(self, view: EngineView, now_s: float) -> StepPlan:
        boundary = view.step_no % self.round_steps == 0 or not (view.last_advance & {s.request_id for s in view.running})
        if not boundary:  # members keep running; nobody joins until the next re-plan (a work-conserving
            # fill between re-plans was measured worse under overload: SAR 0.56 vs 0.62 at 2x, docs)
            keep = tuple(s.request_id for s in view.running if s.request_id in view.last_advance)
            return StepPlan((), keep)
        waiting, running, drop, degrade = self.triage(view, now_s)
        edf = sorted(running + waiting, key=lambda s: s.deadline_s)
        committed, shortened = self.admit(edf, now_s)
        chosen = self.pack(committed, now_s) or edf[:1]
        # (nobody can be on time: best effort for the earliest deadline)
        running_ids = {s.request_id for s in running}
        join = tuple(s.request_id for s in chosen if s.request_id not in running_ids)
        degrade = tuple((rid, n) for rid, n in dict(degrade).items() if rid not in shortened) + tuple(shortened.items())
        return StepPlan(join, tuple(s.request_id for s in chosen), drop, degrade)

    def admit(self, edf: list[RequestState], now_s: float) -> tuple[list[RequestState], dict[str, int]]:
        """Moore-Hodgson on the serial EDF plan: the most requests that can all make their deadlines if
        run one after another in deadline order (optimal for one machine, jobs available now). Whenever
        the plan turns late, the longest request so far is set aside: it waits, paused if it was running,
        and rejoins a later round if time frees up (or is dropped once hopeless). With on_hopeless=degrade
        the longest is first given the fewer steps that put the plan back on time (QoS-Diff's step count
        from slack), if that stays at or above min_steps; only otherwise set aside. Returns the admitted
        requests (view copies where shortened) and {request id: its new total steps}."""
        kept: list[RequestState] = []
        alone: list[float] = []  # each kept request's time alone (predicted once: this runs every round)
        shortened: dict[str, int] = {}
        t = now_s
        for s in edf:
            kept.append(s)
            alone.append(self.cost.alone_s(s))
            t += alone[-1]
            if _fits(t, s, now_s, self.margin):
                continue
            i = max(range(len(kept)), key=alone.__getitem__)  # the longest (first of equals)
            longest = kept[i]
            total = self._shortened(longest, (t - now_s) - (s.deadline_s - now_s) / (1.0 + self.margin))
            if total is not None:
                kept[i] = _with_total(longest, total)
                shortened[longest.request_id] = total
                now_alone = self.cost.alone_s(kept[i])
                t -= alone[i] - now_alone
                alone[i] = now_alone
            else:
                kept.pop(i)
                shortened.pop(longest.request_id, None)
                t -= alone.pop(i)
        return kept, shortened

    def _shortened(self, s: RequestState, excess_s: float) -> int | None:
        """The total steps that save `excess_s` on `s`; None when not degrading or below the floor."""
        per = self.cost.step_s([s])
        if self.on_hopeless != "degrade" or per <= 0:
            return None
        total = s.step_index + s.steps_left - math.ceil(excess_s / per - 1e-9)
        if total < max(min(self.min_steps, s.params.num_steps), s.step_index + 1):
            return None
        return total

    def pack(self, committed: list[RequestState], now_s: float) -> list[RequestState]:
        """This round's batch: the earliest deadline, plus each later committed request whose batching
        keeps every committed request on time (the batch runs together, the rest after it in EDF order)."""
        if not committed:
            return []
        alone = [self.cost.alone_s(s) for s in committed]  # predicted once, not once per candidate
        chosen = committed[:1]
        for s in committed[1:]:
            if len(chosen) >= self.max_batch:
                break
            if self._plan_on_time(chosen + [s], committed, alone, now_s):
                chosen = chosen + [s]
        return chosen

    def _plan_on_time(self, batch, committed, alone, now_s: float) -> bool:
        ft = self.cost.finish_times(batch, now_s)
        if not all(_fits(ft[s.request_id], s, now_s, self.margin) for s in batch):
            return False
        t = max(ft.values())
        for s, a in zip(committed, alone, strict=True):
            if s.request_id not in ft:
                t += a
                if not _fits(t, s, now_s, self.margin):
                    return False
        return True


POLICIES = {p.name: p for p in (ImageFcfsPolicy, StepFcfsPolicy, SlackPolicy, RoundsPolicy)}


def make_policy(name: str, **kw):
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ConfigError(f"policy: unknown policy; allowed {', '.join(POLICIES)}, got {name!r}") from None
    if name in ("slack", "rounds") and kw.get("cost") is None:
        raise ConfigError(f"policy: {name!r} needs a cost model (the engine profiles one at start-up)")
    return cls(**kw)
