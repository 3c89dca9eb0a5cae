"""The simulator: replays a trace with the real Engine and the real policies on N virtual engine
instances, on a virtual clock driven by the profiled cost model (no model runs). Arrivals go to the
instance with the least predicted backlog. `oracle` gives an optimistic reference for the same trace.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace

from ..cost import CostModel
from ..engine import Engine
from ..interfaces import CallStats
from ..decode import VirtualPipelinedDecode
from ..options import Decode, EarlyRefusal, Placement
from ..placement import groups_of, make_placer
from ..request import FinishReason, GenerationParams, RequestState
from ..policies import make_policy
from .traces import Trace


class VirtualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class _SimRun:
    params: GenerationParams
    step_index: int = 0
    entropies: list[float] = field(default_factory=list)
    jump_last: bool = False

    @property
    def steps_left(self) -> int:
        return self.params.num_steps - self.step_index

    @property
    def done(self) -> bool:
        return self.step_index >= self.params.num_steps


class _SimPipeline:
    def __init__(self, clock: VirtualClock, cost: CostModel):
        self.clock, self.cost = clock, cost

    def start(self, params):
        self.clock.t += self.cost.start_s
        return _SimRun(params)

    def denoiser_inputs(self, run):
        return run

    def apply(self, run, _pred) -> None:
        run.step_index += 1

    def truncate(self, run, total: int, clean: bool = True) -> None:
        run.params = replace(run.params, num_steps=max(total, run.step_index))

    def finish(self, run):
        self.clock.t += self.cost.finish_s(RequestState("x", run.params, 0.0))
        return None

    def preview(self, run):
        return None


class _SimDenoiser:
    """The denoiser's time only: the predictor's, or with several workers the slowest worker set's (each set
    batched, at its degree's T(size, k) from the cost table) times the served multi-set slowdown, as the served
    workers step together."""

    def __init__(self, clock: VirtualClock, cost: CostModel):
        self.clock, self.cost = clock, cost

    def run(self, runs, adapters=None, controls=None, places=None):
        states = [RequestState("x", r.params, 0.0) for r in runs]
        groups = groups_of(states, [False] * len(states), places)
        self.clock.t += self.cost.sets_s(groups)
        n = len(runs)
        return [None] * n, CallStats((n,), (len({(r.params.height, r.params.width) for r in runs}),), (n,))


class _Timed:
    """A policy whose schedule() wall time is added to a virtual clock (refusals run on the submitting
    thread when served, not on the loop: not charged)."""

    def __init__(self, policy, clock: VirtualClock):
        self.policy, self.clock = policy, clock
        self.name = policy.name

    def schedule(self, view, now_s):
        t0 = time.perf_counter()
        plan = self.policy.schedule(view, now_s)
        self.clock.t += time.perf_counter() - t0
        return plan

    def refuse(self, view, state, now_s):
        return self.policy.refuse(view, state, now_s)


@dataclass
class SimResult:
    arrival_s: float
    height: int
    width: int
    deadline_ms: float
    latency_ms: float | None
    status: str  # ok | dropped (hopeless) | refused (early refusal at arrival)
    steps_run: int | None = None

    @property
    def met(self) -> bool:
        return self.status == "ok" and self.latency_ms is not None and self.latency_ms <= self.deadline_ms


def simulate(trace: Trace, policy: str, cost: CostModel, slo_ms: dict, instances: int = 1, max_batch: int = 16,
             on_hopeless: str = "drop", round_steps: int = 5, guidance: float = 5.0, margin: float = 0.1,
             charge_policy: bool = True, gap_s: float | None = None, min_steps: int = 4,
             early_refusal: EarlyRefusal | str = EarlyRefusal.ON, workers: int = 1,
             placement: Placement | str = Placement.LEAST_WORK, fixed_degree: int = 1,
             rssp: tuple = (), decode: Decode | str = Decode.LOOP) -> list[SimResult]:
    """charge_policy: the policy's own compute time (measured on this host while simulating) advances the
    virtual clock, as it holds the real engine loop (slack's schedulability tests grow with the queue).
    gap_s: the loop's time between engine steps (responses, admissions), as the served engine measured it
    (tessera_step_gap_seconds_total over tessera_step_gaps_total; default: the cost model's); the virtual loop spends it after every busy step.
    early_refusal: each arrival is first tested by the policy's refuse() against its instance's plan, as the
    served engine model does at admission.
    workers: denoiser workers per engine instance (issue 16), stepping together with the cost table's T(size, k);
    `placement`, `fixed_degree`, `rssp`, `decode` as the engine's settings (pipelined decode: one decode lane
    beside each virtual engine's loop)."""
    pipelined = Decode.parse("decode", decode) is Decode.PIPELINED
    gap_s = cost.gap_s if gap_s is None else gap_s
    early_refusal = EarlyRefusal.parse("early_refusal", early_refusal)  # the served engine's default: on
    clocks = [VirtualClock() for _ in range(instances)]
    engines = []
    for c in clocks:
        # Own copies (one simulation must leave nothing behind for the next), and a predictor that never
        # refits: the virtual loop's "measurements" are its own predictions, and a refit on the few shapes
        # seen so far (a cost model rebuilt from served terms has no profile samples) drifts elsewhere.
        predictor = copy.deepcopy(cost.predictor)
        predictor.refit_every = math.inf
        degrees = replace(copy.deepcopy(cost.degrees), workers=workers)
        degrees.observe = lambda *a, **k: None  # as the predictor: the table never refits on its own predictions
        sim_cost = replace(cost, predictor=predictor, gap_s=gap_s, gaps=0, gap_total_s=0.0,
                           finishes=copy.deepcopy(cost.finishes), degrees=degrees, served={})
        pol = make_policy(policy, max_batch=max_batch, cost=sim_cost, on_hopeless=on_hopeless,
                          round_steps=round_steps, margin=margin, min_steps=min_steps, early_refusal=early_refusal,
                          workers=workers, fixed_degree=fixed_degree, rssp=rssp)
        pol = _Timed(pol, c) if charge_policy else pol
        engines.append(Engine(_SimPipeline(c, sim_cost), _SimDenoiser(c, sim_cost), pol, cost=sim_cost, clock=c,
                              placer=make_placer(workers, placement, sim_cost),
                              decoder=VirtualPipelinedDecode(c, sim_cost) if pipelined else None))
    results: dict[str, SimResult] = {}
    arrivals = list(enumerate(trace.requests))
    pos = 0
    while pos < len(arrivals) or any(e.has_work() for e in engines):
        busy = [(clocks[i].t, i) for i, e in enumerate(engines) if e.has_work()]
        t_next = arrivals[pos][1].t if pos < len(arrivals) else math.inf
        if pos < len(arrivals) and (not busy or t_next <= min(busy)[0]):
            k, r = arrivals[pos]
            pos += 1
            slo = slo_ms[(r.height, r.width)]
            params = GenerationParams(r.prompt, "", r.height, r.width, r.steps, guidance, r.seed, int(slo))
            state = RequestState(f"q{k}", params, r.t)
            target = min(range(instances), key=lambda i: (
                sum(cost.alone_s(s) for s in (*engines[i].waiting.values(), *engines[i].running.values())), i))
            clocks[target].t = max(clocks[target].t, r.t)
            engine = engines[target]
            engine.admit(state)
            if early_refusal and engine.policy.refuse(engine.view(), state, r.t) is not None:
                results[state.request_id] = SimResult(r.t, r.height, r.width, slo, None, "refused")
                continue
            engine.add(state, admitted=True)
            results[state.request_id] = SimResult(r.t, r.height, r.width, slo, None, "pending")
            continue
        _, i = min(busy)
        before = clocks[i].t
        outs = engines[i].step()
        if engines[i].has_work():
            clocks[i].t += gap_s
        for o in outs:
            if o.final:
                res = results[o.request_id]
                res.status = "dropped" if o.finish_reason == FinishReason.DROPPED else "ok"
                res.latency_ms = (o.done_s - o.arrival_s) * 1e3 if res.status == "ok" else None
                res.steps_run = o.step_index if res.status == "ok" else None
        if clocks[i].t == before and not outs:  # nothing could run: wait for the next arrival
            clocks[i].t = t_next if t_next < math.inf else before + 1e-3
    return list(results.values())


def sar(results) -> float:
    return sum(r.met for r in results) / len(results) if results else float("nan")


def oracle(trace: Trace, cost: CostModel, slo_ms: dict, instances: int = 1, guidance: float = 5.0) -> list[bool]:
    """An optimistic reference with full knowledge of arrivals: each request's work is only its
    marginal denoising cost (per-cell term x cells x rows x steps: no per-step base cost, no prompt
    encoding or decode), served by preemptive EDF on one machine N times as fast, rejecting (Moore-
    Hodgson style) the largest remaining job whenever the accepted set becomes infeasible. A heuristic
    upper reference, not a proven bound."""
    per_cell = cost.predictor.coef[1]
    f = cost.vae_factor
    jobs = []
    for r in trace.requests:
        rows = 2 if guidance > 1 else 1
        work = max(per_cell, 0.0) * (r.height // f) * (r.width // f) * rows * r.steps
        jobs.append((r.t, r.t + slo_ms[(r.height, r.width)] / 1e3, work))
    order = sorted(range(len(jobs)), key=lambda j: jobs[j][0])
    accepted: dict[int, float] = {}  # job -> remaining work
    on_time = [False] * len(jobs)
    now = 0.0
    speed = float(instances)

    def run_until(t_end: float) -> None:
        nonlocal now
        while now < t_end and accepted:
            j = min(accepted, key=lambda x: jobs[x][1])
            dt = min(accepted[j] / speed, t_end - now)
            accepted[j] -= dt * speed
            now += dt
            if accepted[j] <= 1e-12:
                del accepted[j]
                on_time[j] = now <= jobs[j][1] + 1e-9
        now = max(now, t_end)

    for j in order:
        run_until(jobs[j][0])
        accepted[j] = jobs[j][2]
        while True:  # feasibility of the accepted set by EDF from now
            t, worst = now, None
            for x in sorted(accepted, key=lambda x: jobs[x][1]):
                t += accepted[x] / speed
                if t > jobs[x][1] + 1e-9:
                    worst = x
                    break
            if worst is None:
                break
            prefix = [x for x in accepted if jobs[x][1] <= jobs[worst][1]]
            del accepted[max(prefix, key=lambda x: accepted[x])]
    run_until(math.inf)
    return on_time
