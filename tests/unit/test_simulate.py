"""The simulator on hand-built traces: the real Engine and policies on a virtual clock (no models)."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.bench.simulate import simulate
from tessera.bench.traces import Trace, TraceRequest
from tessera.predictor import LatencyPredictor
from tessera.cost import CostModel

SLO_MS = {(64, 64): 2000.0}


def cost_model(finish_s: float = 0.0) -> CostModel:
    """Step = 0.01 + 0.001 x cells x rows: 64 px -> 0.138 s, 128 px -> 0.522 s (CFG rows 2)."""
    p = LatencyPredictor()
    p.coef = np.array([0.01, 0.001, 0.0, 0.0, 0.0, 0.0, 0.0])
    return CostModel(p, vae_factor=8, finish_base_s=finish_s)


def trace(*reqs: tuple[float, int]) -> Trace:
    return Trace("hand", {}, tuple(TraceRequest(t, s, s, 10, i) for i, (t, s) in enumerate(reqs)))


def test_small_requests_behind_a_big_one_image_fcfs_misses_rounds_meets():
    """A 128 px request (5.2 s alone, 9 s deadline) then two 64 px ones (1.4 s each, 3.5 s deadline): one
    image at a time in arrival order the small ones wait behind the big one; rounds (re-planning every
    step here: these steps are long) pauses the big one, runs the small ones, and the big one still
    makes its deadline."""
    tr = trace((0.0, 128), (0.1, 64), (0.2, 64))
    slo = {(64, 64): 3500.0, (128, 128): 9000.0}
    fcfs = simulate(tr, "image-fcfs", cost_model(), slo, charge_policy=False)
    assert [r.met for r in fcfs] == [True, False, False]
    rounds = simulate(tr, "rounds", cost_model(), slo, charge_policy=False, round_steps=1)
    assert [r.met for r in rounds] == [True, True, True]
    assert rounds[0].latency_ms > max(rounds[1].latency_ms, rounds[2].latency_ms)


def test_same_step_finishes_decode_earliest_deadline_first():
    """Two requests finishing in the same step: the one with the earlier deadline is decoded first even
    though it arrived second."""
    tr = trace((0.0, 64), (0.0, 64))
    slo = {(64, 64): 5000.0}
    res = simulate(tr, "step-fcfs", cost_model(finish_s=1.0), slo, charge_policy=False)
    assert res[0].latency_ms == pytest.approx(res[1].latency_ms - 1000.0)  # same deadline: arrival order
    first_later = Trace("hand", {}, (TraceRequest(0.0, 64, 64, 10, 0), TraceRequest(0.0, 128, 128, 10, 1)))
    res = simulate(first_later, "step-fcfs", cost_model(finish_s=1.0), {(64, 64): 9000.0, (128, 128): 8000.0},
                   charge_policy=False)
    assert res[1].latency_ms < res[0].latency_ms  # the 128 px one (8 s deadline) decoded before the 64 px (9 s)


def test_loop_gap_is_spent_between_busy_steps():
    tr = trace((0.0, 64))
    plain = simulate(tr, "step-fcfs", cost_model(), SLO_MS, charge_policy=False)[0].latency_ms
    gapped = simulate(tr, "step-fcfs", cost_model(), SLO_MS, charge_policy=False, gap_s=0.01)[0].latency_ms
    assert gapped == pytest.approx(plain + 9 * 10.0)  # 10 steps, a gap between consecutive busy steps


def test_engine_emits_each_finish_before_the_next_decode():
    """Two requests finish in one step: with `emit`, the first is answered before the second is decoded
    (it used to wait for every decode of the step)."""
    from tessera.bench.simulate import VirtualClock, _SimDenoiser, _SimPipeline
    from tessera.engine import Engine
    from tessera.request import RequestState
    from tessera.request import GenerationParams
    from tessera.policies import make_policy

    events = []

    class Pipeline(_SimPipeline):
        def finish(self, run):
            events.append(("decode", run.params.seed))
            return super().finish(run)

    clock, cost = VirtualClock(), cost_model(finish_s=1.0)
    engine = Engine(Pipeline(clock, cost), _SimDenoiser(clock, cost), make_policy("step-fcfs", max_batch=4, cost=cost),
                    cost=cost, clock=clock)
    for i in range(2):
        engine.add(RequestState(f"q{i}", GenerationParams("p", "", 64, 64, 2, 5.0, i, 9000), 0.0))
    outs = []
    while engine.has_work():
        outs += engine.step(emit=lambda o: events.append(("emit", o.request_id)))
    assert events == [("decode", 0), ("emit", "q0"), ("decode", 1), ("emit", "q1")]
    assert [o.request_id for o in outs] == ["q0", "q1"]  # still returned, in the same order


def test_profile_runs_the_biggest_step_first_untimed_and_fits_the_virtual_costs():
    """The start-up profile on the simulator's virtual pipeline (its clock): its first denoiser call is
    max_batch requests of the largest size (untimed: the runtime's memory grows before serving), and the
    fitted model reproduces the virtual costs, twins of every size included."""
    from tessera.bench.simulate import VirtualClock, _SimDenoiser, _SimPipeline
    from tessera.request import RequestState
    from tessera.predictor import BatchShape
    from tessera.profile import profile_costs
    from tessera.request import GenerationParams

    clock, truth = VirtualClock(), cost_model(finish_s=0.05)
    calls = []

    class Denoiser(_SimDenoiser):
        def run(self, runs, adapters=None, controls=None, places=None):
            calls.append(sorted((r.params.height, r.params.width) for r in runs))
            return super().run(runs)

    sizes = [(64, 64), (64, 128), (128, 128)]
    fitted = profile_costs(_SimPipeline(clock, truth), Denoiser(clock, truth), sizes, 8, clock=clock, max_batch=5)
    assert calls[0] == [(128, 128)] * 5
    assert [(128, 128)] * 5 not in calls[1:]  # only warmed, never timed
    assert [(128, 128), (128, 128)] in calls[1:]  # twins of the largest size are profiled
    for shape in (BatchShape(((16, 16, 2),) * 2), BatchShape(((8, 8, 2), (16, 16, 2)))):
        assert fitted.predictor.predict(shape) == pytest.approx(truth.predictor.predict(shape), rel=1e-3)
    s = RequestState("x", GenerationParams("p", "", 128, 128, 10, 5.0, 0), 0.0)
    assert fitted.finish_s(s) == pytest.approx(truth.finish_s(s), rel=1e-3)
