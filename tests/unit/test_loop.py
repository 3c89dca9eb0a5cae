"""EngineLoop (the engine's thread) and the engine's loop-gap accounting, on the simulator's virtual pipeline
(no models). Threads are waited on with timeouts; assertions are on counts, codes and numerics only."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tessera.bench.simulate import VirtualClock, _SimDenoiser, _SimPipeline
from tessera.cost import CostModel
from tessera.engine import Engine
from tessera.errors import OverloadedError, RefusedError, ShutdownError, Status, status_of
from tessera.faults import FaultyDenoiser, FaultyPipeline, LoopFault
from tessera.loop import EngineLoop
from tessera.plan import EngineView
from tessera.predictor import LatencyPredictor
from tessera.request import FinishReason, GenerationParams, RequestState
from tessera.scheduler import EdfMhPolicy, StepFcfsPolicy

WAIT_S = 5.0  # generous timeouts for threads: a test that passes never waits this long


def cost_model(per_cell=0.001, base=0.01) -> CostModel:
    """Step = base + per_cell x (cells x rows); join 0, finish 0 (64 px, CFG: 0.138 s a step)."""
    p = LatencyPredictor()
    p.coef = np.array([base, per_cell, 0.0, 0.0, 0.0, 0.0, 0.0])
    return CostModel(p, vae_factor=8)


def state(rid: str, steps: int = 4, prompt: str = "a red circle", slo_ms: int | None = None) -> RequestState:
    return RequestState(rid, GenerationParams(prompt, "", 64, 64, steps, 5.0, 0, slo_ms), 0.0)


class Sink:
    """Collects outputs; `wait(n)` until n finals have come back."""

    def __init__(self):
        self.outputs, self._cv = [], threading.Condition()

    def __call__(self, out):
        with self._cv:
            self.outputs.append(out)
            self._cv.notify_all()

    @property
    def finals(self):
        with self._cv:
            return [o for o in self.outputs if o.final]

    def wait(self, n: int) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: sum(o.final for o in self.outputs) >= n, WAIT_S)


class _Denoiser(_SimDenoiser):
    def run(self, items, adapters=None, controls=None, places=None):  # FaultyDenoiser looks into each item's inputs: give it dicts
        return super().run([it["sample"] for it in items])


class _DictPipeline(_SimPipeline):
    def denoiser_inputs(self, run):
        return {"sample": run}


def sim_engine(pipeline_cls=_DictPipeline) -> Engine:
    """The virtual pipeline (behind the fault wrappers) on the real monotonic clock, step-fcfs."""
    vclock, cost = VirtualClock(), cost_model()
    return Engine(FaultyPipeline(pipeline_cls(vclock, cost)), FaultyDenoiser(_Denoiser(vclock, cost)),
                  StepFcfsPolicy(max_batch=4))


def test_loop_every_submitted_request_gets_exactly_one_final():
    sink = Sink()
    loop = EngineLoop(sim_engine(), sink)
    ids = [f"q{i}" for i in range(24)]
    for rid in ids[:6]:  # accepted before the loop runs; two cancelled before their first step
        loop.submit(state(rid, steps=3))
    loop.cancel("q1")
    loop.cancel("q4")
    loop.start()
    try:
        racy = set()
        for i, rid in enumerate(ids[6:], start=6):
            loop.submit(state(rid, steps=3 + i % 5))
            if i % 6 == 5:
                loop.cancel(ids[i - 1])  # cancelled or already finished: still one final either way
                racy.add(ids[i - 1])
        assert sink.wait(len(ids))
        loop.cancel("q0")  # long finished: nothing more is sent
    finally:
        loop.stop(WAIT_S)
    finals = {o.request_id: o for o in sink.finals}
    assert len(sink.finals) == len(ids) and sorted(finals) == sorted(ids)
    early = [(finals[r].finish_reason, finals[r].step_index) for r in ("q1", "q4")]
    assert early == [(FinishReason.CANCELLED, 0)] * 2
    assert all(o.finish_reason in (FinishReason.COMPLETED, FinishReason.CANCELLED) for o in finals.values())
    done = set(ids) - racy - {"q1", "q4"}
    assert all(finals[r].finish_reason is FinishReason.COMPLETED for r in done)
    assert loop.pending == 0 and loop.dead is None


class _GatedPipeline(_DictPipeline):
    """start() blocks until the gate opens: submitted requests stay pending."""

    gate = None
    entered = None

    def start(self, params):
        self.entered.set()
        assert self.gate.wait(WAIT_S)
        return super().start(params)


def test_loop_fault_kills_the_loop_and_answers_everyone_else():
    """x kills the loop while a and b run, d waits in the engine and c is still in the loop's inbox: each
    of them is answered once (ShutdownError), on_dead is called once, and later submissions are refused."""
    gate, entered = threading.Event(), threading.Event()
    pipeline = type("Gated", (_GatedPipeline,), {"gate": gate, "entered": entered})
    sink, dead = Sink(), []
    died = threading.Event()
    loop = EngineLoop(sim_engine(pipeline), sink, on_dead=lambda e: (dead.append(e), died.set()))
    for rid in ("a", "b"):
        loop.submit(state(rid, steps=5))
    loop.submit(state("x", steps=5, prompt="boom [[fault:loop]]"))
    loop.submit(state("d", steps=5))
    loop.start()
    try:
        assert entered.wait(WAIT_S)  # the first step is starting a: c arrives meanwhile
        loop.submit(state("c", steps=5))
        gate.set()
        assert died.wait(WAIT_S)
        assert sink.wait(4)
        with pytest.raises(ShutdownError) as e:
            loop.submit(state("late"))
        assert e.value.status is Status.UNAVAILABLE and e.value.code == "unavailable"
    finally:
        gate.set()
        loop.stop(WAIT_S)
    assert len(dead) == 1 and isinstance(dead[0], LoopFault) and loop.dead is dead[0]
    others = [o for o in sink.finals if o.request_id != "x"]
    assert sorted(o.request_id for o in others) == ["a", "b", "c", "d"]
    for o in others:
        assert o.finish_reason is FinishReason.ERROR and isinstance(o.error, ShutdownError)
        assert status_of(o.error) is Status.UNAVAILABLE and "loop stopped (LoopFault" in str(o.error)
    assert {o.request_id: o.step_index for o in others} == {"a": 0, "b": 0, "c": 0, "d": 0}


def test_loop_max_in_flight_refuses_one_more_while_n_are_pending():
    gate, entered = threading.Event(), threading.Event()
    pipeline = type("Gated", (_GatedPipeline,), {"gate": gate, "entered": entered})
    sink = Sink()
    loop = EngineLoop(sim_engine(pipeline), sink, max_in_flight=3).start()
    try:
        for i in range(3):
            loop.submit(state(f"q{i}"))
        assert entered.wait(WAIT_S)  # the loop is inside the first start(), holding all three
        assert loop.pending == 3
        with pytest.raises(OverloadedError) as e:
            loop.submit(state("q3"))
        assert e.value.status is Status.UNAVAILABLE and e.value.code == "overloaded"
        assert "at most 3 requests in flight" in str(e.value)
        assert loop.pending == 3
        gate.set()
        assert sink.wait(3)
        loop.submit(state("q4"))  # room again
        assert sink.wait(4)
    finally:
        gate.set()
        loop.stop(WAIT_S)
    assert sorted(o.request_id for o in sink.finals) == ["q0", "q1", "q2", "q4"]
    assert all(o.finish_reason is FinishReason.COMPLETED for o in sink.finals)
    assert loop.pending == 0


# -- the loop gap: idle time is nobody's ----------------------------------------------------------------
def gap_engine():
    clock, cost = VirtualClock(), cost_model()
    engine = Engine(_SimPipeline(clock, cost_model()), _SimDenoiser(clock, cost_model()),
                    StepFcfsPolicy(max_batch=4), cost=cost, clock=clock)
    return engine, clock, cost


def test_loop_gap_idle_after_cancelling_the_last_request_is_not_charged():
    engine, clock, cost = gap_engine()
    engine.add(state("a", steps=10))
    engine.step()  # a has 9 steps left: the engine is busy
    out = engine.abort("a")
    assert out is not None and out.finish_reason is FinishReason.CANCELLED and out.step_index == 1
    clock.t += 10.0  # nothing to do for 10 s
    engine.add(state("b", steps=10))
    engine.step()
    assert cost.gaps == 0 and cost.gap_s < 0.01  # charged, this would be 0.05 x 10 s = 0.5 s
    clock.t += 0.1  # a real gap while busy is still measured
    engine.step()
    assert cost.gaps == 1 and cost.gap_s == pytest.approx(0.05 * 0.1)


def test_loop_gap_cancelling_one_of_two_keeps_measuring():
    engine, clock, cost = gap_engine()
    engine.add(state("a", steps=10))
    engine.add(state("b", steps=10))
    engine.step()
    engine.abort("a")  # b still runs: the time until the next step is the loop's
    clock.t += 0.2
    engine.step()
    assert cost.gaps == 1 and cost.gap_s == pytest.approx(0.05 * 0.2)


def test_loop_gap_engine_idle_resets_gap_tracking():
    engine, clock, cost = gap_engine()
    engine.add(state("a", steps=10))
    engine.step()
    engine.idle()
    clock.t += 10.0
    engine.step()
    assert cost.gaps == 0 and cost.gap_s == 0.0
    clock.t += 10.0  # without idle() the same wait is a gap (the control)
    engine.step()
    assert cost.gaps == 1 and cost.gap_s == pytest.approx(0.05 * 10.0)


# -- early refusal at submit ---------------------------------------------------------------------------
def rounds_engine(cost: CostModel) -> Engine:
    """rounds on the virtual pipeline, its clock standing at 0 (every request arrives at 0)."""
    clock = VirtualClock()
    return Engine(_SimPipeline(clock, cost), _SimDenoiser(clock, cost), EdfMhPolicy(cost=cost), cost=cost,
                  clock=clock)


@pytest.mark.parametrize("queued_in", ["inbox", "engine"])
def test_loop_early_refusal_refuses_what_the_plan_cannot_fit(queued_in):
    """Two 64 px requests (1.38 s alone each) are queued with deadlines 1.6 s and 3.2 s; a 12-step newcomer
    (1.656 s) due at 3.5 s cannot follow them (4.42 s, x 1.1 margin) and is the longest: refused at
    submit. A 10-step one due at 10 s fits."""
    cost = cost_model()
    engine = rounds_engine(cost)
    queued = [state("q0", steps=10, slo_ms=1600), state("q1", steps=10, slo_ms=3200)]
    if queued_in == "engine":
        for s in queued:
            engine.add(s)
    loop = EngineLoop(engine, Sink(), early_refusal=True)  # never started: the plan stays as built here
    if queued_in == "inbox":
        for s in queued:
            loop.submit(s)
    pending = loop.pending
    with pytest.raises(RefusedError) as e:
        loop.submit(state("late", steps=12, slo_ms=3500))
    assert e.value.status is Status.UNAVAILABLE and e.value.code == "refused"
    assert str(e.value).startswith("deadline cannot be met: the current plan (2 requests in flight)")
    assert loop.pending == pending
    loop.submit(state("fits", steps=10, slo_ms=10_000))
    assert loop.pending == pending + 1


def test_loop_without_early_refusal_accepts_the_same_request():
    cost = cost_model()
    engine = rounds_engine(cost)
    loop = EngineLoop(engine, Sink(), early_refusal=False)
    queued = [state("q0", steps=10, slo_ms=1600), state("q1", steps=10, slo_ms=3200)]
    for s in queued:
        loop.submit(s)
    late = state("late", steps=12, slo_ms=3500)
    loop.submit(late)
    assert loop.pending == 3
    # the situation is one the policy refuses: only the setting let it in
    assert engine.policy.refuse(EngineView(tuple(queued), ()), late, 0.0) is not None
