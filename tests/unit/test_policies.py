"""Scheduling policies in hand-built situations (fake clock, fake cost model: no models, no server)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from tessera.cost import CostModel
from tessera.plan import EngineView
from tessera.predictor import BatchShape, LatencyPredictor
from tessera.request import GenerationParams, RequestState
from tessera.policies import POLICIES, make_policy
from tessera.scheduler import EdfMhPolicy, SlackPolicy


@dataclass
class FakeRun:
    steps_left: int
    step_index: int = 0


def cost_model(per_cell=0.001, base=0.01) -> CostModel:
    """Step = base + per_cell x (cells x rows); join 0, finish 0: easy arithmetic."""
    p = LatencyPredictor()
    p.coef = np.array([base, per_cell, 0.0, 0.0, 0.0, 0.0, 0.0])
    return CostModel(p, vae_factor=8)


def req(rid, size=64, steps=10, arrival=0.0, deadline=math.inf, started_steps_left=None):
    s = RequestState(rid, GenerationParams("x", "", size, size, steps, 5.0, 0), arrival)
    s.deadline_s = deadline
    s.isolated_s = 1.0
    if started_steps_left is not None:
        s.run = FakeRun(started_steps_left, steps - started_steps_left)
    return s


def test_cost_finish_times_shrinking_batch():
    cost = cost_model()
    # 64px -> 8x8 cells, CFG rows 2 -> 128 cells: step alone 0.01 + 0.128 = 0.138 s
    a = req("a", started_steps_left=2)
    b = req("b", started_steps_left=5)
    ft = cost.finish_times([a, b], 0.0)
    both = 0.01 + 0.256
    assert ft["a"] == pytest.approx(2 * both)
    assert ft["b"] == pytest.approx(2 * both + 3 * 0.138)


def test_slack_refuses_admission_that_makes_active_request_late():
    cost = cost_model()
    active = req("a", started_steps_left=10, deadline=10 * 0.138 + 0.5)  # on time alone (1.88 s)
    newcomer = req("n", steps=10, deadline=100.0)  # relaxed itself, but would slow "a" to 2.66 s
    view = EngineView((newcomer,), (active,))
    plan = SlackPolicy(cost=cost, relaxed_slack=1e9).schedule(view, 0.0)
    assert plan.join == () and plan.advance == ("a",)
    roomy = req("a", started_steps_left=10, deadline=5.0)
    plan = SlackPolicy(cost=cost, relaxed_slack=1e9).schedule(EngineView((newcomer,), (roomy,)), 0.0)
    assert plan.join == ("n",) and plan.advance == ("a", "n")


def test_slack_least_slack_first_and_throughput_mode():
    cost = cost_model()
    loose = req("loose", deadline=50.0, arrival=0.0)
    tight = req("tight", deadline=2.0, arrival=0.1)
    policy = SlackPolicy(max_batch=1, cost=cost, relaxed_slack=100.0)
    assert policy.schedule(EngineView((loose, tight), ()), 0.2).join == ("tight",)
    relaxed = SlackPolicy(max_batch=1, cost=cost, relaxed_slack=0.1)  # everyone's slack > 0.1: FCFS
    assert relaxed.schedule(EngineView((loose, tight), ()), 0.2).join == ("loose",)


def test_hopeless_dropped_with_reason_or_degraded():
    cost = cost_model()
    hopeless = req("h", steps=20, deadline=1.0)  # 20 x 0.138 = 2.76 s alone > 1 s
    plan = SlackPolicy(cost=cost).schedule(EngineView((hopeless,), ()), 0.0)
    assert plan.join == () and len(plan.drop) == 1
    rid, reason = plan.drop[0]
    assert rid == "h" and reason.startswith("deadline cannot be met: predicted finish 2760 ms")
    plan = SlackPolicy(cost=cost, on_hopeless="degrade", min_steps=4, margin=0.0).schedule(EngineView((hopeless,), ()), 0.0)
    assert plan.drop == () and plan.degrade == (("h", 7),) and plan.join == ("h",)  # 7 x 0.138 <= 1 s
    too_tight = req("t", steps=20, deadline=0.3)  # 2 steps would fit: below the floor of 4
    plan = SlackPolicy(cost=cost, on_hopeless="degrade", min_steps=4).schedule(EngineView((too_tight,), ()), 0.0)
    assert [d[0] for d in plan.drop] == ["t"]


def test_rounds_replans_only_at_boundaries_and_pauses_to_save_deadlines():
    cost = cost_model()
    late_maker = req("big", size=128, started_steps_left=20, deadline=100.0)  # 16x16 cells: slow step
    urgent = req("u", steps=5, deadline=5 * 0.138 + 0.05)  # on time only if it runs alone
    view = EngineView((urgent,), (late_maker,), step_no=10, last_advance=frozenset({"big"}))
    with_margin = EdfMhPolicy(cost=cost, round_steps=5, margin=0.1).schedule(view, 0.0)
    assert with_margin.advance == ("big",), "0.74 s stretched by 10% misses 0.74 s: u is set aside"
    plan = EdfMhPolicy(cost=cost, round_steps=5, margin=0.0).schedule(view, 0.0)
    assert plan.join == ("u",) and plan.advance == ("u",), "the big request pauses for this round"
    mid = EngineView((urgent,), (late_maker,), step_no=11, last_advance=frozenset({"big"}))
    plan = EdfMhPolicy(cost=cost, round_steps=5).schedule(mid, 0.0)
    assert plan.join == () and plan.advance == ("big",), "no change between round boundaries"


def test_rounds_sets_aside_the_longest_request_that_would_make_the_plan_late():
    """Moore-Hodgson on the serial EDF plan: "big" (5.22 s alone) would push "c" past its deadline after
    "a"; it is set aside (waits, not dropped: alone it still fits), and both small ones are served."""
    cost = cost_model()
    a = req("a", steps=10, deadline=2.0)  # 64 px: 1.38 s alone
    big = req("big", size=128, steps=10, deadline=6.0, arrival=0.01)  # 5.22 s alone
    c = req("c", steps=10, deadline=6.5, arrival=0.02)
    policy = EdfMhPolicy(cost=cost)
    assert [s.request_id for s in policy.admit([a, big, c], 0.0)[0]] == ["a", "c"]
    plan = policy.schedule(EngineView((a, big, c), ()), 0.0)
    assert plan.drop == () and "big" not in plan.advance
    # a and c batched: 10 x 0.266 = 2.66 s > a's 2.0 s deadline, so a runs alone this round ...
    assert plan.advance == ("a",)
    # ... but with room for both, they share the round's steps
    roomy = req("a", steps=10, deadline=3.0)
    assert EdfMhPolicy(cost=cost).schedule(EngineView((roomy, c), ()), 0.0).advance == ("a", "c")


def test_finish_times_decode_earliest_deadline_first():
    """Requests finishing in the same step are decoded earliest deadline first (as the engine does)."""
    cost = cost_model()
    cost.finish_base_s = 1.0
    late = req("late", started_steps_left=1, deadline=9.0)
    early = req("early", started_steps_left=1, deadline=2.0)
    ft = cost.finish_times([late, early], 0.0)
    step = 0.01 + 0.256
    assert ft["early"] == pytest.approx(step + 1.0) and ft["late"] == pytest.approx(step + 2.0)


def test_step_gap_is_part_of_every_planned_step():
    cost = cost_model()
    alone = cost.step_s([req("a")])
    for _ in range(200):
        cost.observe_gap(0.02)
    assert cost.step_s([req("a")]) == pytest.approx(alone + 0.02, rel=1e-3)
    assert cost.gaps == 200 and cost.gap_total_s == pytest.approx(4.0)


def test_predictor_fits_and_reports_out_of_sample_error():
    rng = np.random.default_rng(0)
    truth = lambda sh: 0.004 + 0.0002 * sh.features()[1] + 0.001 * sh.features()[3]  # noqa: E731
    shapes = [BatchShape(tuple((int(rng.choice([8, 16])), 8, 2) for _ in range(rng.integers(1, 6))))
              for _ in range(60)]
    p = LatencyPredictor(refit_every=8)
    p.fit([(s, truth(s)) for s in shapes[:20]])
    for s in shapes[20:]:
        p.observe(s, truth(s) * (1 + rng.normal(0, 0.02)))
    assert p.mape is not None and p.mape < 0.05
    assert p.predict(shapes[0]) == pytest.approx(truth(shapes[0]), rel=0.05)


def test_predictor_keeps_the_profile_for_shapes_the_window_never_serves():
    """Served, a policy may step the large size only at degree > 1: the degree-1 window then holds small steps
    alone, which cannot pin the cells term. The profile stays in every refit: the served shape is predicted at
    its served cost (here 10% over the profile), the large size keeps its profiled cost (the degree table's
    ratios are measured against that same prediction, so it cancels there)."""
    truth = lambda sh: 0.01 + 1e-4 * sh.features()[1] + 0.005 * sh.features()[2]  # noqa: E731
    small, large = BatchShape(((16, 16, 2),)), BatchShape(((64, 64, 2),))
    profile = [BatchShape(((s, s, 2),) * n) for s in (16, 32, 64) for n in (1, 2)]
    p = LatencyPredictor(window=64, refit_every=8)
    p.fit([(s, truth(s)) for s in profile])
    for _ in range(200):  # only the small size, single, served 10% slow
        p.observe(small, 1.1 * truth(small))
    assert len(p.window) == 64 and len(p.anchors) == 6
    assert p.predict(small) == pytest.approx(1.1 * truth(small), rel=0.03)
    assert p.predict(large) == pytest.approx(truth(large), rel=0.03)
    bare = LatencyPredictor(window=64, refit_every=8)  # without anchors the line through one shape is arbitrary
    bare.window.extend((s.features(), truth(s)) for s in profile)
    bare._refit()
    for _ in range(200):
        bare.observe(small, 1.1 * truth(small))
    assert abs(bare.predict(large) / (1.1 * truth(large)) - 1) > 0.2


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_contract(name):
    """Every policy: advances only running or joining ids, respects the batch budget, joins only
    waiting ids, and never both drops and advances an id."""
    cost = cost_model()
    policy = make_policy(name, max_batch=3, cost=cost, rssp=(((64, 64), 1),))
    running = tuple(req(f"r{i}", started_steps_left=5, deadline=50.0) for i in range(2))
    waiting = tuple(req(f"w{i}", deadline=50.0 if i % 2 else 0.5, arrival=0.01 * i) for i in range(4))
    plan = policy.schedule(EngineView(waiting, running, step_no=0, last_advance=frozenset()), 0.0)
    waiting_ids = {s.request_id for s in waiting}
    running_ids = {s.request_id for s in running}
    assert set(plan.join) <= waiting_ids
    assert set(plan.advance) <= running_ids | set(plan.join)
    assert len(plan.advance) <= 3
    assert not {d for d, _ in plan.drop} & set(plan.advance)


def test_running_hopeless_request_gets_a_step_budget_in_degrade_mode():
    cost = cost_model()
    running = req("r", steps=20, deadline=1.0, started_steps_left=15)  # 5 done; 15 x 0.138 = 2.07 s > 1 s
    # slack: the steps that fit on the bare prediction (5 + 7 x 0.138 <= 1 s); rounds then plans with its
    # 10% margin, and admission cuts one more (6 x 0.138 x 1.1 <= 1 s)
    for policy, total in ((SlackPolicy, 12), (EdfMhPolicy, 11)):
        plan = policy(cost=cost, on_hopeless="degrade", min_steps=4).schedule(EngineView((), (running,)), 0.0)
        assert plan.drop == () and plan.degrade == (("r", total),) and plan.advance == ("r",)
    plan = SlackPolicy(cost=cost, on_hopeless="drop").schedule(EngineView((), (running,)), 0.0)
    assert [d[0] for d in plan.drop] == ["r"] and plan.degrade == ()
    barely = req("b", steps=20, deadline=0.2, started_steps_left=19)  # 1 done + 1 fits = 2 < floor 4: dropped
    plan = SlackPolicy(cost=cost, on_hopeless="degrade", min_steps=4).schedule(EngineView((), (barely,)), 0.0)
    assert [d[0] for d in plan.drop] == ["b"]
    fine = req("f", steps=20, deadline=100.0, started_steps_left=15)
    plan = SlackPolicy(cost=cost, on_hopeless="degrade").schedule(EngineView((), (fine,)), 0.0)
    assert plan.degrade == () and plan.drop == ()


def test_cost_model_refits_finishes_and_round_trips_its_terms():
    cost = cost_model()
    cost.observe_finishes([(64, 0.1), (256, 0.4)])  # 64 px and 128 px latents: 0.1 s + 0 base, linear
    assert cost.finish_s_per_cell == pytest.approx(0.3 / 192) and cost.finish_base_s == pytest.approx(0.1 - 64 * 0.3 / 192)
    for _ in range(64):  # the window forgets: decodes got twice as slow
        cost.observe_finishes([(64, 0.2), (256, 0.8)])
    assert cost.finish_s(req("a", size=128)) == pytest.approx(0.8)
    cost.observe_gap(0.01)
    again = CostModel.from_terms(cost.terms(), cost.vae_factor)
    a = req("a", size=128, steps=7)
    assert again.isolated_s(a) == pytest.approx(cost.isolated_s(a))


@pytest.mark.parametrize("params, message", [
    ({"deadline_margin": "1.5"}, "deadline_margin: allowed [0, 1], got 1.5"),
    ({"deadline_margin": "lots"}, "deadline_margin: not a number; allowed a float, got 'lots'"),
    ({"policy": "rounds", "on_hopeless": "shrug"}, "on_hopeless: unknown value; allowed drop, degrade"),
])
def test_engine_config_names_the_field_and_range(params, message):
    from tessera.config import EngineConfig
    from tessera.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        EngineConfig.from_parameters(params)
    assert message in str(e.value)
    assert EngineConfig.from_parameters({"deadline_margin": "0"}).deadline_margin == 0.0


def test_predictor_total_matches_measured_total_over_its_window():
    """Steps skewed slow (a few contended ones): the relative fit sits near the typical step, then is
    rescaled so its predictions over the window add up to the measured time (a queue compounds a shortfall)."""
    shapes = [BatchShape(((16, 16, 2),) * n) for n in (1, 2, 3, 4)] * 10
    truth = [0.002 + 0.004 * len(s.requests) for s in shapes]
    measured = [t * (1.5 if i % 10 == 0 else 1.0) for i, t in enumerate(truth)]  # every 10th step slowed
    p = LatencyPredictor()
    p.fit(zip(shapes, measured, strict=True))
    assert sum(p.predict(s) for s in shapes) == pytest.approx(sum(measured), rel=1e-9)
    assert p.predict(shapes[1]) > truth[1]  # above the typical step, by the slow steps' share


def test_rounds_degrade_shortens_the_longest_instead_of_setting_it_aside():
    """The set-aside situation above, with on_hopeless=degrade: "big" keeps its place with the fewer steps
    that put "c" back on time (QoS-Diff's step count from slack), instead of waiting until hopeless; below
    min_steps it is set aside as before."""
    cost = cost_model()
    a = req("a", steps=10, deadline=2.0)  # 64 px: 1.38 s alone
    big = req("big", size=128, steps=10, deadline=6.0, arrival=0.01)  # 0.522 s a step
    c = req("c", steps=10, deadline=6.5, arrival=0.02)
    kept, shortened = EdfMhPolicy(cost=cost, on_hopeless="degrade", min_steps=4, margin=0.0).admit([a, big, c], 0.0)
    # serial plan: 1.38 + 5.22 + 1.38 = 7.98 s; c's deadline 6.5 s: 1.48 s to save, ceil(1.48 / 0.522) = 3 steps
    assert [s.request_id for s in kept] == ["a", "big", "c"] and shortened == {"big": 7}
    assert sum(cost.alone_s(s) for s in kept) <= 6.5
    kept, shortened = EdfMhPolicy(cost=cost, on_hopeless="degrade", min_steps=8, margin=0.0).admit([a, big, c], 0.0)
    assert [s.request_id for s in kept] == ["a", "c"] and shortened == {}
    plan = EdfMhPolicy(cost=cost, on_hopeless="degrade", margin=0.0).schedule(EngineView((a, big, c), ()), 0.0)
    assert ("big", 7) in plan.degrade and plan.drop == ()
