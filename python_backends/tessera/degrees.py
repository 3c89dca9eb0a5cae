"""Policies that choose each request's parallelism degree over the engine's denoiser workers (issue 16).

  tetris  TetriServe (ASPLOS'26, ../shared/reference/papers.md §5): every g steps (a round) each request gets the
          cheapest mix of two adjacent degrees that still meets its deadline (`allocation`); a group-knapsack DP
          over the workers (`knapsack`) picks one option per request (a degree this round, or none) maximising the
          requests that can still make their deadlines; placements are kept across rounds where they fit; workers
          left over go first to running requests that gain from a wider set (elastic scale-up), then, one each,
          to requests already late (best effort). No batching: one request per worker set.
  fixed   xDiT's fixed degree: every request at `fixed_degree` workers, first come first served, a request runs
          on its workers to the end (no preemption, no batching).
  rssp    TetriServe's resolution-specific baseline: fixed, with the degree chosen per resolution (`rssp`).

The engine's steps are taken together by every worker (latents live in the engine): a step lasts as long as its
slowest worker set. The plans are frozen StepPlans with `place` set for every advancing request; the simulator
runs these same classes on virtual workers.
"""

from __future__ import annotations

import math

from .cost import CostModel
from .errors import ConfigError
from .options import EarlyRefusal, OnHopeless, PolicyName
from .plan import EngineView, StepPlan
from .request import RequestState
from .scheduler import Policy, PolicySettings, _DeadlinePolicy

Place = tuple[int, ...]


def allocation(steps: int, times: dict[int, float], budget_s: float) -> list[tuple[int, int]] | None:
    """TetriServe §5.4: the (degree, steps) parts that finish `steps` steps within `budget_s` with the least
    worker-time (k x T(k) x steps), using one degree or two adjacent ones (the lower first); None when even the
    fastest degree is too slow. `times[k]`: one step at degree k."""
    best, best_cost = None, math.inf
    ks = sorted(times)
    for k in ks:  # one degree throughout
        if steps * times[k] <= budget_s and steps * k * times[k] < best_cost:
            best, best_cost = [(k, steps)], steps * k * times[k]
    for lo, hi in zip(ks, ks[1:]):  # the cheaper degree as long as the deadline allows, then the faster one
        t_lo, t_hi = times[lo], times[hi]
        if t_hi >= t_lo or steps * t_hi > budget_s:
            continue
        n_hi = max(0, math.ceil((steps * t_lo - budget_s) / (t_lo - t_hi) - 1e-9))
        n_hi = min(n_hi, steps)
        n_lo = steps - n_hi
        cost = n_lo * lo * t_lo + n_hi * hi * t_hi
        if n_lo * t_lo + n_hi * t_hi <= budget_s + 1e-12 and cost < best_cost:
            best, best_cost = [(k, n) for k, n in ((lo, n_lo), (hi, n_hi)) if n > 0], cost
    return best


def knapsack(options: list[list[tuple[int, int]]], capacity: int) -> list[int]:
    """TetriServe's Algorithm 1, a group-knapsack DP over worker capacity: `options[i]` lists request i's
    (width, value) choices, "none" among them as width 0; exactly one per request, total width <= capacity,
    total value maximal. Returns the chosen option index per request. O(R x N x |O|)."""
    neg = -(1 << 60)
    dp = [0] + [neg] * capacity
    picks: list[list[int]] = []  # per request, per capacity: the option taken (-1: none)
    for opts in options:
        nxt = [neg] * (capacity + 1)
        pick = [-1] * (capacity + 1)
        for c in range(capacity + 1):
            for j, (w, v) in enumerate(opts):
                if w <= c and dp[c - w] != neg and dp[c - w] + v > nxt[c]:
                    nxt[c], pick[c] = dp[c - w] + v, j
        dp = nxt
        picks.append(pick)
    c = max(range(capacity + 1), key=lambda x: (dp[x], -x))
    out = [0] * len(options)
    for i in range(len(options) - 1, -1, -1):
        out[i] = picks[i][c]
        c -= options[i][out[i]][0]
    return out


def free_block(size: int, workers: int, used: set[int], prefer: Place | None = None) -> Place | None:
    """An aligned block of `size` free workers: `prefer` (the request's last place) if it is one, else the first."""
    if prefer is not None and len(prefer) == size and not used & set(prefer):
        return prefer
    for start in range(0, workers - size + 1, size):
        block = tuple(range(start, start + size))
        if not used & set(block):
            return block
    return None


class TetrisPolicy(_DeadlinePolicy):
    name = PolicyName.TETRIS

    def __init__(self, cost: CostModel | None, on_hopeless: OnHopeless | str = OnHopeless.DROP, min_steps: int = 4,
                 round_steps: int = 5, margin: float = 0.1, early_refusal: EarlyRefusal | str = EarlyRefusal.ON):
        super().__init__(1, cost, on_hopeless, min_steps, margin, early_refusal)
        self.round_steps = round_steps
        self.workers = cost.degrees.workers

    @classmethod
    def build(cls, settings: PolicySettings, cost: CostModel | None) -> Policy:
        return cls(cost, settings.on_hopeless, settings.min_steps, settings.round_steps, settings.margin,
                   settings.early_refusal)

    # -- per request: T_i(k), its fastest time, and the allocation --------------------------------------------
    def times(self, s: RequestState) -> dict[int, float]:
        out = {k: self.cost.step_at(s, k) for k in self.cost.degrees.degrees()}
        return {k: t for k, t in out.items() if math.isfinite(t)}

    def _fixed_s(self, s: RequestState) -> float:
        return (self.cost.start_s if s.run is None else 0.0) + self.cost.finish_s(s)

    def hopeless(self, s: RequestState, now_s: float) -> bool:
        """Hopeless at its fastest degree (not only at degree 1)."""
        return now_s + self._fixed_s(s) + s.steps_left * min(self.times(s).values()) > s.deadline_s

    def _fitting_steps(self, s: RequestState, now_s: float, joined: bool = False) -> int:
        per = min(self.times(s).values())
        budget = s.deadline_s - now_s - (0.0 if joined else self.cost.start_s) - self.cost.finish_s(s)
        return int(budget // per) if per > 0 else s.params.num_steps

    def refuse(self, view: EngineView, state: RequestState, now_s: float) -> str | None:
        """Refused at admission only when hopeless even alone at its fastest degree: the DP decides the rest
        every round."""
        if not self.hopeless(state, now_s):
            return None
        return self._reason(state, now_s)

    # -- the round -------------------------------------------------------------------------------------------
    def schedule(self, view: EngineView, now_s: float) -> StepPlan:
        last = dict(view.places)
        members = view.last_advance & {s.request_id for s in view.running}
        if view.step_no % self.round_steps != 0 and members:  # inside a round: the same requests, same workers
            keep = tuple(s.request_id for s in view.running if s.request_id in members)
            return StepPlan((), keep, place=tuple((rid, last[rid]) for rid in keep if rid in last))
        waiting, running, drop, degrade = self.triage(view, now_s)
        cands = sorted(running + waiting, key=lambda s: s.deadline_s)
        if not cands:
            return StepPlan((), (), drop, degrade)
        times = [self.times(s) for s in cands]
        g, m = self.round_steps, 1.0 + self.margin
        tau = g * max(min(t.values()) for t in times)  # a round's length if the slowest request runs at its best
        options, degree_of = [], []
        for s, t in zip(cands, times, strict=True):
            fixed, t_min, left = self._fixed_s(s), min(t.values()), s.steps_left
            budget = (s.deadline_s - now_s) / m - fixed
            parts = allocation(left, t, budget) or []

            def survives(run_s: float, rest: int) -> int:
                return int(now_s + (run_s + rest * t_min + fixed) * m <= s.deadline_s)

            opts, degs = [(0, 1000 * survives(tau, left))], [0]
            for k, _ in parts:  # a degree holds for the whole round here: g steps at it (or the rest, if fewer)
                q = min(left, g)
                opts.append((k, 1000 * survives(q * t[k], left - q) + 100 - k))  # of equals: running, then narrower
                degs.append(k)
            options.append(opts)
            degree_of.append(degs)
        chosen = knapsack(options, self.workers)
        used: set[int] = set()
        place: dict[str, Place] = {}
        picked = sorted(((degree_of[i][j], i) for i, j in enumerate(chosen) if j > 0), key=lambda x: (-x[0], x[1]))
        for k, i in picked:  # widest first, each on its last workers where they are free
            block = free_block(k, self.workers, used, last.get(cands[i].request_id))
            if block is not None:
                place[cands[i].request_id] = block
                used |= set(block)
        self._scale_up(cands, times, place, used)
        for s in cands:  # already late (no option survives): at most one worker each, best effort
            if s.request_id not in place and len(used) < self.workers:
                block = free_block(1, self.workers, used, last.get(s.request_id))
                place[s.request_id] = block
                used |= set(block)
        ids = {s.request_id for s in running}
        order = [s.request_id for s in cands if s.request_id in place]
        join = tuple(rid for rid in order if rid not in ids)
        return StepPlan(join, tuple(order), drop, degrade, tuple((rid, place[rid]) for rid in order))

    def _scale_up(self, cands, times, place: dict[str, Place], used: set[int]) -> None:
        """Leftover workers to placed requests that gain the most from twice their workers (TetriServe's
        work-conserving elastic scale-up), while any is left."""
        while len(used) < self.workers:
            best = None
            for s, t in zip(cands, times, strict=True):
                p = place.get(s.request_id)
                if p is None or 2 * len(p) not in t:
                    continue
                k = len(p)
                start = (p[0] // (2 * k)) * 2 * k  # the block around its workers, else any free one
                around = tuple(range(start, start + 2 * k))
                block = free_block(2 * k, self.workers, used - set(p), around if around[-1] < self.workers else None)
                if block is None:
                    continue
                gain = s.steps_left * (t[k] - t[2 * k])
                if gain > 0.1 * s.steps_left * t[k] and (best is None or gain > best[0]):
                    best = (gain, s.request_id, block)
            if best is None:
                return
            _, rid, block = best
            used = (used - set(place[rid])) | set(block)
            place[rid] = block


class FixedDegreePolicy(Policy):
    """Every request at its fixed degree, first come first served, to the end on the same workers."""

    name = PolicyName.FIXED

    def __init__(self, workers: int, degree: int = 1, per_size: dict[tuple[int, int], int] | None = None):
        for k in [degree, *(per_size or {}).values()]:
            if k < 1 or k > workers or k & (k - 1):
                raise ConfigError(f"fixed_degree, rssp: a degree must be a power of two in [1, denoiser_workers="
                                  f"{workers}], got {k}")
        self.workers, self.degree, self.per_size = workers, degree, per_size or {}

    @classmethod
    def build(cls, settings: PolicySettings, cost: CostModel | None) -> Policy:
        return cls(settings.workers, settings.fixed_degree)

    def degree_for(self, s: RequestState) -> int:
        return self.per_size.get(s.size, self.degree)

    def schedule(self, view: EngineView, now_s: float) -> StepPlan:
        last, used, place = dict(view.places), set(), {}
        for s in view.running:  # running requests keep their workers (no preemption)
            block = free_block(self.degree_for(s), self.workers, used, last.get(s.request_id))
            if block is not None:
                place[s.request_id] = block
                used |= set(block)
        join = []
        for s in view.waiting:  # first come first served: the head waits for its workers, nobody passes it
            block = free_block(self.degree_for(s), self.workers, used)
            if block is None:
                break
            place[s.request_id] = block
            used |= set(block)
            join.append(s.request_id)
        order = [s.request_id for s in (*view.running, *view.waiting) if s.request_id in place]
        return StepPlan(tuple(join), tuple(order), place=tuple((rid, place[rid]) for rid in order))


class RsspPolicy(FixedDegreePolicy):
    name = PolicyName.RSSP

    @classmethod
    def build(cls, settings: PolicySettings, cost: CostModel | None) -> Policy:
        if not settings.rssp:
            raise ConfigError("rssp: policy rssp needs its degrees per resolution, e.g. rssp='512x512:2'")
        return cls(settings.workers, 1, dict(settings.rssp))


def parse_rssp(text: str) -> tuple[tuple[tuple[int, int], int], ...]:
    """'HxW:k,HxW:k' -> ((H, W), k) pairs (sizes not named run at degree 1)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            size, k = item.split(":")
            h, w = (int(v) for v in size.lower().split("x"))
            out.append(((h, w), int(k)))
        except ValueError as e:
            raise ConfigError(f"rssp: allowed 'HxW:k,HxW:k', got {text!r}") from e
    return tuple(out)
