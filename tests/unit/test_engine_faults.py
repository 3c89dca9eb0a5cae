"""Engine failure containment on the simulator's virtual pipeline and denoiser behind the fault-injection
wrappers (tessera.faults): no models, a virtual clock, assertions on counts, codes and step numbers."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.bench.simulate import VirtualClock, _SimDenoiser, _SimPipeline
from tessera.cost import CostModel
from tessera.engine import Engine
from tessera.errors import RequestFailedError, Status, status_of
from tessera.faults import FaultyDenoiser, FaultyPipeline, InjectedFault, LoopFault
from tessera.predictor import LatencyPredictor
from tessera.request import FinishReason, GenerationParams, RequestState
from tessera.scheduler import StepFcfsPolicy

STEPS = {"req-a": 3, "req-b": 5, "req-c": 8}  # the faulty one (b) ends in the middle: it never sets the pace


def cost_model() -> CostModel:
    """Step = 0.01 + 0.001 x cells x rows (64 px: 0.138 s); join and finish free."""
    p = LatencyPredictor()
    p.coef = np.array([0.01, 0.001, 0.0, 0.0, 0.0, 0.0, 0.0])
    return CostModel(p, vae_factor=8)


class _Pipeline(_SimPipeline):
    """The virtual pipeline with denoiser inputs as a dict, as the real pipeline's (the fault wrapper marks
    a step fault on them)."""

    def denoiser_inputs(self, run):
        return {"sample": run}


class _Denoiser(_SimDenoiser):
    def run(self, items, adapters=None, controls=None, places=None):
        return super().run([it["sample"] for it in items])


def engine(max_batch: int = 8, policy=None) -> Engine:
    clock, cost = VirtualClock(), cost_model()
    pipeline = FaultyPipeline(_Pipeline(clock, cost))
    denoiser = FaultyDenoiser(_Denoiser(clock, cost))
    policy = policy or StepFcfsPolicy(max_batch=max_batch)
    return Engine(pipeline, denoiser, policy, cost=cost_model(), clock=clock)


def state(rid: str, steps: int, fault: str | None = None, progress: bool = False) -> RequestState:
    prompt = "a red circle" + (f" [[fault:{fault}]]" if fault else "")
    return RequestState(rid, GenerationParams(prompt, "", 64, 64, steps, 5.0, 0), 0.0, progress=progress,
                        preview=progress)


def drain(eng: Engine, limit: int = 100) -> dict:
    """Step until idle; {request id: final output}, checking each request is answered exactly once."""
    finals = {}
    for _ in range(limit):
        if not eng.has_work():
            return finals
        for out in eng.step():
            if out.final:
                assert out.request_id not in finals, f"{out.request_id} answered twice"
                finals[out.request_id] = out
    raise AssertionError("engine did not drain")


def serve(fault_in_b: str | None, with_b: bool = True, progress: bool = False):
    eng = engine()
    for rid, steps in STEPS.items():
        if rid == "req-b" and not with_b:
            continue
        eng.add(state(rid, steps, fault_in_b if rid == "req-b" else None, progress))
    return eng, drain(eng)


@pytest.mark.parametrize("fault, stage, failed_at_step", [
    ("start", "prompt encoding", 0),
    ("sampler", "sampler update", 0),
    ("preview", "preview", 1),
    ("decode", "decode", 5),
])
def test_engine_request_fault_fails_that_request_alone(fault, stage, failed_at_step):
    alone_eng, without_b = serve(None, with_b=False, progress=True)
    eng, finals = serve(fault, progress=True)
    assert set(finals) == set(STEPS)
    bad = finals["req-b"]
    assert bad.finish_reason is FinishReason.ERROR and not bad.ok and bad.image is None
    assert isinstance(bad.error, RequestFailedError) and status_of(bad.error) is Status.INTERNAL
    assert f"request req-b: {stage} failed" in str(bad.error) and "InjectedFault" in str(bad.error)
    assert bad.step_index == failed_at_step
    for rid in ("req-a", "req-c"):
        assert finals[rid].finish_reason is FinishReason.COMPLETED
        assert finals[rid].step_index == without_b[rid].step_index == STEPS[rid]
    assert eng.step_no == alone_eng.step_no == max(STEPS.values())
    assert not eng.has_work() and eng.in_flight == 0
    # the faulty request shared its steps with the others (it never started with a start fault)
    in_first = set(eng.records[0].request_ids)
    assert in_first == ({"req-a", "req-c"} if fault == "start" else set(STEPS))
    steps_with_b = sum("req-b" in r.request_ids for r in eng.records)
    assert steps_with_b == {"start": 0, "sampler": 1, "preview": 1, "decode": 5}[fault]


def test_engine_request_fault_without_progress_skips_preview():
    """A preview fault only fires when a preview is made: without progress the request completes."""
    _, finals = serve("preview", progress=False)
    assert all(o.finish_reason is FinishReason.COMPLETED for o in finals.values())
    assert {rid: o.step_index for rid, o in finals.items()} == STEPS


def test_engine_step_fault_fails_every_request_of_that_step_then_serves_on():
    eng = engine(max_batch=2)  # a and b share step 0; c waits
    eng.add(state("req-a", 3))
    eng.add(state("req-b", 5, fault="step"))
    eng.add(state("req-c", 4))
    outs = eng.step()
    assert [o.request_id for o in outs] == ["req-a", "req-b"]
    for o in outs:
        assert o.final and o.finish_reason is FinishReason.ERROR and o.step_index == 0
        assert isinstance(o.error, RequestFailedError) and status_of(o.error) is Status.INTERNAL
        assert "engine step 0 failed: InjectedFault" in str(o.error)
    assert list(eng.waiting) == ["req-c"] and not eng.running
    assert eng.step_no == 1 and len(eng.records) == 0
    eng.add(state("req-d", 2))
    finals = drain(eng)
    assert {rid: (o.finish_reason, o.step_index) for rid, o in finals.items()} == {
        "req-c": (FinishReason.COMPLETED, 4), "req-d": (FinishReason.COMPLETED, 2)}


class _FlakyPolicy(StepFcfsPolicy):
    def __init__(self):
        super().__init__(max_batch=8)
        self.broken = False

    def schedule(self, view, now_s):
        if self.broken:
            raise RuntimeError("plan exploded")
        return super().schedule(view, now_s)


def test_engine_policy_failure_fails_every_request_in_flight_and_engine_stays_usable():
    policy = _FlakyPolicy()
    eng = engine(policy=policy)
    eng.add(state("req-a", 3))
    eng.add(state("req-b", 5))
    assert eng.step() == []  # both running, one step done
    eng.add(state("req-c", 4))  # waiting
    policy.broken = True
    outs = eng.step()
    assert sorted(o.request_id for o in outs) == ["req-a", "req-b", "req-c"]
    assert all(o.final and o.finish_reason is FinishReason.ERROR for o in outs)
    assert all(isinstance(o.error, RequestFailedError) and "engine step 1 failed: RuntimeError: plan exploded"
               in str(o.error) for o in outs)
    assert {o.request_id: o.step_index for o in outs} == {"req-a": 1, "req-b": 1, "req-c": 0}
    assert eng.in_flight == 0 and not eng.has_work()
    policy.broken = False
    eng.add(state("req-d", 3))
    finals = drain(eng)
    assert finals["req-d"].finish_reason is FinishReason.COMPLETED and finals["req-d"].step_index == 3


def test_engine_loop_fault_is_not_contained():
    eng = engine()
    eng.add(state("req-a", 3))
    eng.add(state("req-x", 3, fault="loop"))
    with pytest.raises(LoopFault) as e:
        eng.step()
    assert not isinstance(e.value, Exception) and isinstance(e.value, BaseException)
    assert issubclass(InjectedFault, Exception), "the other faults are ordinary (contained) exceptions"


def test_engine_faulty_wrappers_are_transparent_without_markers():
    """No marker: the wrapped pipeline and denoiser serve exactly what the bare ones do."""
    clock, cost = VirtualClock(), cost_model()
    bare = Engine(_Pipeline(clock, cost), _Denoiser(clock, cost), StepFcfsPolicy(8), cost=cost_model(),
                  clock=clock)
    for rid, steps in STEPS.items():
        bare.add(state(rid, steps))
    plain = drain(bare)
    _, wrapped = serve(None)
    steps = {r: o.step_index for r, o in plain.items()}
    assert {r: o.step_index for r, o in wrapped.items()} == steps == STEPS


class _SetAsideOnce:
    """Adapters that make request `rid` sit out the first step it is planned for (a wait at K, or another
    adapter set under lora_batching=one_set)."""

    def __init__(self, rid: str):
        self.rid, self.done = rid, False

    def names(self):
        return frozenset()

    def admit(self, state):
        pass

    def gate(self, batch):
        from tessera.adapters import Gate

        aside = [s for s in batch if s.request_id == self.rid and not self.done]
        self.done = self.done or bool(aside)
        return Gate(tuple(s for s in batch if s not in aside), None, tuple(aside))

    def release(self, request_id):
        pass

    def counters(self):
        from tessera.adapters import AdapterCounters

        return AdapterCounters()


def test_a_request_sitting_a_failed_step_out_is_not_failed_and_stays_planned():
    clock, cost = VirtualClock(), cost_model()
    eng = Engine(FaultyPipeline(_Pipeline(clock, cost)), FaultyDenoiser(_Denoiser(clock, cost)),
                 StepFcfsPolicy(max_batch=8), cost=cost_model(), clock=clock, adapters=_SetAsideOnce("req-b"))
    eng.add(state("req-a", 3, "step"))
    eng.add(state("req-b", 5))
    outs = {o.request_id: o for o in eng.step() if o.final}
    assert set(outs) == {"req-a"} and status_of(outs["req-a"].error) is Status.INTERNAL
    assert eng.running["req-b"].step_index == 0 and eng.last_advance == frozenset({"req-a", "req-b"})
    finals = drain(eng)
    assert finals["req-b"].finish_reason is FinishReason.COMPLETED and finals["req-b"].step_index == 5
