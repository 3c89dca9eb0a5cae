"""DiffServe's cascade (issue 17), pure logic: routing at hand-set confidences and thresholds, the deferral
profile, the MILP controller under hand-built demand, and the settings' errors."""

from __future__ import annotations

import pytest

from tessera.cascade import CascadeSettings, DeferralProfile, Route, Router
from tessera.cascade_control import Controller, ServiceCosts, solve
from tessera.errors import ConfigError
from tessera.options import Routing

GRID = tuple(round(0.1 * i, 1) for i in range(11))
PROFILE = DeferralProfile(GRID, (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 0.9, 1.0))
COSTS = ServiceCosts(light_s=0.05, heavy_s=0.3)


@pytest.mark.parametrize("confidence, threshold, defer", [
    (0.9, 0.5, False), (0.5, 0.5, False), (0.49, 0.5, True), (0.0, 0.0, False), (0.99, 1.0, True), (0.2, 0.1, False),
])
def test_static_and_controlled_routing_keep_the_light_image_at_or_above_the_threshold(confidence, threshold, defer):
    for routing in (Routing.STATIC, Routing.CONTROLLED):
        route = Router(CascadeSettings(routing=routing)).route(confidence, threshold)
        assert route == Route(defer, "below threshold" if defer else "confident")


def test_light_heavy_and_random_routing_ignore_the_confidence():
    assert Router(CascadeSettings(routing="light")).route(None, 0.9) == Route(False, "light only")
    heavy = Router(CascadeSettings(routing="heavy"))
    assert heavy.route(None, 0.0) == Route(True, "heavy only") and not heavy.runs_light and not heavy.scores
    r = Router(CascadeSettings(routing="random", defer_fraction=0.3, seed=7))
    defers = [r.route(None, 0.5).defer for _ in range(10_000)]
    assert 0.28 < sum(defers) / len(defers) < 0.32 and r.runs_light and not r.scores
    again = Router(CascadeSettings(routing="random", defer_fraction=0.3, seed=7))
    assert [again.route(None, 0.5).defer for _ in range(100)] == defers[:100]  # seeded
    with pytest.raises(ValueError, match="confidence"):
        Router(CascadeSettings(routing="static")).route(None, 0.5)


def test_deferral_profile_is_measured_interpolated_and_inverted():
    p = DeferralProfile.measure([0.1, 0.2, 0.3, 0.8], (0.0, 0.25, 0.5, 1.0))
    assert p.deferral == (0.0, 0.5, 0.75, 1.0)
    assert p.f(0.375) == pytest.approx(0.625)
    assert p.threshold_for(0.6) == 0.5 and p.threshold_for(0.0) == 0.0 and p.threshold_for(2.0) == 1.0
    assert DeferralProfile.from_json(p.to_json()) == p


def test_controller_lowers_the_threshold_as_demand_grows():
    """Hand-built demand: more requests per second can only lower the threshold (fewer deferrals); the heavy
    compute the plan asks for covers demand x f(t) x heavy_s; overload answers light-only, flagged infeasible."""
    plans = [solve(lam, PROFILE, COSTS, slo_s=3.0, cores=2.0) for lam in (0.5, 2, 4, 6, 8, 10, 15, 20, 30, 40)]
    thresholds = [p.threshold for p in plans]
    assert thresholds == sorted(thresholds, reverse=True) and thresholds[0] == 1.0 and thresholds[-1] == 0.0
    assert len(set(thresholds)) >= 4
    for p in plans:
        assert p.light_cores + p.heavy_cores <= 2.0 + 1e-9
        if p.feasible and p.deferral > 0:
            assert p.heavy_cores >= p.demand_rps * p.deferral * COSTS.heavy_s - 1e-9
            assert p.heavy_cap >= 1
    assert plans[0].feasible and not plans[-1].feasible and plans[-1].deferral == 0.0
    tight = solve(6, PROFILE, COSTS, slo_s=1.0, cores=2.0)  # a tighter SLO: less deferred at the same demand
    assert tight.threshold < plans[3].threshold
    tiny = DeferralProfile(tuple(t * 1e-4 for t in GRID), PROFILE.deferral)  # a saturated discriminator's grid
    assert [solve(lam, tiny, COSTS, 3.0, 2.0).deferral for lam in (0.5, 6, 30)] == [p.deferral for p in
                                                                                  (plans[0], plans[3], plans[8])]


def test_a_pipeline_that_can_use_one_core_gets_at_most_one_and_less_is_deferred():
    """An engine of one single-threaded process cannot use the host's second core: with heavy_max 1 the plan never
    gives the heavy pipeline more than one core, and where two would have carried more deferrals it defers less."""
    free = [solve(lam, PROFILE, COSTS, slo_s=3.0, cores=2.0) for lam in (2, 4, 6, 8)]
    capped = [solve(lam, PROFILE, COSTS, slo_s=3.0, cores=2.0, heavy_max=1.0) for lam in (2, 4, 6, 8)]
    assert all(p.heavy_cores <= 1.0 + 1e-9 for p in capped)
    assert all(c.deferral <= f.deferral for c, f in zip(capped, free, strict=True))
    assert any(c.deferral < f.deferral for c, f in zip(capped, free, strict=True))
    assert any(f.heavy_cores > 1.0 for f in free)  # the uncapped plans did use more than one core
    with pytest.raises(ConfigError, match="heavy_max_cores: must be > 0"):
        Controller(PROFILE, COSTS, cores=2.0, heavy_max=0.0)


def test_controller_re_solves_each_window_from_a_moving_average_of_demand():
    now = [0.0]
    c = Controller(PROFILE, COSTS, cores=2.0, period_s=2.0, alpha=0.5, start_threshold=0.5, clock=lambda: now[0])
    assert c.arrive(3.0).threshold == 0.5  # no window closed yet: the start threshold
    for i in range(1, 40):  # 20 rps for 2 s
        now[0] = i * 0.05
        c.arrive(3.0)
    now[0] = 2.0
    first = c.arrive(3.0)
    assert c.demand_rps == pytest.approx(20.0) and first.threshold < 0.5 and len(c.history) == 1
    for i in range(1, 4):  # 4 requests over the next 2 s (the one at 2.0 s included): 2 rps, averaged with 20
        now[0] = 2.0 + i * 0.6
        c.arrive(None)
    now[0] = 4.0
    second = c.arrive(3.0)
    assert c.demand_rps == pytest.approx(0.5 * 20 + 0.5 * 2.0) and second.threshold > first.threshold


@pytest.mark.parametrize("field, value, match", [
    ("routing", "sometimes", "routing: unknown value; allowed controlled, static, random, light, heavy"),
    ("threshold", 1.5, "threshold"), ("defer_fraction", -0.1, "defer_fraction"), ("light_steps", 0, "light_steps"),
    ("control_s", 0.0, "control_s"),
])
def test_settings_errors_name_the_field_and_the_allowed_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        CascadeSettings(**{field: value})
    with pytest.raises(ConfigError, match="threshold: expected float"):
        CascadeSettings.from_parameters({"threshold": "high"})


def test_a_mistyped_parameter_or_a_bad_cost_is_refused_at_load():
    from tessera.cascade import ENTRY_PARAMETERS

    with pytest.raises(ConfigError, match="treshold: not a cascade setting; allowed .*threshold"):
        CascadeSettings.from_parameters({"treshold": "0.4", "light": "light_engine"}, ENTRY_PARAMETERS)
    assert CascadeSettings.from_parameters({"threshold": "0.4", "light": "x"}, ENTRY_PARAMETERS).threshold == 0.4
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="light_s: must be a finite number of seconds > 0"):
            ServiceCosts(bad, 0.3)
    with pytest.raises(ConfigError, match="cores: must be > 0"):
        Controller(PROFILE, COSTS, cores=0.0)


def test_a_failed_solve_keeps_the_plan_in_force_and_the_next_window_tries_again(monkeypatch):
    import tessera.cascade_control as cc

    now = [0.0]
    c = Controller(PROFILE, COSTS, cores=2.0, period_s=1.0, start_threshold=0.3, clock=lambda: now[0])
    real = cc.solve
    monkeypatch.setattr(cc, "solve", lambda *a, **k: (_ for _ in ()).throw(ValueError("solver down")))
    now[0] = 1.5
    assert c.arrive(3.0).threshold == 0.3 and c.history == [] and c.window_start == 1.5
    monkeypatch.setattr(cc, "solve", real)
    now[0] = 3.0
    assert len(c.history) == 0 and c.arrive(3.0) is c.plan and len(c.history) == 1


def test_add_cascade_checks_models_and_settings(tmp_path):
    from tessera.errors import ExportError
    from tessera_export.repository import add_cascade

    for m in ("light_engine", "engine", "discriminator"):
        (tmp_path / m).mkdir()
        (tmp_path / m / "config.pbtxt").write_text(f'name: "{m}"\n')
    with pytest.raises(ExportError, match="model 'nope' is not in"):
        add_cascade(tmp_path, "cascade", "nope", "engine")
    with pytest.raises(ExportError, match="thresold: not a cascade setting; allowed"):
        add_cascade(tmp_path, "cascade", "light_engine", "engine", routing="static", thresold=0.4)
    with pytest.raises(ExportError, match="light_s, heavy_s: required"):
        add_cascade(tmp_path, "cascade", "light_engine", "engine")
    with pytest.raises(ConfigError, match="routing: unknown value"):
        add_cascade(tmp_path, "cascade", "light_engine", "engine", routing="sometimes")
    for bad in (0, -1, "two", float("inf")):
        with pytest.raises(ExportError, match="heavy_max_cores: must be a finite number of cores > 0"):
            add_cascade(tmp_path, "cascade", "light_engine", "engine", routing="static", heavy_max_cores=bad)
    cfg = (add_cascade(tmp_path, "cascade", "light_engine", "engine", routing="static", threshold=0.4)
           / "config.pbtxt").read_text()
    assert 'key: "threshold" value: { string_value: "0.4" }' in cfg and 'name: "model" data_type: TYPE_STRING' in cfg
