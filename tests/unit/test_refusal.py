"""Early refusal: Policy.refuse (the admission test a newcomer faces at submit) for every registered policy,
in hand-built situations (fake cost model, fake clock), and the simulator's early_refusal mode."""

from __future__ import annotations


import pytest

from tessera.bench.simulate import simulate
from tessera.bench.traces import Trace, TraceRequest
from tessera.options import PolicyName
from tessera.plan import EngineView
from tessera.request import GenerationParams, RequestState
from tessera.policies import POLICIES, make_policy
from test_policies import cost_model, req  # the same fake cost model and request builder

DEADLINE_POLICIES = ("slack", "edf-mh")
FCFS_POLICIES = ("image-fcfs", "step-fcfs", "fixed")
DEGREE_POLICIES = ("tetris", "rssp")  # refuse only the hopeless / never (test_degrees.py)


def queued(running: bool = False):
    """Two 64 px requests, 1.38 s alone each: due at 1.6 s and 3.2 s (serial plan 1.38, 2.76 s: on time with
    the 10% margin). The first has not started, or has (10 steps left of 12)."""
    first = req("q0", steps=12 if running else 10, deadline=1.6, started_steps_left=10 if running else None)
    second = req("q1", deadline=3.2)
    return EngineView((second,), (first,)) if running else EngineView((first, second), ())


def test_refusal_registry_is_covered():
    assert {p.value for p in POLICIES} == set(DEADLINE_POLICIES + FCFS_POLICIES + DEGREE_POLICIES)
    assert all(isinstance(k, PolicyName) for k in POLICIES)


@pytest.mark.parametrize("name", FCFS_POLICIES)
def test_refusal_fcfs_policies_never_refuse(name):
    policy = make_policy(name, max_batch=2, cost=cost_model())
    crowd = EngineView(tuple(req(f"w{i}", deadline=0.1) for i in range(20)),
                       tuple(req(f"r{i}", started_steps_left=9, deadline=0.1) for i in range(2)))
    hopeless = req("h", steps=50, deadline=0.01)
    assert policy.refuse(crowd, hopeless, 0.0) is None
    assert policy.refuse(EngineView((), ()), hopeless, 5.0) is None


@pytest.mark.parametrize("name", DEADLINE_POLICIES)
def test_refusal_hopeless_alone_is_refused_with_its_predicted_finish(name):
    policy = make_policy(name, cost=cost_model())
    hopeless = req("h", steps=20, deadline=1.0)  # 20 x 0.138 = 2.76 s alone > 1 s
    reason = policy.refuse(EngineView((), ()), hopeless, 0.0)
    assert reason == ("deadline cannot be met: predicted finish 2760 ms after arrival even if run alone, "
                      "deadline 1000 ms")
    late_arrival = req("l", steps=5, arrival=0.0, deadline=1.0)  # 0.69 s alone: fits at 0, not at 0.5 s
    assert policy.refuse(EngineView((), ()), late_arrival, 0.0) is None
    reason = policy.refuse(EngineView((), ()), late_arrival, 0.5)
    assert reason.startswith("deadline cannot be met: predicted finish 1190 ms")


@pytest.mark.parametrize("running", [False, True])
@pytest.mark.parametrize("name", DEADLINE_POLICIES)
def test_refusal_newcomer_set_aside_by_moore_hodgson_is_refused(name, running):
    """A 12-step newcomer (1.656 s) due at 3.5 s: alone it fits, behind the queued two (4.42 s) it does not,
    and it is the longest: Moore-Hodgson sets it aside, so it is refused now."""
    policy = make_policy(name, cost=cost_model())
    newcomer = req("n", steps=12, deadline=3.5)
    assert policy.refuse(EngineView((), ()), newcomer, 0.0) is None
    reason = policy.refuse(queued(running), newcomer, 0.0)
    assert reason == ("deadline cannot be met: the current plan (2 requests in flight) cannot fit it by its "
                      "deadline 3500 ms after arrival")


@pytest.mark.parametrize("name", DEADLINE_POLICIES)
def test_refusal_plan_carries_the_deadline_margin(name):
    """11 steps (1.518 s) after a 1.38 s request: 2.898 s, on time for 2.95 s on the bare prediction, not with
    the time to run stretched by the 10% margin."""
    first = EngineView((req("q0", deadline=1.6),), ())
    newcomer = req("n", steps=11, deadline=2.95)
    assert make_policy(name, cost=cost_model(), margin=0.1).refuse(first, newcomer, 0.0) is not None
    assert make_policy(name, cost=cost_model(), margin=0.0).refuse(first, newcomer, 0.0) is None


@pytest.mark.parametrize("name", DEADLINE_POLICIES)
def test_refusal_newcomer_that_fits_is_accepted(name):
    policy = make_policy(name, cost=cost_model())
    for running in (False, True):
        assert policy.refuse(queued(running), req("n", steps=12, deadline=10.0), 0.0) is None
        urgent = req("u", steps=5, deadline=0.8)  # short, due first
        assert policy.refuse(queued(running), urgent, 0.0) is None
    # planned in deadline order, not arrival order: a long newcomer due first goes ahead of a roomy one
    roomy = EngineView((req("q0", deadline=10.0),), ())
    assert policy.refuse(roomy, req("n", steps=12, deadline=2.5, arrival=0.5), 0.5) is None


@pytest.mark.parametrize("name", DEADLINE_POLICIES)
def test_refusal_accepts_a_short_newcomer_that_sets_a_longer_request_aside(name):
    """Not first come first served: the plan turns late only at the newcomer (7.98 s, x 1.1, past 7.6 s), but
    the longest request so far (128 px, 5.22 s) is the one Moore-Hodgson sets aside (it waits); the newcomer
    is not refused for it."""
    policy = make_policy(name, cost=cost_model())
    a = req("a", deadline=2.0)
    big = req("big", size=128, deadline=7.5, arrival=0.01)  # a then big: 6.6 s x 1.1 = 7.26 s, on time
    c = req("c", deadline=7.6, arrival=0.02)
    assert policy.refuse(EngineView((a, big), ()), c, 0.02) is None
    assert policy.refuse(EngineView((a, c), ()), big, 0.02) is not None


@pytest.mark.parametrize("name", DEADLINE_POLICIES)
def test_refusal_degrade_accepts_what_fits_with_fewer_steps(name):
    cost = cost_model()
    degrade = make_policy(name, cost=cost, on_hopeless="degrade", min_steps=4)
    drop = make_policy(name, cost=cost, on_hopeless="drop", min_steps=4)
    hopeless = req("h", steps=20, deadline=1.0)  # 6-7 steps fit before 1 s: at or above the floor of 4
    assert drop.refuse(EngineView((), ()), hopeless, 0.0) is not None
    assert degrade.refuse(EngineView((), ()), hopeless, 0.0) is None
    floor = make_policy(name, cost=cost, on_hopeless="degrade", min_steps=8)  # 7 steps: below the floor
    assert floor.refuse(EngineView((), ()), hopeless, 0.0) is not None
    too_tight = req("t", steps=20, deadline=0.3)  # 2 steps fit
    assert degrade.refuse(EngineView((), ()), too_tight, 0.0) is not None
    # behind the queued two: 12 steps due at 4 s overflow the plan (4.42 s); 6 fewer steps put it back on time
    newcomer = req("n", steps=12, deadline=4.0)
    assert drop.refuse(queued(), newcomer, 0.0) is not None
    assert degrade.refuse(queued(), newcomer, 0.0) is None
    # ... and 3.5 s would need it below the floor (3 steps): refused even when degrading
    assert degrade.refuse(queued(), req("m", steps=12, deadline=3.5), 0.0) is not None
    # refusing plans on copies: nobody's steps were changed
    assert hopeless.params.num_steps == 20 and newcomer.params.num_steps == 12
    assert [s.params.num_steps for s in queued().waiting] == [10, 10]


# -- the simulator with early refusal -------------------------------------------------------------------
SLO_MS = {(64, 64): 3000.0}


def overloaded() -> Trace:
    """Eight 64 px requests within 0.35 s, 10 to 17 steps (1.4 to 2.3 s alone each), due 3 s after arrival:
    at most two can be on time."""
    return Trace("overload", {}, tuple(TraceRequest(0.05 * i, 64, 64, 10 + i, i) for i in range(8)))


@pytest.mark.parametrize("name", DEADLINE_POLICIES)
def test_refusal_simulated_overload_refuses_at_arrival_and_never_runs_the_refused(name):
    res = simulate(overloaded(), name, cost_model(), SLO_MS, charge_policy=False, early_refusal="on")
    assert len(res) == 8
    statuses = [r.status for r in res]
    assert set(statuses) <= {"ok", "dropped", "refused"}
    assert statuses.count("refused") >= 4 and statuses[0] == "ok"
    for r in res:
        if r.status == "refused":
            assert r.steps_run is None and r.latency_ms is None and not r.met
        if r.status == "ok":
            assert r.steps_run is not None and r.steps_run > 0
    assert all(r.met for r in res if r.status == "ok"), "what was accepted made its deadline"
    plain = simulate(overloaded(), name, cost_model(), SLO_MS, charge_policy=False, early_refusal="off")
    assert "refused" not in {r.status for r in plain} and set(r.status for r in plain) <= {"ok", "dropped"}


@pytest.mark.parametrize("name", FCFS_POLICIES)
def test_refusal_simulated_fcfs_policies_refuse_nothing(name):
    res = simulate(overloaded(), name, cost_model(), SLO_MS, charge_policy=False, early_refusal="on")
    assert [r.status for r in res] == ["ok"] * 8


def test_refuse_strict_also_refuses_a_newcomer_that_pushes_an_admitted_request_out():
    """A short newcomer due before a long queued request: Moore-Hodgson keeps the newcomer and sets the long
    one aside (on: admitted); strict keeps its promise to the queued request and refuses the newcomer."""
    long = req("long", size=128, steps=10, deadline=6.0)  # 5.22 s alone
    view = EngineView((long,), ())
    newcomer = req("new", steps=10, deadline=2.0, arrival=0.0)  # 1.38 s alone: both cannot fit by 6 s
    assert make_policy("rounds", cost=cost_model(), early_refusal="on").refuse(view, newcomer, 0.0) is None
    reason = make_policy("rounds", cost=cost_model(), early_refusal="strict").refuse(view, newcomer, 0.0)
    assert reason is not None and reason.startswith("deadline cannot be met: the current plan")
