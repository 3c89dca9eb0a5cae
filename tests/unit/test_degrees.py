"""Degree-choosing policies (issue 16): TetriServe's allocation and group-knapsack DP, the tetris round, fixed
and RSSP baselines, the placers, the degree table, and the simulator on several virtual workers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tessera.cost import CostModel, DegreeTable, balance
from tessera.degrees import FixedDegreePolicy, TetrisPolicy, allocation, free_block, knapsack, parse_rssp
from tessera.engine import Engine
from tessera.errors import ConfigError
from tessera.placement import LeastWork, RoundRobin, groups_of
from tessera.plan import EngineView
from tessera.predictor import LatencyPredictor
from tessera.policies import make_policy



def req(rid, size=64, steps=10, arrival=0.0, deadline=math.inf):
    from tessera.request import GenerationParams, RequestState

    s = RequestState(rid, GenerationParams("x", "", size, size, steps, 5.0, 0), arrival)
    s.deadline_s, s.isolated_s = deadline, 1.0
    return s


def pool_cost(workers=2, per_cell=0.0001, base=0.001, ratio_small=0.95, ratio_big=0.55) -> CostModel:
    """Step at degree 1 = base + per_cell x cells x rows (256 px: 0.2058 s, 64 px: 0.0138 s); at degree 2 x0.95
    for 64 px, x0.55 for 256 px."""
    p = LatencyPredictor()
    p.coef = np.array([base, per_cell, 0.0, 0.0, 0.0, 0.0, 0.0])
    table = DegreeTable(workers, {k: [[128.0, ratio_small], [2048.0, ratio_big]] for k in (2, 4, 8) if k <= workers})
    return CostModel(p, vae_factor=8, degrees=table)


def test_allocation_least_worker_time_mix_of_adjacent_degrees():
    times = {1: 1.0, 2: 0.6, 4: 0.4}
    assert allocation(10, times, 20.0) == [(1, 10)]  # degree 1 meets it: cheapest
    # 10 steps in 8 s: n_hi = ceil((10 - 8) / 0.4) = 5 at degree 2, 5 at degree 1 (8.0 s; 5 + 6 = 11 worker-s)
    assert allocation(10, times, 8.0) == [(1, 5), (2, 5)]
    assert allocation(10, times, 6.0) == [(2, 10)]  # exactly degree 2 throughout
    parts = allocation(10, times, 5.0)  # between degrees 2 and 4
    assert [k for k, _ in parts] == [2, 4] and sum(n for _, n in parts) == 10
    assert sum(n * times[k] for k, n in parts) <= 5.0
    assert allocation(10, times, 3.9) is None  # even degree 4 throughout takes 4 s


def test_knapsack_maximises_survivors_within_capacity():
    # three requests on 2 workers: a survives only at width 2, b and c only at width 1 each
    options = [[(0, 0), (2, 1000)], [(0, 0), (1, 1000)], [(0, 0), (1, 1000)]]
    assert knapsack(options, 2) == [0, 1, 1]  # b and c (2 survivors) beat a alone (1)
    assert knapsack(options, 4) == [1, 1, 1]
    assert knapsack([[(0, 0), (1, 5)], [(0, 7), (1, 3)]], 1) == [1, 0]
    assert knapsack([], 8) == []


def test_knapsack_64_requests_8_workers_is_optimal_against_brute_force_on_small_cases():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n, cap = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        options = [[(0, int(rng.integers(0, 2)) * 1000)] + [(int(w), int(rng.integers(0, 2)) * 1000 + 100 - int(w))
                                                           for w in rng.choice([1, 2, 4], size=2, replace=False)]
                   for _ in range(n)]
        chosen = knapsack(options, cap)
        assert sum(options[i][j][0] for i, j in enumerate(chosen)) <= cap
        value = sum(options[i][j][1] for i, j in enumerate(chosen))
        best = -math.inf
        for combo in np.ndindex(*[len(o) for o in options]):
            if sum(options[i][j][0] for i, j in enumerate(combo)) <= cap:
                best = max(best, sum(options[i][j][1] for i, j in enumerate(combo)))
        assert value == best


def test_free_block_prefers_last_place_and_aligned_blocks():
    assert free_block(2, 4, set()) == (0, 1)
    assert free_block(2, 4, {0}) == (2, 3)
    assert free_block(2, 4, {1, 2}) is None  # (1, 2) is not aligned
    assert free_block(1, 4, {0}, prefer=(3,)) == (3,)
    assert free_block(1, 4, {3}, prefer=(3,)) == (0,)


def test_degree_table_interpolates_and_learns():
    t = DegreeTable(2, {2: [[100.0, 0.9], [10_000.0, 0.5]]})
    assert t.degrees() == [1, 2]
    assert t.ratio(1, 5.0) == 1.0 and t.ratio(4, 100.0) == math.inf
    assert t.ratio(2, 1_000.0) == pytest.approx(0.7)  # halfway in log cells
    assert t.ratio(2, 10.0) == 0.9 and t.ratio(2, 1e6) == 0.5
    t.observe(2, 9_000.0, 0.6, 1.0, alpha=0.5)
    assert t.ratios[2][1][1] == pytest.approx(0.55)
    assert DegreeTable.from_json(t.to_json()) == t


def test_tetris_gives_the_large_request_two_workers_and_keeps_them_for_the_round():
    cost = pool_cost()
    big = req("big", size=256, steps=10, deadline=0.0)  # 32x32 cells x 2 rows: 2.058 s alone, 1.13 s at degree 2
    big.deadline_s = 1.2  # only degree 2 throughout makes it (at 1.5 s: 3 steps at degree 1 first, then 2)
    small = req("small", size=64, steps=10, deadline=100.0)
    pol = TetrisPolicy(cost, round_steps=5, margin=0.0)
    plan = pol.schedule(EngineView((big, small), ()), 0.0)
    assert dict(plan.place) == {"big": (0, 1)}  # the small one waits: it survives a round's wait
    assert plan.join == ("big",)
    # inside the round: the same members on the same workers, nobody joins
    big.run = type("R", (), {"steps_left": 9, "step_index": 1, "done": False})()  # running, 1 step done
    view = EngineView((small,), (big,), step_no=1, last_advance=frozenset({"big"}), places=(("big", (0, 1)),), workers=2)
    plan = pol.schedule(view, 0.2)
    assert plan.advance == ("big",) and dict(plan.place) == {"big": (0, 1)} and plan.join == ()


def test_tetris_small_requests_stay_at_degree_one_and_leftover_workers_scale_up():
    cost = pool_cost(workers=4)
    a, b = req("a", size=64, steps=10, deadline=30.0), req("b", size=256, steps=10, deadline=30.0)
    plan = TetrisPolicy(cost, margin=0.0).schedule(EngineView((a, b), ()), 0.0)
    place = dict(plan.place)
    assert len(place["a"]) == 1  # 64 px gains 5% from degree 2: not worth a worker
    assert len(place["b"]) >= 2  # the large one takes the leftover workers (elastic scale-up)
    assert not set(place["a"]) & set(place["b"])


def test_tetris_drops_only_requests_hopeless_at_their_fastest_degree():
    cost = pool_cost()
    pol = TetrisPolicy(cost, margin=0.0)
    saved = req("s", size=256, steps=10, deadline=1.5)  # hopeless at degree 1 (2.06 s), fine at 2 (1.14 s)
    lost = req("l", size=256, steps=10, deadline=1.0)
    plan = pol.schedule(EngineView((saved, lost), ()), 0.0)
    assert [d for d, _ in plan.drop] == ["l"] and "s" in plan.advance
    assert pol.refuse(EngineView((), ()), lost, 0.0) is not None
    assert pol.refuse(EngineView((), ()), saved, 0.0) is None


def test_fixed_degree_is_first_come_first_served_without_preemption():
    pol = FixedDegreePolicy(workers=2, degree=1)
    w = tuple(req(f"w{i}", arrival=0.1 * i) for i in range(3))
    plan = pol.schedule(EngineView(w, ()), 0.0)
    assert plan.join == ("w0", "w1") and dict(plan.place) == {"w0": (0,), "w1": (1,)}
    rssp = FixedDegreePolicy(workers=2, degree=1, per_size={(256, 256): 2})
    big, small = req("big", size=256), req("small", size=64)
    assert dict(rssp.schedule(EngineView((big, small), ()), 0.0).place) == {"big": (0, 1)}  # small waits behind it
    assert dict(rssp.schedule(EngineView((small, big), ()), 0.0).place) == {"small": (0,)}
    with pytest.raises(ConfigError, match="fixed_degree"):
        FixedDegreePolicy(workers=2, degree=3)


def test_parse_rssp_names_the_setting():
    assert parse_rssp("512x512:2, 256x256:1") == (((512, 512), 2), ((256, 256), 1))
    with pytest.raises(ConfigError, match="rssp"):
        parse_rssp("512:2")
    with pytest.raises(ConfigError, match="rssp"):
        make_policy("rssp", workers=2)


def test_least_work_balances_and_round_robin_keeps_turns():
    cost = pool_cost()
    states = [req("big", size=256), req("s1"), req("s2"), req("s3")]
    places = LeastWork(2, cost).place(states, {})
    by = dict(zip([s.request_id for s in states], places, strict=True))
    assert by["big"] == (0,) and {by["s1"], by["s2"], by["s3"]} == {(1,)}  # the big one alone on a worker
    rr = RoundRobin(2)
    assert rr.place(states, {}) == [(0,), (1,), (0,), (1,)]
    assert rr.place(states[::-1], {}) == [(1,), (0,), (1,), (0,)]  # kept where first placed
    # turns are taken at arrival: a request that arrived and never stepped (refused, dropped) still took one
    rr = RoundRobin(2)
    for s in (req("a"), req("refused"), req("b"), req("c")):
        rr.arrive(s)
    assert rr.place([req("c"), req("b"), req("a")], {}) == [(1,), (0,), (0,)]
    assert LeastWork(2, cost).place(states, {"big": (0, 1)})[0] == (0, 1)
    groups = groups_of(states, [False] * 4, places)
    assert sorted(len(g) for g, _, _ in groups) == [1, 3] and all(k == 1 for _, _, k in groups)


def test_cost_step_with_workers_is_the_slowest_balanced_worker():
    one, two = pool_cost(workers=1), pool_cost(workers=2)
    a, b = req("a", size=256), req("b", size=256)
    assert two.step_s([a, b]) == pytest.approx(one.step_s([a]))  # one each, side by side
    assert one.step_s([a, b]) > 1.9 * two.step_s([a, b]) - 0.02
    assert two.step_at(a, 2) == pytest.approx(one.step_s([a]) * 0.55)
    assert [len(g) for g in balance([a, b, req("c")], 2, two.group_s)] == [2, 1]


def test_multi_set_slowdown_is_learned_from_steps_of_several_sets_and_replayed():
    """Steps where two worker sets ran at once teach `multi_set` (measured / slowest predicted set); it scales
    every several-set prediction, survives terms() -> from_terms(), and one set alone is never scaled."""
    cost = pool_cost()
    a, b = req("a", size=256), req("b", size=256)
    slowest = cost.group_s([a])
    groups = [([a], [False], 1), ([b], [False], 1)]
    assert cost.sets_s(groups) == pytest.approx(slowest)
    for _ in range(200):
        cost.observe_step(groups, 1.5 * slowest)
    assert cost.multi_set == pytest.approx(1.5, rel=1e-3)
    assert cost.sets_s(groups) == pytest.approx(1.5 * slowest, rel=1e-3)
    assert cost.sets_s(groups[:1]) == pytest.approx(slowest)
    assert cost.step_s([a, b]) == pytest.approx(1.5 * slowest, rel=1e-3)  # one each, on both workers
    coef = cost.predictor.coef.copy()
    cost.observe_step(groups, 100 * slowest)  # clipped: one outlier moves it by at most alpha x (4 - m)
    assert cost.multi_set <= 1.5 + 0.05 * 2.5 + 1e-9 and np.array_equal(cost.predictor.coef, coef)
    cost.degrees.observe(2, 2048.0, 0.8, 1.0, alpha=0.5)  # a served refit of the table travels with the terms
    back = CostModel.from_terms(cost.terms(), 8)
    assert back.multi_set == cost.multi_set and back.degrees.ratios == cost.degrees.ratios
    assert back.degrees.ratios[2] == [[128.0, 0.95], [2048.0, 0.675]] and back.degrees.workers == 2
    assert CostModel.from_terms({k: v for k, v in cost.terms().items() if k != "multi_set"}, 8).multi_set == 1.0
    three = pool_cost(workers=3)  # the workers travel too (a k=2 table over 3 workers)
    assert CostModel.from_terms(three.terms(), 8).degrees.workers == 3


def test_served_means_replay_a_windows_mean_not_the_last_moving_average():
    """The moving averages end where the last steps left them; the served sums give a window's mean (what the
    simulator replays): two readings of `served` around a window, sum measured / sum predicted per term."""
    cost = pool_cost()
    a, b, big = req("a", size=256), req("b", size=256), req("big", size=512)
    slowest = cost.group_s([a])
    groups = [([a], [False], 1), ([b], [False], 1)]
    for _ in range(50):
        cost.observe_step(groups, 1.2 * slowest)
    before = dict(cost.served)
    for _ in range(30):  # the window: 30 steps at 1.1x, then 10 at 1.5x (the moving average ends near 1.5)
        cost.observe_step(groups, 1.1 * slowest)
    for _ in range(10):
        cost.observe_step(groups, 1.5 * slowest)
    base = cost.predictor.predict(cost.shape([big]))
    for r in (0.6, 0.7):  # degree 2: the window's mean ratio at the nearest point
        cost.observe_step([([big], [False], 2)], r * base)
    after = dict(cost.served)
    assert cost.multi_set > 1.25  # the moving average, well above the mean
    mean = cost.served_means(before, after)
    assert mean.multi_set == pytest.approx((30 * 1.1 + 10 * 1.5) / 40, rel=1e-9)
    cells = cost.row_cells([big])
    near = min(cost.degrees.ratios[2], key=lambda p: abs(np.log(p[0]) - np.log(cells)))
    got = dict((c, r) for c, r in mean.degrees.ratios[2])
    assert got[near[0]] == pytest.approx(0.65, rel=1e-9)
    others = [c for c, _ in cost.degrees.ratios[2] if c != near[0]]  # untaught points keep the model's value
    assert all(got[c] == dict(map(tuple, cost.degrees.ratios[2]))[c] for c in others)
    assert cost.served_means(after, after).multi_set == cost.multi_set  # an empty window changes nothing


def test_simulated_engine_on_two_workers_runs_tetris_plans():
    """The simulator's engine with 2 virtual workers: a large request runs at degree 2 (its steps take the
    table's time), every request is answered, and the placements are recorded."""
    from tessera.bench.simulate import simulate
    from tessera.bench.traces import Trace, TraceRequest

    cost = pool_cost()
    trace = Trace("test", {}, (TraceRequest(0.0, 256, 256, 10, 0), TraceRequest(0.01, 64, 64, 10, 1)))
    slo = {(256, 256): 1500.0, (64, 64): 3000.0}
    res = simulate(trace, "tetris", cost, slo, workers=2, charge_policy=False, gap_s=0.0)
    assert [r.status for r in res] == ["ok", "ok"] and all(r.met for r in res)
    fixed = simulate(trace, "fixed", cost, slo, workers=2, charge_policy=False, gap_s=0.0)
    assert not fixed[0].met  # degree 1 for the large one: 2.06 s > 1.5 s
