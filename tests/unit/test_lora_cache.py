"""The bytes-bounded LRU of loaded adapters (order, budget, pins, oversized entries, threads) and the
asynchronous loader (returns at once, load errors per adapter, delay, workers, shutdown)."""

from __future__ import annotations

import random
import sys
import threading

import pytest

from tessera.errors import ConfigError, ShutdownError, Status
from tessera.lora_cache import LoadState, LoraCache, LoraLoader, LoraLoadError

WAIT_S = 10.0  # generous bound for polls; never reached when the code works


# -- the cache -----------------------------------------------------------------------------------------------
def test_lora_cache_lru_order_and_budget():
    c = LoraCache[str](budget_bytes=30)
    assert c.put("a", "A", 10) == () and c.put("b", "B", 10) == () and c.put("c", "C", 10) == ()
    assert c.lookup("a") == "A"  # a is now the most recently used
    assert c.put("d", "D", 10) == ("b",)  # the least recently used goes
    assert c.names() == ("c", "a", "d")
    assert c.put("e", "E", 25) == ("c", "a", "d")  # as many as needed, oldest first
    assert c.names() == ("e",)
    s = c.stats()
    assert (s.evictions, s.bytes_evicted, s.bytes_held, s.entries) == (4, 40, 25, 1)
    assert s.bytes_inserted == 65 and s.budget_bytes == 30


def test_lora_cache_counts_hits_and_misses_but_peek_does_not():
    c = LoraCache[str](100)
    c.put("a", "A", 1)
    assert c.lookup("a") == "A" and c.lookup("b") is None and c.lookup("a") == "A"
    assert c.peek("a") == "A" and c.peek("zz") is None and "a" in c
    s = c.stats()
    assert (s.hits, s.misses) == (2, 1)


def test_lora_cache_peek_keeps_lru_order():
    c = LoraCache[str](20)
    c.put("a", "A", 10)
    c.put("b", "B", 10)
    c.peek("a")
    assert c.put("c", "C", 10) == ("a",)


def test_lora_cache_replacing_an_entry_updates_bytes():
    c = LoraCache[str](100)
    c.put("a", "A1", 40)
    c.put("a", "A2", 10)
    assert c.peek("a") == "A2" and c.stats().bytes_held == 10 and c.stats().entries == 1


def test_lora_cache_pinned_entries_are_never_evicted():
    c = LoraCache[str](20)
    c.put("a", "A", 10)
    c.pin("a")
    c.put("b", "B", 10)
    assert c.put("c", "C", 10) == ("b",)  # a is older but pinned
    c.put("d", "D", 10)  # c evicted
    assert c.names() == ("a", "d")
    c.pin("d")
    assert c.put("e", "E", 10) == ("e",)  # the newcomer is the only unpinned entry: it goes
    assert c.names() == ("a", "d")
    assert c.unpin("a") == ()  # fits the budget: kept, evictable again
    assert c.put("f", "F", 10) == ("a",)


def test_lora_cache_over_budget_only_through_pins():
    c = LoraCache[str](20)
    c.pin("a")
    c.pin("b")
    c.put("a", "A", 15)
    c.put("b", "B", 15)
    assert c.names() == ("a", "b") and c.stats().bytes_held == 30 and c.stats().pinned == 2
    assert c.unpin("a") == ("a",)  # its last pin: evicted to fit
    assert c.stats().bytes_held == 15


def test_lora_cache_pins_count_references_and_may_precede_the_entry():
    c = LoraCache[str](10)
    c.pin("a")
    c.pin("a")
    assert c.pins("a") == 2
    c.put("a", "A", 8)
    c.put("b", "B", 8)  # over budget: b is the only unpinned one
    assert c.names() == ("a",)
    assert c.unpin("a") == () and "a" in c  # one pin left
    assert c.unpin("a") == ()  # fits the budget: kept, now evictable
    assert c.put("c", "C", 8) == ("a",)
    with pytest.raises(ValueError, match="not pinned"):
        c.unpin("a")


def test_lora_cache_oversized_entry_admitted_only_while_pinned():
    c = LoraCache[str](10)
    c.put("small", "S", 5)
    assert c.put("big", "B", 50) == ("big",)  # unpinned and larger than the budget: not stored
    assert "big" not in c and "small" in c and c.stats().rejected == 1 and c.stats().evictions == 0
    c.pin("big")
    assert c.put("big", "B", 50) == ("small",)  # admitted while pinned; the unpinned rest goes
    assert c.peek("big") == "B" and c.stats().bytes_held == 50
    assert c.unpin("big") == ("big",)  # evicted at its last unpin
    assert c.stats().bytes_held == 0 and c.stats().entries == 0


def test_lora_cache_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="lora_cache_bytes"):
        LoraCache(-1)
    with pytest.raises(ValueError):
        LoraCache(10).put("a", "A", -1)


def test_lora_cache_thread_safety():
    """Eight threads put, look up, pin and unpin at random; the books balance afterwards."""
    sizes = {f"n{i}": 1 + i % 7 for i in range(24)}
    c = LoraCache[str](budget_bytes=30)
    lookups = [0] * 8
    errors = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(1500):
                name = rng.choice(list(sizes))
                op = rng.random()
                if op < 0.4:
                    c.put(name, name.upper(), sizes[name])
                elif op < 0.8:
                    value = c.lookup(name)
                    lookups[seed] += 1
                    assert value in (None, name.upper())
                else:
                    c.pin(name)
                    c.put(name, name.upper(), sizes[name])
                    assert c.peek(name) == name.upper()  # pinned: nobody can evict it
                    c.unpin(name)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so a missing lock shows
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    s = c.stats()
    assert s.hits + s.misses == sum(lookups)
    assert s.bytes_held == sum(sizes[n] for n in c.names()) <= 30
    assert s.pinned == 0 and s.entries == len(c.names())
    assert s.bytes_inserted - s.bytes_evicted >= s.bytes_held


# -- the loader ----------------------------------------------------------------------------------------------
class Files:
    """A fake adapter store: load(path) blocks until its gate opens, fails for names in `broken`."""

    def __init__(self, sizes=None):
        self.sizes = sizes or {"outline": 10, "stripes": 20, "dark": 30}
        self.gates: dict[str, threading.Event] = {}
        self.broken: set[str] = set()
        self.loaded: list[str] = []
        self.events: list[str] = []
        self.lock = threading.Lock()

    def resolve(self, name: str) -> str:
        if name not in self.sizes:
            raise KeyError(f"adapter {name!r} is not in /lora")
        return f"/lora/{name}.safetensors"

    def gate(self, name: str) -> threading.Event:
        with self.lock:
            return self.gates.setdefault(name, threading.Event())

    def load(self, path: str):
        name = path.rsplit("/", 1)[1].removesuffix(".safetensors")
        with self.lock:
            self.events.append(f"load {name}")
        assert self.gate(name).wait(WAIT_S), "test gate never opened"
        if name in self.broken:
            raise OSError(f"{path}: header too large")
        with self.lock:
            self.loaded.append(name)
        return f"weights:{name}", self.sizes[name]


def make(files: Files, budget=1000, **kw) -> LoraLoader:
    return LoraLoader(LoraCache(budget), files.resolve, files.load, **kw)


def test_lora_loader_request_returns_at_once_and_loads_off_thread():
    files = Files()
    loader = make(files)
    assert loader.request("outline") is LoadState.LOADING  # the load blocks on its gate: we are back anyway
    assert loader.state("outline") is LoadState.LOADING
    assert not loader.ready("outline") and loader.get("outline") is None
    files.gate("outline").set()
    assert loader.wait("outline", WAIT_S) == "weights:outline"
    assert loader.ready("outline") and loader.get("outline") == "weights:outline"
    s = loader.stats()
    assert (s.loads, s.load_failures, s.bytes_loaded, s.in_flight) == (1, 0, 10, 0)
    loader.close()


def test_lora_loader_one_load_per_adapter_and_hits_after():
    files = Files()
    loader = make(files)
    assert loader.request("outline") is LoadState.LOADING
    assert loader.request("outline") is LoadState.LOADING  # joins the load in flight
    files.gate("outline").set()
    loader.wait("outline", WAIT_S)
    assert loader.request("outline") is LoadState.READY
    assert files.loaded == ["outline"] and loader.stats().loads == 1
    s = loader.cache.stats()
    assert (s.hits, s.misses) == (1, 2)
    assert loader.cache.pins("outline") == 3
    for _ in range(3):
        loader.release("outline")
    assert loader.cache.pins("outline") == 0
    with pytest.raises(ValueError, match="not requested"):
        loader.release("outline")
    loader.close()


def test_lora_loader_requested_adapter_stays_while_held_even_if_oversized():
    files = Files({"big": 500})
    loader = make(files, budget=100)
    loader.request("big")
    files.gate("big").set()
    assert loader.wait("big", WAIT_S) == "weights:big"  # pinned by the request: admitted over budget
    loader.release("big")
    assert loader.state("big") is LoadState.ABSENT  # evicted at the last release
    loader.close()


def test_lora_loader_load_error_is_kept_and_reported_per_adapter():
    files = Files()
    files.broken.add("stripes")
    done = []
    loader = make(files, on_done=done.append)
    loader.request("stripes")
    loader.request("outline")
    files.gate("stripes").set()
    files.gate("outline").set()
    with pytest.raises(LoraLoadError) as info:
        loader.wait("stripes", WAIT_S)
    assert info.value.adapter == "stripes" and isinstance(info.value.cause, OSError)
    assert info.value.status is Status.INTERNAL
    assert str(info.value) == ("adapter 'stripes': load failed: OSError: /lora/stripes.safetensors: "
                               "header too large")
    assert loader.state("stripes") is LoadState.FAILED and loader.error("stripes") is info.value
    assert loader.wait("outline", WAIT_S) == "weights:outline"  # the other adapter is unaffected
    assert loader.error("outline") is None
    assert loader.request("stripes") is LoadState.FAILED  # a second request sees the kept failure
    assert loader.stats().loads == 2 and loader.stats().load_failures == 1
    assert sorted(done) == ["outline", "stripes"]
    # once every request holding it is released the failure is forgotten: the next request loads again
    loader.release("stripes")
    assert loader.state("stripes") is LoadState.FAILED
    loader.release("stripes")
    assert loader.state("stripes") is LoadState.ABSENT
    files.broken.clear()
    assert loader.request("stripes") is LoadState.LOADING
    assert loader.wait("stripes", WAIT_S) == "weights:stripes"
    loader.close()


def test_lora_loader_unresolvable_adapter_fails_rather_than_hangs():
    loader = make(Files())
    loader.request("vanished")
    with pytest.raises(LoraLoadError, match="'vanished': load failed: KeyError"):
        loader.wait("vanished", WAIT_S)
    loader.close()


def test_lora_loader_wait_times_out_and_refuses_unrequested_names():
    files = Files()
    loader = make(files)
    loader.request("dark")
    with pytest.raises(TimeoutError, match="still loading"):
        loader.wait("dark", 0.05)
    with pytest.raises(KeyError, match="request\\(\\) it first"):
        loader.wait("outline", WAIT_S)
    files.gate("dark").set()
    loader.wait("dark", WAIT_S)
    loader.close()


def test_lora_loader_delay_runs_on_the_loader_thread_before_the_load():
    files = Files()
    calls = []
    slept = threading.Event()

    def sleep(seconds: float) -> None:
        calls.append((seconds, threading.current_thread().name, list(files.events)))
        slept.set()

    loader = make(files, load_delay_s=1.5, sleep=sleep)
    loader.request("outline")
    assert slept.wait(WAIT_S)
    files.gate("outline").set()
    loader.wait("outline", WAIT_S)
    assert len(calls) == 1
    seconds, thread, events_before = calls[0]
    assert seconds == 1.5 and thread.startswith("tessera-lora") and events_before == []
    assert files.events == ["load outline"]
    loader.close()


def test_lora_loader_real_delay_keeps_the_adapter_loading():
    loader = LoraLoader(LoraCache(100), lambda n: n, lambda p: (p, 1), load_delay_s=0.3)
    assert loader.request("a") is LoadState.LOADING
    assert loader.wait("a", WAIT_S) == "a"
    assert loader.stats().load_s >= 0.3  # the delay is part of the load's time
    loader.close()


def test_lora_loader_workers_load_in_parallel():
    files = Files()
    barrier = threading.Barrier(2, timeout=WAIT_S)

    def load(path):
        barrier.wait()  # both loads must be running at once to pass
        return path, 1

    loader = LoraLoader(LoraCache(100), files.resolve, load, workers=2)
    loader.request("outline")
    loader.request("stripes")
    assert loader.wait("outline", WAIT_S) and loader.wait("stripes", WAIT_S)
    loader.close()


def test_lora_loader_close_wakes_waiters_and_refuses_requests():
    files = Files()
    loader = make(files)
    loader.request("dark")
    raised = []
    t = threading.Thread(
        target=lambda: raised.append(pytest.raises(ShutdownError, loader.wait, "dark", WAIT_S)))
    t.start()
    for _ in range(int(WAIT_S / 0.005)):  # until the waiter blocks on the loader's condition
        if loader._cond._waiters:
            break
        threading.Event().wait(0.005)
    assert loader._cond._waiters
    loader.close()
    t.join(WAIT_S)
    assert not t.is_alive() and len(raised) == 1
    with pytest.raises(ShutdownError):
        loader.request("outline")
    files.gate("dark").set()


def test_lora_loader_rejects_bad_settings():
    with pytest.raises(ConfigError, match="lora_load_workers"):
        LoraLoader(LoraCache(1), str, str, workers=0)
    with pytest.raises(ConfigError, match="lora_load_delay_s"):
        LoraLoader(LoraCache(1), str, str, load_delay_s=-1)
