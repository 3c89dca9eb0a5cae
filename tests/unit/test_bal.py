"""BAL at step boundaries (join before K, wait at K, K = 0 is synchronous, failed loads answer with an error)
and the per-step grouping of rows into merged or batched adapter application."""

from __future__ import annotations

import threading

import pytest

from tessera.bal import Bal, BalAction, LoraMode, LoraRowPlan, decide, effective_k, group_rows
from tessera.lora_cache import LoadState, LoraCache, LoraLoader, LoraLoadError
from tessera.lora_spec import NO_LORA, LoraSet

WAIT_S = 10.0
_MADE: list = []


class Store:
    """Adapters that load when their gate opens; names in `broken` fail."""

    def __init__(self):
        self.gates: dict[str, threading.Event] = {}
        self.broken: set[str] = set()
        self.opened = False
        self.lock = threading.Lock()

    def gate(self, name):
        with self.lock:
            event = self.gates.setdefault(name, threading.Event())
            if self.opened:
                event.set()
            return event

    def open_all(self):
        """Let every load finish (at the end of a test: no loader thread outlives it)."""
        with self.lock:
            self.opened = True
            for event in self.gates.values():
                event.set()

    def load(self, name):
        assert self.gate(name).wait(WAIT_S)
        if name in self.broken:
            raise OSError("truncated safetensors")
        return f"w:{name}", 10


@pytest.fixture(autouse=True)
def _release_loaders():
    yield
    while _MADE:
        store, loader = _MADE.pop()
        store.open_all()
        loader.close()


def setup(k_by_name=None, default_k=5):
    store = Store()
    loader = LoraLoader(LoraCache(1000), lambda n: n, store.load)
    k_by_name = k_by_name or {}
    bal = Bal(loader, lambda name, steps: min(steps, k_by_name.get(name, default_k)))
    _MADE.append((store, loader))
    return store, loader, bal


def loaded(loader, store, *names):
    for name in names:
        store.gate(name).set()
        loader.wait(name, WAIT_S)


def lora(*names, scale=1.0):
    return LoraSet.of((n, scale) for n in names)


def test_bal_joins_at_the_first_boundary_after_loading_before_k():
    store, loader, bal = setup(default_k=5)
    assert bal.admit("r1", lora("outline"), num_steps=10) == 5
    d = bal.step("r1", 0, 10)
    assert (d.action, d.lora, d.missing, d.runs) == (BalAction.RUN_WITHOUT, NO_LORA, ("outline",), True)
    assert bal.step("r1", 1, 10).action is BalAction.RUN_WITHOUT
    loaded(loader, store, "outline")
    d = bal.step("r1", 2, 10)
    assert (d.action, d.lora, d.joined_at_step, d.runs) == (BalAction.JOIN, lora("outline"), 2, True)
    d = bal.step("r1", 3, 10)
    assert (d.action, d.lora, d.joined_at_step) == (BalAction.WITH, lora("outline"), 2)
    c = bal.counters()
    assert (c.requests, c.joins, c.steps_before_join) == (1, 1, 2)
    assert (c.joined_before_first_step, c.wait_steps) == (0, 0)
    loader.close()


def test_bal_waits_at_k_while_missing_then_joins():
    store, loader, bal = setup(default_k=2)
    bal.admit("r1", lora("stripes"), 10)
    assert [bal.step("r1", s, 10).action for s in (0, 1)] == [BalAction.RUN_WITHOUT] * 2
    d = bal.step("r1", 2, 10)  # step K reached, adapter still missing: sits out
    assert (d.action, d.runs, d.k, d.missing) == (BalAction.WAIT, False, 2, ("stripes",))
    assert bal.step("r1", 2, 10).action is BalAction.WAIT  # the next boundary: still waiting
    assert bal.waiting_for() == {"stripes"}
    loaded(loader, store, "stripes")
    d = bal.step("r1", 2, 10)
    assert (d.action, d.joined_at_step) == (BalAction.JOIN, 2)
    assert bal.waiting_for() == frozenset()
    c = bal.counters()
    assert (c.wait_steps, c.requests_waited, c.joins, c.steps_before_join) == (2, 1, 1, 2)
    loader.close()


def test_bal_k_zero_is_a_synchronous_load():
    store, loader, bal = setup(default_k=0)
    assert bal.admit("r1", lora("dark"), 10) == 0
    d = bal.step("r1", 0, 10)
    assert (d.action, d.runs) == (BalAction.WAIT, False)  # no step without the adapter
    loaded(loader, store, "dark")
    d = bal.step("r1", 0, 10)
    assert (d.action, d.joined_at_step) == (BalAction.JOIN, 0)
    c = bal.counters()
    assert (c.joined_before_first_step, c.steps_before_join, c.requests_waited) == (1, 0, 1)
    loader.close()


def test_bal_cached_adapter_joins_before_the_first_step():
    store, loader, bal = setup(default_k=5)
    bal.admit("r1", lora("outline"), 10)
    loaded(loader, store, "outline")
    bal.finish("r1")
    bal.admit("r2", lora("outline", scale=0.5), 10)
    d = bal.step("r2", 0, 10)
    assert (d.action, d.joined_at_step, d.lora) == (BalAction.JOIN, 0, lora("outline", scale=0.5))
    assert loader.cache.stats().hits == 1
    loader.close()


def test_bal_failed_load_answers_with_an_error_not_a_hang():
    store, loader, bal = setup(default_k=3)
    store.broken.add("stripes")
    bal.admit("r1", lora("outline", "stripes"), 10)
    store.gate("outline").set()
    store.gate("stripes").set()
    with pytest.raises(LoraLoadError):
        loader.wait("stripes", WAIT_S)
    loader.wait("outline", WAIT_S)
    d = bal.step("r1", 0, 10)  # before K: answered at once, it does not run on without its adapter
    assert (d.action, d.runs, d.lora) == (BalAction.FAIL, False, NO_LORA)
    assert isinstance(d.error, LoraLoadError) and d.error.adapter == "stripes"
    assert "truncated safetensors" in str(d.error)
    assert bal.step("r1", 0, 10).action is BalAction.FAIL
    assert bal.counters().failures == 1
    bal.finish("r1")
    assert loader.state("stripes") is LoadState.ABSENT  # released: the next request retries
    assert loader.cache.pins("outline") == 0 and bal.counters().active == 0
    loader.close()


def test_bal_k_is_the_smallest_of_the_set_and_never_past_the_last_step():
    store, loader, bal = setup(k_by_name={"outline": 8, "stripes": 3, "dark": 50})
    assert bal.admit("r1", lora("outline", "stripes"), 50) == 3
    assert bal.admit("r2", lora("dark"), 50) == 50
    # r2's profiled K is past its last step: it waits at the last step rather than finish without "dark"
    assert bal.step("r2", 48, 50).action is BalAction.RUN_WITHOUT
    d = bal.step("r2", 49, 50)
    assert (d.action, d.k) == (BalAction.WAIT, 49)
    # degraded to fewer steps: K follows the new last step
    assert bal.step("r2", 9, 10).action is BalAction.WAIT
    assert [effective_k(10, 5), effective_k(3, 5), effective_k(-1, 5), effective_k(0, 1)] == [4, 3, 0, 0]
    loader.close()


def test_bal_joins_a_set_only_when_all_of_it_is_in_memory():
    store, loader, bal = setup(default_k=5)
    bal.admit("r1", lora("outline", "stripes"), 10)
    loaded(loader, store, "outline")
    d = bal.step("r1", 1, 10)
    assert (d.action, d.missing) == (BalAction.RUN_WITHOUT, ("stripes",))
    loaded(loader, store, "stripes")
    assert bal.step("r1", 2, 10).action is BalAction.JOIN
    loader.close()


def test_bal_requests_without_adapters_and_bookkeeping():
    store, loader, bal = setup()
    assert bal.admit("plain", NO_LORA, 10) == 0
    d = bal.step("plain", 0, 10)
    assert (d.action, d.runs, d.lora) == (BalAction.BASE, True, NO_LORA)
    assert bal.counters().requests == 0 and loader.stats().loads == 0
    bal.admit("r1", lora("outline"), 10)
    bal.admit("r2", lora("outline"), 10)
    assert loader.cache.pins("outline") == 2 and loader.stats().loads == 1
    with pytest.raises(ValueError, match="admitted twice"):
        bal.admit("r1", lora("outline"), 10)
    bal.finish("r1")
    bal.finish("r2")
    bal.finish("r2")  # answered twice (e.g. cancel after finish): harmless
    assert loader.cache.pins("outline") == 0 and bal.counters().active == 0
    store.gate("outline").set()
    loader.close()


def test_bal_decide_is_pure():
    s = lora("a", "b")
    ready = {"a": LoadState.READY, "b": LoadState.READY}
    assert decide(s, 4, 2, 10, ready).action is BalAction.JOIN
    assert decide(s, 4, 2, 10, {"a": LoadState.READY}).missing == ("b",)  # absent from states: missing
    assert decide(s, 1, 2, 10, {"a": LoadState.LOADING}).action is BalAction.RUN_WITHOUT
    assert decide(s, 7, 2, 10, {}, joined_at_step=1).action is BalAction.WITH
    failed = decide(s, 0, 2, 10, {"a": LoadState.FAILED, "b": LoadState.READY})
    assert failed.action is BalAction.FAIL and failed.error.adapter == "a"


def test_group_rows_merged_when_every_row_has_the_same_set():
    s = lora("outline", "stripes", scale=0.5)
    plan = group_rows([s, s, s])
    assert plan.mode is LoraMode.MERGED and plan.merged == s
    assert plan.adapters == ("outline", "stripes")
    assert plan.rows == (((0, 0.5), (1, 0.5)),) * 3


def test_group_rows_batched_for_mixed_sets_including_rows_without():
    a, b = lora("outline"), LoraSet.of([("stripes", 0.7), ("dark", -1.0)])
    plan = group_rows([a, NO_LORA, b, a])
    assert plan.mode is LoraMode.BATCHED and plan.merged == NO_LORA
    assert plan.adapters == ("dark", "outline", "stripes")
    assert plan.rows == (((1, 1.0),), (), ((0, -1.0), (2, 0.7)), ((1, 1.0),))
    assert plan.scales() == ((0.0, 1.0, 0.0), (0.0, 0.0, 0.0), (-1.0, 0.0, 0.7), (0.0, 1.0, 0.0))


def test_group_rows_same_names_different_scales_is_batched():
    plan = group_rows([lora("outline", scale=1.0), lora("outline", scale=0.5)])
    assert plan.mode is LoraMode.BATCHED and plan.rows == (((0, 1.0),), ((0, 0.5),))


def test_group_rows_none():
    assert group_rows([NO_LORA, NO_LORA]) == LoraRowPlan(LoraMode.NONE, (), ((), ()))
    assert group_rows([]).mode is LoraMode.NONE
