"""The engine's adapter plug-in as the cost model and the metrics see it: K and the expected load time set at
admission, the adapter cost in the step predictor's features, the wait at K in a lone request's time, and
the counters the metrics export."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.adapters import AdapterCounters, LoraAdapters, NoAdapters
from tessera.cost import CostModel
from tessera.lora_registry import LoraRegistry
from tessera.lora_spec import NO_LORA, LoraSet
from tessera.predictor import STEP_FEATURES, LatencyPredictor
from tessera.request import GenerationParams, RequestState
from test_bal import WAIT_S, _release_loaders, loaded, setup  # noqa: F401 - the fixture closes loaders


def state(rid, lora=NO_LORA, size=64, steps=10, guidance=5.0):
    return RequestState(rid, GenerationParams("x", "", size, size, steps, guidance, 0, lora=lora), 0.0)


def cost(per_cell=0.001, base=0.01, adapter_per_cell=0.0005) -> CostModel:
    p = LatencyPredictor()
    p.coef = np.array([base, per_cell, 0.0, 0.0, 0.0, adapter_per_cell, 0.0])
    return CostModel(p, vae_factor=8)


def adapters(default_k=5):
    store, loader, bal = setup(default_k=default_k)
    return store, loader, LoraAdapters(LoraRegistry(None), loader, bal)


def test_step_features_count_adapter_cells_of_adapted_rows_only():
    c = cost()
    x, plain, small = (state("x", LoraSet.of([("a", 1.0)])), state("p"),
                       state("s", LoraSet.of([("b", 0.5)]), size=32, guidance=1.0))
    assert STEP_FEATURES[-2:] == ("adapter_cells", "control_cells")
    # planning ahead: every request that asked for adapters has them; 64x64 -> 8x8 cells, CFG rows x2
    assert c.shape([x, plain, small]).adapter_cells == 8 * 8 * 2 + 4 * 4 * 1
    # at the step the engine says who carries them (x still loading: runs on the base model)
    assert c.shape([x, plain, small], [False, False, True]).adapter_cells == 4 * 4 * 1
    with_x = c.step_s([x]) - c.step_s([state("y")])
    assert with_x == pytest.approx(0.0005 * 8 * 8 * 2)


def test_terms_round_trip_and_old_terms_have_no_adapter_cost():
    c = cost()
    terms = c.terms()
    assert terms["step_adapter_cells"] == 0.0005
    assert CostModel.from_terms(terms, 8).predictor.coef.tolist() == c.predictor.coef.tolist()
    old = {k: v for k, v in terms.items() if k != "step_adapter_cells"}  # recorded before adapters
    assert CostModel.from_terms(old, 8).predictor.coef[-1] == 0.0
    with pytest.raises(KeyError):
        CostModel.from_terms({k: v for k, v in terms.items() if k != "step_cells"}, 8)


def test_alone_time_adds_the_wait_at_k_not_hidden_by_the_first_k_steps():
    c = cost(adapter_per_cell=0.0)
    s = state("x", LoraSet.of([("a", 1.0)]), steps=10)
    step = c.step_s([s])
    base = c.alone_s(s)
    s.adapter_k, s.adapter_load_s = 2, 5 * step
    assert c.alone_s(s) == pytest.approx(base + 3 * step)  # 2 steps hide 2 of the 5 steps' load
    s.adapter_k = 7
    assert c.alone_s(s) == pytest.approx(base)  # hidden entirely
    s.adapter_k = 0
    assert c.alone_s(s) == pytest.approx(base + 5 * step)  # K = 0: a synchronous load
    assert c.isolated_s(s) == pytest.approx(base)  # the default SLO is not stretched by a slow load


def test_admission_sets_k_and_the_expected_load_from_loads_so_far():
    store, loader, a = adapters(default_k=4)
    first = state("r1", LoraSet.of([("a", 1.0)]), steps=10)
    a.admit(first)
    assert (first.adapter_k, first.adapter_load_s) == (4, 0.0)  # no load measured yet: nothing to charge
    loaded(loader, store, "a")
    second = state("r2", LoraSet.of([("b", 1.0)]), steps=3)
    a.admit(second)
    stats = loader.stats()  # a and b's loads started, a's finished: the mean is over finished loads only
    assert (stats.loads, stats.in_flight) == (2, 1)
    assert second.adapter_k == 2 and second.adapter_load_s == pytest.approx(stats.load_s)
    cached = state("r3", LoraSet.of([("a", 0.5)]))
    a.admit(cached)
    assert cached.adapter_load_s == 0.0
    plain = state("r4")
    a.admit(plain)
    assert (plain.adapter_k, plain.adapter_load_s) == (0, 0.0)


def test_counters_follow_loads_hits_joins_and_waits():
    store, loader, a = adapters(default_k=1)
    assert NoAdapters().counters() == AdapterCounters()
    x = state("x", LoraSet.of([("a", 1.0)]), steps=4)
    a.admit(x)
    gate = a.gate([x])  # step 0 < K = 1: runs without
    assert gate.step == (x,) and gate.rows is None
    x.run = type("R", (), {"step_index": 1, "steps_left": 3})()
    assert a.gate([x]).wait == (x,)  # at K, still loading
    loaded(loader, store, "a")
    x.adapter_load_s = 0.5
    assert a.gate([x]).rows == ((("w:a", 1.0),),)  # joined after 1 step
    assert x.adapter_load_s == 0.0  # in memory: the cost model charges no more wait
    y = state("y", LoraSet.of([("a", 1.0)]), steps=4)
    a.admit(y)
    c = a.counters()
    assert (c.loads, c.cache_misses, c.cache_hits) == (1, 1, 1)
    assert (c.joins, c.steps_before_join, c.wait_steps, c.requests_waited) == (1, 1, 1, 1)
    assert (c.cache_entries, c.cache_bytes) == (1, 10) and c.load_bytes == 10 and c.load_failures == 0
    a.release("x")
    a.release("y")
    assert loader.wait("a", WAIT_S) == "w:a"


def test_one_set_batching_steps_the_most_urgent_requests_set_and_sets_the_rest_aside():
    from tessera.options import LoraBatching

    store, loader, bal = setup(default_k=0)
    a = LoraAdapters(LoraRegistry(None), loader, bal, LoraBatching.ONE_SET)
    x1, x2 = state("x1", LoraSet.of([("a", 1.0)])), state("x2", LoraSet.of([("a", 1.0)]))
    y, plain = state("y", LoraSet.of([("b", 1.0)])), state("p")
    x1.deadline_s, x2.deadline_s, y.deadline_s, plain.deadline_s = 5.0, 9.0, 3.0, 4.0
    for s in (x1, x2, y, plain):
        a.admit(s)
    loaded(loader, store, "a", "b")
    gate = a.gate([x1, x2, y, plain])
    assert gate.step == (y,) and gate.rows == ((("w:b", 1.0),),)
    assert [s.request_id for s in gate.wait] == ["x1", "x2", "p"]
    y.deadline_s = 10.0
    gate = a.gate([x1, x2, y, plain])  # p is now the most urgent: the base set alone
    assert gate.step == (plain,) and gate.rows is None
    plain.deadline_s = 11.0
    gate = a.gate([x1, x2, y, plain])  # x1 and x2 share one set: both step
    assert gate.step == (x1, x2) and gate.rows == ((("w:a", 1.0),),) * 2
    mixed = LoraAdapters(LoraRegistry(None), loader, bal)
    assert mixed.gate([x1, x2, y, plain]).step == (x1, x2, y, plain)
    for s in (x1, x2, y, plain):
        a.release(s.request_id)
