"""Pipelined decode (issue 16, decode.py): finished requests decoded on a thread of their own beside the next
steps give the images the loop gives, each answered once; a decode that raises fails its request alone; a request
aborted mid-decode is answered once; in the simulator the decode lane overlaps the steps."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tessera.bench.simulate import simulate
from tessera.bench.traces import Trace, TraceRequest
from tessera.cost import CostModel
from tessera.decode import LoopDecode, PipelinedDecode, VirtualPipelinedDecode
from tessera.engine import Engine
from tessera.executors.denoise import ConcatDenoiser
from tessera.predictor import LatencyPredictor
from tessera.request import FinishReason, GenerationParams, RequestState
from tessera.scheduler import StepFcfsPolicy

SIZES = [(64, 64), (64, 128), (128, 64), (64, 64)]


@pytest.fixture(scope="module")
def stack(repo):
    from transformers import CLIPTokenizer

    from tessera.executors.ort import LocalComponents
    from tessera.generation import Txt2Img
    from tessera.spec import PipelineSpec

    spec = PipelineSpec.load(repo / "engine" / "1" / "manifest.json")
    toks = [CLIPTokenizer.from_pretrained(repo / "engine" / "1" / d) for d in spec.tokenizers]
    comps = LocalComponents(spec, repo)
    return Txt2Img(spec, comps, toks), ConcatDenoiser(comps.denoise)


class Wrapped:
    """The real pipeline, whose finish raises for seed 13 and waits on `gate` for seed 7."""

    def __init__(self, pipeline):
        self.pipeline, self.gate = pipeline, threading.Event()

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def finish(self, run):
        if run.params.seed == 13:
            raise RuntimeError("vae exploded")
        if run.params.seed == 7:
            assert self.gate.wait(30)
        return self.pipeline.finish(run)


def _run(engine: Engine, seeds, steps=(3, 5, 2, 4), limit=2000) -> dict[str, list]:
    for i, ((h, w), seed, n) in enumerate(zip(SIZES, seeds, steps, strict=True)):
        engine.add(RequestState(f"r{i}", GenerationParams("a red circle at top left", "", h, w, n, 5.0, seed), 0.0))
    outs: dict[str, list] = {}
    for _ in range(limit):
        if not engine.has_work():
            break
        for o in engine.step():
            if o.final:
                outs.setdefault(o.request_id, []).append(o)
    assert not engine.has_work()
    return outs


def test_pipelined_decode_gives_the_loop_images_each_answered_once(stack):
    pipeline, denoiser = stack
    loop = _run(Engine(pipeline, denoiser, StepFcfsPolicy(max_batch=4)), [1, 2, 3, 4])
    piped_engine = Engine(pipeline, denoiser, StepFcfsPolicy(max_batch=4),
                          decoder=PipelinedDecode(pipeline, __import__("time").monotonic))
    piped = _run(piped_engine, [1, 2, 3, 4])
    piped_engine.decoder.close()
    assert sorted(piped) == sorted(loop) == ["r0", "r1", "r2", "r3"]
    for rid in loop:
        assert len(piped[rid]) == 1 and len(loop[rid]) == 1
        a, b = loop[rid][0], piped[rid][0]
        assert a.finish_reason is b.finish_reason is FinishReason.COMPLETED
        assert a.image.shape == b.image.shape and np.array_equal(a.image, b.image)
        assert b.done_s >= b.arrival_s
    assert not piped_engine.finishing and piped_engine.in_flight == 0


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_decode_that_raises_fails_its_request_alone(stack, pipelined):
    import time

    pipeline, denoiser = stack
    wrapped = Wrapped(pipeline)
    wrapped.gate.set()
    decoder = PipelinedDecode(wrapped, time.monotonic) if pipelined else LoopDecode(wrapped, time.monotonic)
    outs = _run(Engine(wrapped, denoiser, StepFcfsPolicy(max_batch=4), decoder=decoder), [1, 13, 3, 4])
    decoder.close()
    assert [len(v) for v in outs.values()] == [1, 1, 1, 1]
    assert outs["r1"][0].finish_reason is FinishReason.ERROR and "decode failed" in str(outs["r1"][0].error)
    assert "vae exploded" in str(outs["r1"][0].error)
    assert all(outs[r][0].finish_reason is FinishReason.COMPLETED for r in ("r0", "r2", "r3"))


def test_a_request_aborted_while_decoding_is_answered_once(stack):
    import time

    pipeline, denoiser = stack
    wrapped = Wrapped(pipeline)
    decoder = PipelinedDecode(wrapped, time.monotonic)
    engine = Engine(wrapped, denoiser, StepFcfsPolicy(max_batch=4), decoder=decoder)
    engine.add(RequestState("slow", GenerationParams("a red circle at top left", "", 64, 64, 2, 5.0, 7), 0.0))
    engine.add(RequestState("fast", GenerationParams("a red circle at top left", "", 64, 64, 4, 5.0, 8), 0.0))
    finals = []
    while "slow" not in engine.finishing:
        finals += [o for o in engine.step() if o.final]
    assert engine.has_work() and engine.in_flight == 2  # decoding still counts as in flight
    out = engine.abort("slow")
    assert out is not None and out.finish_reason is FinishReason.CANCELLED
    wrapped.gate.set()
    while engine.has_work():
        finals += [o for o in engine.step() if o.final]
    decoder.close()
    assert [o.request_id for o in finals] == ["fast"]  # the late decode of "slow" is not answered again
    assert engine.abort("slow") is None


def _cost(finish_s: float) -> CostModel:
    p = LatencyPredictor()
    p.coef = np.array([0.01, 0.001, 0.0, 0.0, 0.0, 0.0, 0.0])  # 64 px: 0.138 s a step (CFG rows 2)
    return CostModel(p, vae_factor=8, finish_base_s=finish_s)


def test_simulated_pipelined_decode_overlaps_the_steps_at_saturation():
    """20 requests of 10 steps at once, one at a time (image-fcfs), a decode of 0.69 s each (half a request's
    steps): on the loop every decode holds the next request; pipelined, each runs beside the next request's
    steps, so the last answer comes 19 decodes earlier."""
    tr = Trace("hand", {}, tuple(TraceRequest(0.0, 64, 64, 10, i) for i in range(20)))
    slo = {(64, 64): 1e9}
    loop = simulate(tr, "image-fcfs", _cost(0.69), slo, charge_policy=False, max_batch=1)
    piped = simulate(tr, "image-fcfs", _cost(0.69), slo, charge_policy=False, max_batch=1, decode="pipelined")
    assert all(r.status == "ok" for r in loop + piped) and len(piped) == 20
    end_loop, end_piped = max(r.latency_ms for r in loop), max(r.latency_ms for r in piped)
    assert end_loop == pytest.approx(20 * (1380 + 690), rel=1e-6)
    assert end_piped == pytest.approx(20 * 1380 + 690, rel=1e-6)


def test_virtual_decode_lane_is_one_at_a_time():
    from tessera.bench.simulate import VirtualClock

    clock = VirtualClock()
    lane = VirtualPipelinedDecode(clock, _cost(1.0))
    a, b = (RequestState(r, GenerationParams("x", "", 64, 64, 10, 5.0, 0), 0.0) for r in "ab")
    lane.submit(a)
    lane.submit(b)
    assert lane.collect() == []
    got = lane.collect(wait_s=0.001)  # waiting moves the clock to the first done
    assert [d.state.request_id for d in got] == ["a"] and clock.t == pytest.approx(1.0)
    assert [d.done_s for d in lane.collect(wait_s=0.001)] == [pytest.approx(2.0)]
