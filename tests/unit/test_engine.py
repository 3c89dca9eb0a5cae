"""The step engine in-process (no server): exactness, batch invariance, continuous batching,
cancellation, policies. Text encoder and VAE run the exported ONNX files; the denoiser runs torch."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.engine import Engine
from tessera.executors.denoise import ConcatDenoiser, PatchDenoiser, TiledDenoiser, torch_call
from tessera.plan import EngineView, StepPlan
from tessera.request import FinishReason, GenerationParams, RequestState
from tessera.scheduler import ImageFcfsPolicy, StepFcfsPolicy

SIZES3 = [(64, 64), (64, 128), (128, 64)]  # pixels: latents 8x8, 8x16, 16x8


@pytest.fixture(scope="module", params=["unet", "dit"])
def stack(request, repo):
    from transformers import CLIPTokenizer

    from tessera.executors.factory import load_torch_denoiser
    from tessera.executors.ort import LocalComponents
    from tessera.generation import Txt2Img
    from tessera.spec import PipelineSpec

    prefix = "" if request.param == "unet" else "dit_"
    spec = PipelineSpec.load(repo / f"{prefix}engine" / "1" / "manifest.json")
    toks = [CLIPTokenizer.from_pretrained(repo / f"{prefix}engine" / "1" / d) for d in spec.tokenizers]
    pipeline = Txt2Img(spec, LocalComponents(spec, repo), toks)
    model = load_torch_denoiser(spec, repo)
    return spec, pipeline, model


def params(h, w, steps=4, seed=0, guidance=5.0):
    return GenerationParams("a red circle at top left", "", h, w, steps, guidance, seed)


def run_engine(engine: Engine, states: list[tuple[int, RequestState]], max_steps: int = 500) -> dict:
    """Add each state at its engine step number; step until done. Returns {id: final output}."""
    finals = {}
    pending = sorted(states, key=lambda p: p[0])
    while pending or engine.has_work():
        while pending and pending[0][0] <= engine.step_no:
            engine.add(pending.pop(0)[1])
        for out in engine.step():
            if out.final:
                finals[out.request_id] = out
        assert engine.step_no < max_steps
    return finals


def test_engine_patch_step_output_equals_whole_calls(stack):
    spec, pipeline, model = stack
    runs = [pipeline.start(params(h, w, seed=i)) for i, (h, w) in enumerate(SIZES3)]
    runs[1].step_index = 2  # requests at different step indices
    items = [pipeline.denoiser_inputs(r) for r in runs]
    whole = [torch_call(model, spec.family)(it) for it in items]
    patched, stats = PatchDenoiser(model, spec.family, spec.denoiser_multiple).run(items)
    assert stats.calls == 1 and stats.resolutions == (3,) and stats.requests == (3,)
    assert stats.batch == (10,)  # patch edge 8 cells (the GCD): 1 + 2 + 2 patches, x2 CFG halves
    for a, b in zip(whole, patched, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


def _images(pipeline, denoiser, requests, joins=None):
    engine = Engine(pipeline, denoiser, StepFcfsPolicy(max_batch=16))
    joins = joins or [0] * len(requests)
    states = [(j, RequestState(f"r{i}", p, 0.0)) for i, (j, p) in enumerate(zip(joins, requests, strict=True))]
    finals = run_engine(engine, states)
    assert all(o.finish_reason == FinishReason.COMPLETED for o in finals.values())
    return {k: o.image for k, o in finals.items()}, engine


def test_engine_exact_patches_final_images_equal_whole(stack):
    spec, pipeline, model = stack
    reqs = [params(h, w, seed=i) for i, (h, w) in enumerate(SIZES3)]
    whole, _ = _images(pipeline, ConcatDenoiser(torch_call(model, spec.family)), reqs)
    patched, engine = _images(pipeline, PatchDenoiser(model, spec.family, spec.denoiser_multiple), reqs)
    assert all(r.denoiser_calls == 1 and r.resolutions_per_call == (3,) for r in engine.records)
    for k in whole:
        assert np.abs(whole[k].astype(int) - patched[k].astype(int)).max() <= 1


def test_engine_batch_invariance_alone_vs_shared(stack):
    """A request alone == the same request sharing steps with 3 others of other sizes and step indices."""
    spec, pipeline, model = stack
    den = PatchDenoiser(model, spec.family, spec.denoiser_multiple)
    target = params(64, 128, steps=6, seed=42)
    alone, _ = _images(pipeline, den, [target])
    others = [params(64, 64, steps=8, seed=1), params(128, 64, steps=5, seed=2), params(128, 128, steps=7, seed=3)]
    shared, engine = _images(pipeline, den, [others[0], others[1], target, others[2]], joins=[0, 1, 2, 3])
    assert np.abs(alone["r0"].astype(int) - shared["r2"].astype(int)).max() <= 1
    mixed = [r for r in engine.records if "r2" in r.request_ids and len(set(r.step_indices)) > 1]
    assert mixed, "the target shared steps with requests at other step indices"
    assert max(len(set(r.resolutions)) for r in engine.records) >= 3


def test_engine_continuous_batching_join_mid_way(stack):
    spec, pipeline, model = stack
    den = ConcatDenoiser(torch_call(model, spec.family))
    _, engine = _images(pipeline, den, [params(64, 64, steps=6), params(64, 64, steps=3, seed=1)], joins=[0, 2])
    first = engine.records[2]
    assert first.request_ids == ("r0", "r1") and first.step_indices == (2, 0)
    assert first.denoiser_calls == 1 and first.requests_per_call == (2,)
    assert [len(r.request_ids) for r in engine.records] == [1, 1, 2, 2, 2, 1]


def test_engine_cancel_100_mid_denoise_frees_state_and_keeps_others(stack):
    spec, pipeline, model = stack
    den = ConcatDenoiser(torch_call(model, spec.family))
    keep = [params(64, 64, steps=4, seed=7), params(64, 128, steps=4, seed=8)]
    ref, _ = _images(pipeline, den, keep)
    engine = Engine(pipeline, den, StepFcfsPolicy(max_batch=128))
    for i, p in enumerate(keep):
        engine.add(RequestState(f"r{i}", p, 0.0))
    for i in range(100):
        engine.add(RequestState(f"c{i}", params(64, 64, steps=4, seed=100 + i, guidance=1.0), 0.0))
    engine.step()
    engine.step()  # everyone is mid-way
    cancelled = [engine.abort(f"c{i}") for i in range(100)]
    assert all(o.finish_reason == FinishReason.CANCELLED and o.step_index == 2 for o in cancelled)
    assert engine.abort("c0") is None
    finals = {}
    while engine.has_work():
        finals.update({o.request_id: o for o in engine.step() if o.final})
    assert set(finals) == {"r0", "r1"} and engine.in_flight == 0
    assert not engine.waiting and not engine.running
    for k in ("r0", "r1"):  # batch composition changes float summation order only
        assert np.abs(finals[k].image.astype(int) - ref[k].astype(int)).max() <= 1


def test_engine_tiled_whole_tile_is_exact_small_tiles_are_not(stack):
    spec, pipeline, model = stack
    run = pipeline.start(params(128, 128))
    items = [pipeline.denoiser_inputs(run)]
    call = torch_call(model, spec.family)
    whole = call(items[0])
    same, stats = TiledDenoiser(call, tile=16, overlap=4).run(items)
    assert stats.batch == (2,) and np.abs(same[0] - whole).max() < 1e-5
    tiled, stats = TiledDenoiser(call, tile=8, overlap=4).run(items)
    assert stats.batch == (2 * 9,)  # 3x3 tiles of 8 cells at stride 4, CFG halves
    assert np.abs(tiled[0] - whole).max() > 1e-3


def test_policy_image_fcfs_runs_one_resolution_to_completion():
    a = RequestState("a", params(64, 64), 0.0)
    b = RequestState("b", params(64, 128), 0.0)
    c = RequestState("c", params(64, 64), 0.0)

    plan = ImageFcfsPolicy().schedule(EngineView((a, b, c), ()), 0.0)
    assert plan.join == ("a", "c") and plan.advance == ("a", "c")
    plan = ImageFcfsPolicy().schedule(EngineView((b,), (a, c)), 0.0)
    assert plan.join == () and plan.advance == ("a", "c")
    plan = StepFcfsPolicy(max_batch=2).schedule(EngineView((b, c), (a,)), 0.0)
    assert plan.join == ("b",) and plan.advance == ("a", "b")


class _Plan:
    """A policy that advances everyone and degrades one running request once, at a given step."""

    def __init__(self, rid: str, at_step: int, total: int):
        self.rid, self.at_step, self.total = rid, at_step, total

    def schedule(self, view, now_s):
        join = tuple(s.request_id for s in view.waiting)
        advance = tuple(s.request_id for s in view.running) + join
        degrade = ((self.rid, self.total),) if view.step_no == self.at_step else ()
        return StepPlan(join, advance, (), degrade)


def test_engine_early_exit_ends_with_clean_latent_and_reports_steps(stack):
    from tessera.early_exit import ExitRule

    spec, pipeline, model = stack
    den = ConcatDenoiser(torch_call(model, spec.family))
    rule = ExitRule(epsilon=1e9, window=1, min_fraction=0.5, min_steps=1, last_step="x0")  # fires at the floor
    engine = Engine(pipeline, den, StepFcfsPolicy(), exit_rule=rule, early_exit=True)
    opt_out = RequestState("off", GenerationParams("a red circle at top left", "", 64, 64, 8, 5.0, 1, None, False), 0.0)
    finals = run_engine(engine, [(0, RequestState("on", params(64, 64, steps=8), 0.0)), (0, opt_out)])
    on, off = finals["on"], finals["off"]
    assert on.finish_reason == FinishReason.COMPLETED and on.exited and on.step_index == 4 and on.asked_steps == 8
    assert off.step_index == 8 and not off.exited
    # the same request by hand: 4 steps, then decode the 4th step's predicted clean latent
    run = pipeline.start(params(64, 64, steps=8))
    for _ in range(4):
        pipeline.step(run)
    run.latents = run.x0
    assert np.abs(pipeline.finish(run).astype(int) - on.image.astype(int)).max() <= 1
    # x0_hat is the sampler's own clean estimate: the final step lands (almost: DDIM without
    # set_alpha_to_one stops at alpha_0 ~ 0.999) on it
    full = pipeline.start(params(64, 64, steps=8))
    while not full.done:
        pipeline.step(full)
    err = float((full.x0 - full.latents).abs().max() / full.latents.abs().max())
    assert err < 1e-2 and len(full.entropies) == 8
    jump = Engine(pipeline, den, StepFcfsPolicy(), exit_rule=ExitRule(1e9, 1, 0.5, 1, "jump"), early_exit=True)
    out = run_engine(jump, [(0, RequestState("j", params(64, 64, steps=8), 0.0))])["j"]
    assert out.step_index == 4 and len(jump.records) == 4  # 3 + the jump = the floor of 4


def test_engine_degrades_a_running_request_to_a_step_budget(stack):
    spec, pipeline, model = stack
    den = ConcatDenoiser(torch_call(model, spec.family))
    engine = Engine(pipeline, den, _Plan("a", at_step=2, total=5))
    finals = run_engine(engine, [(0, RequestState("a", params(64, 64, steps=10), 0.0)),
                                 (0, RequestState("b", params(64, 64, steps=10, seed=3), 0.0))])
    assert finals["a"].finish_reason == FinishReason.DEGRADED and finals["a"].step_index == 5
    assert finals["a"].asked_steps == 10 and finals["b"].step_index == 10
    assert [len(r.request_ids) for r in engine.records] == [2] * 5 + [1] * 5
