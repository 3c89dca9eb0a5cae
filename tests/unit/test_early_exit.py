"""Entropy early exit: the stopping rule on synthetic entropy traces, the entropy definitions, the running
degrade plan, and the engine applying both on a real (tiny) pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tessera.early_exit import ExitRule, gaussian_entropy, histogram_entropy
from tessera.errors import ConfigError


def first_stop(rule: ExitRule, trace, asked: int):
    """Steps done when the rule first fires on `trace` (None: never)."""
    return next((k for k in range(1, len(trace) + 1) if rule.should_stop(trace[:k], asked)), None)


def settling(n=50, settle_at=12, jitter=0.0):
    """Entropy falling by 0.05/step until `settle_at`, then flat (+ alternating +-jitter)."""
    t = np.arange(1, n + 1)
    h = 2.0 - 0.05 * np.minimum(t, settle_at)
    return list(h + jitter * (-1.0) ** t)


def test_stops_after_window_of_small_changes():
    trace = settling(settle_at=20)
    # deltas are 0.05 up to step 20, then 0: after step 20 + w the last w deltas are all 0
    assert first_stop(ExitRule(0.01, 1, 0.0, 1, "x0"), trace, 50) == 21
    assert first_stop(ExitRule(0.01, 3, 0.0, 1, "x0"), trace, 50) == 23


def test_never_before_floor():
    trace = settling(settle_at=2)  # settled almost at once
    rule = ExitRule(0.01, 2, min_fraction=0.4, min_steps=4, last_step="x0")
    assert rule.floor(50) == 20
    assert first_stop(rule, trace, 50) == 20
    assert ExitRule(0.01, 2, 0.1, 8, "x0").floor(50) == 8  # min_steps wins
    assert ExitRule(0.01, 2, 0.1, 8, "x0").floor(5) == 5  # never above the steps asked


def test_jump_counts_its_extra_step_against_floor_and_end():
    trace = settling(settle_at=2)
    rule = ExitRule(0.01, 2, 0.4, 4, "jump")
    assert first_stop(rule, trace, 50) == 19  # 19 done + the jump = 20 = the floor
    # no stop when the jump would be the request's own last step anyway
    assert first_stop(ExitRule(0.01, 1, 0.0, 1, "jump"), settling(n=10, settle_at=9), 10) is None


def test_noisy_trace_does_not_stop_below_epsilon_floor():
    trace = settling(settle_at=10, jitter=0.02)  # deltas 0.04 after settling
    assert first_stop(ExitRule(0.002, 2, 0.0, 1, "x0"), trace, 50) is None
    assert first_stop(ExitRule(0.1, 2, 0.0, 1, "x0"), trace, 50) is not None


def test_never_stops_on_the_last_step():
    trace = settling(n=10, settle_at=1)
    assert first_stop(ExitRule(1.0, 1, 0.0, 1, "x0"), trace, 10) == 2
    assert not ExitRule(1.0, 1, 0.0, 1, "x0").should_stop(trace, 10)  # all 10 done: nothing to save


@pytest.mark.parametrize("kw,field", [
    (dict(epsilon=-1), "exit_epsilon"), (dict(window=0), "exit_window"),
    (dict(min_fraction=1.5), "exit_min_fraction"), (dict(last_step="skip"), "last_step"),
])
def test_rule_rejects_bad_settings_naming_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        ExitRule(**kw)


def test_entropy_definitions():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (1, 4, 16, 16))
    assert gaussian_entropy(x) == pytest.approx(0.5 * math.log(2 * math.pi * math.e), abs=0.1)
    assert gaussian_entropy(x * 0.1) == pytest.approx(gaussian_entropy(x) + math.log(0.1), abs=1e-6)
    assert histogram_entropy(np.zeros((4, 8, 8))) == 0.0
    assert histogram_entropy(x) > histogram_entropy(x * 0.1)
