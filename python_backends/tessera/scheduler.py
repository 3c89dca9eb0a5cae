"""Request scheduling policies (PatchedServe §1.8, TetriServe §5). A policy reads an EngineView and
returns a frozen StepPlan (who joins, who advances, who is dropped or degraded); it never touches request
state, tensors or executors, so bench/simulate.py replays the same code on a virtual clock. `refuse` is
the admission test (early refusal): the reason a newcomer cannot be fitted, or None.

  image-fcfs  the Triton tutorial's behaviour: one request's whole loop at a time, batching only
              same-resolution requests waiting together; nobody joins mid-loop.
  step-fcfs   continuous batching, first come first served.
  slack       least slack first; a schedulability test never admits a request that would make an
              on-time active request late; throughput mode (admit FCFS) while every slack is relaxed;
              hopeless requests dropped or degraded.
  edf-mh      (formerly `rounds`, still accepted) re-plan every g steps: EDF packing of running + waiting requests into the batch,
              keeping only sets in which every member still meets its deadline (most requests on time);
              the rest wait (running ones pause); hopeless requests dropped or degraded. With several
              denoiser workers its batch is spread over them at degree 1 by the engine's placer.
  tetris, fixed, rssp   choose each request's degree over several denoiser workers: degrees.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .cost import CostModel
from .errors import ConfigError
from .options import EarlyRefusal, OnHopeless, PolicyName
from .plan import EngineView, StepPlan
from .request import RequestState


def _on_time(cost: CostModel, states, now_s: float, must: set[str], margin: float = 0.0) -> bool:
    ft = cost.finish_times(states, now_s)
    return all(_fits(ft[s.request_id], s, now_s, margin) for s in states if s.request_id in must)


def _fits(finish_s: float, s: RequestState, now_s: float, margin: float) -> bool:
    """A predicted finish meets the deadline with the time still to run stretched by `margin`."""
    return now_s + (finish_s - now_s) * (1.0 + margin) <= s.deadline_s


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Everything a policy may be built from (EngineConfig's policy fields)."""

    max_batch: int = 16
    on_hopeless: OnHopeless = OnHopeless.DROP
    min_steps: int = 4
    round_steps: int = 5
    margin: float = 0.1
    early_refusal: EarlyRefusal = EarlyRefusal.ON
    workers: int = 1  # the engine's denoiser workers (degree-choosing policies)
    fixed_degree: int = 1  # fixed: every request's degree
    rssp: tuple[tuple[tuple[int, int], int], ...] = ()  # rssp: ((height, width), degree) per resolution


class Policy:
    """The interface every policy implements; policies without deadlines never refuse."""

    name: PolicyName

    @classmethod
    def build(cls, settings: PolicySettings, cost: CostModel | None) -> Policy:
        return cls(settings.max_batch)

    def schedule(self, view: EngineView, now_s: float) -> StepPlan:
        raise NotImplementedError

    def refuse(self, view: EngineView, state: RequestState, now_s: float) -> str | None:
        """Admission test for `state` (not in `view`) arriving now: the reason it cannot be fitted, or None."""
        return None


class _DeadlinePolicy(Policy):
    """Shared by slack and rounds: hopeless handling (drop, or degrade to fewer steps: re-spaced at join,
    cut short with one last step while running) and the admission plan (Moore-Hodgson on the serial EDF
    plan), which rounds packs from and early refusal tests newcomers against."""

    def __init__(self, max_batch: int, cost: CostModel | None, on_hopeless: OnHopeless | str, min_steps: int,
                 margin: float, early_refusal: EarlyRefusal | str = EarlyRefusal.ON):
        if cost is None:
            raise ConfigError(f"policy: {self.name.value!r} needs a cost model (the engine profiles one at start-up)")
        self.max_batch, self.cost, self.min_steps = max_batch, cost, min_steps
        self.on_hopeless = OnHopeless.parse("on_hopeless", on_hopeless)
        self.degrades = self.on_hopeless is OnHopeless.DEGRADE
        self.margin = margin  # planned time still to run is stretched by this fraction (jitter)
        self.strict = EarlyRefusal.parse("early_refusal", early_refusal) is EarlyRefusal.STRICT

    def refuse(self, view: EngineView, state: RequestState, now_s: float) -> str | None:
        """Refused when the newcomer is hopeless even alone, or when the serial EDF plan of everyone in flight
        plus the newcomer (Moore-Hodgson, as `admit`) sets the newcomer aside: it would wait until hopeless.
        Strict: also when admitting it sets aside anyone the plan without it keeps (admitted requests are
        not pushed out later; admission becomes first come, first served: perf/results/overload.json)."""
        waiting, running, _, _ = self.triage(EngineView(view.waiting + (state,), view.running), now_s)
        if state.request_id not in {s.request_id for s in waiting}:
            return self._reason(state, now_s)
        kept = {s.request_id for s in self.admit(sorted(running + waiting, key=lambda s: s.deadline_s), now_s)[0]}
        others = [s for s in running + waiting if s.request_id != state.request_id]
        if state.request_id in kept and (not self.strict or self._kept(others, now_s) <= kept):
            return None
        return (f"deadline cannot be met: the current plan ({len(running) + len(waiting) - 1} requests in flight) "
                f"cannot fit it by its deadline {(state.deadline_s - state.arrival_s) * 1e3:.0f} ms after arrival")

    def _kept(self, states: list[RequestState], now_s: float) -> set[str]:
        return {s.request_id for s in self.admit(sorted(states, key=lambda s: s.deadline_s), now_s)[0]}

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
            steps = self._fitting_steps(s, now_s) if self.degrades else 0
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
            if self.degrades and total >= min(self.min_steps, s.params.num_steps):
                if total < s.step_index + s.steps_left:
                    degrade.append((s.request_id, total))
                running.append(s)
            else:
                drop.append((s.request_id, self._reason(s, now_s)))
        shorter = dict(degrade)
        waiting = [s.with_total(shorter[s.request_id]) if s.request_id in shorter else s for s in waiting]
        running = [s.with_total(shorter[s.request_id]) if s.request_id in shorter else s for s in running]
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
            alone.append(self.cost.alone_s(s) / self.cost.degrees.workers)  # N workers: one machine N times as fast
            t += alone[-1]
            if _fits(t, s, now_s, self.margin):
                continue
            i = max(range(len(kept)), key=lambda j: (alone[j], j))  # the longest; of equals, the latest deadline
            longest = kept[i]
            total = self._shortened(longest, (t - now_s) - (s.deadline_s - now_s) / (1.0 + self.margin))
            if total is not None:
                kept[i] = longest.with_total(total)
                shortened[longest.request_id] = total
                now_alone = self.cost.alone_s(kept[i]) / self.cost.degrees.workers
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
        if not self.degrades or per <= 0:
            return None
        total = s.step_index + s.steps_left - math.ceil(excess_s / per - 1e-9)
        if total < max(min(self.min_steps, s.params.num_steps), s.step_index + 1):
            return None
        return total


class StepFcfsPolicy(Policy):
    name = PolicyName.STEP_FCFS

    def __init__(self, max_batch: int = 16):
        self.max_batch = max_batch

    def schedule(self, view: EngineView, now_s: float) -> StepPlan:
        room = max(self.max_batch - len(view.running), 0)
        join = tuple(s.request_id for s in view.waiting[:room])
        return StepPlan(join, tuple(s.request_id for s in view.running) + join)


class ImageFcfsPolicy(Policy):
    name = PolicyName.IMAGE_FCFS

    def __init__(self, max_batch: int = 16):
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
    name = PolicyName.SLACK

    def __init__(self, max_batch: int = 16, cost: CostModel | None = None, on_hopeless: OnHopeless | str = "drop",
                 min_steps: int = 4, relaxed_slack: float = 2.0, margin: float = 0.1,
                 early_refusal: EarlyRefusal | str = EarlyRefusal.ON):
        super().__init__(max_batch, cost, on_hopeless, min_steps, margin, early_refusal)
        self.relaxed_slack = relaxed_slack

    @classmethod
    def build(cls, settings: PolicySettings, cost: CostModel | None) -> Policy:
        return cls(settings.max_batch, cost, settings.on_hopeless, settings.min_steps, margin=settings.margin,
                   early_refusal=settings.early_refusal)

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


class EdfMhPolicy(_DeadlinePolicy):
    name = PolicyName.EDF_MH

    def __init__(self, max_batch: int = 16, cost: CostModel | None = None, on_hopeless: OnHopeless | str = "drop",
                 min_steps: int = 4, round_steps: int = 5, margin: float = 0.1,
                 early_refusal: EarlyRefusal | str = EarlyRefusal.ON):
        super().__init__(max_batch, cost, on_hopeless, min_steps, margin, early_refusal)
        self.round_steps = round_steps

    @classmethod
    def build(cls, settings: PolicySettings, cost: CostModel | None) -> Policy:
        return cls(settings.max_batch, cost, settings.on_hopeless, settings.min_steps, settings.round_steps,
                   settings.margin, settings.early_refusal)

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
