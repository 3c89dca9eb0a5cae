"""Loaded LoRA adapters in memory: a bytes-bounded LRU cache with pinning, and the asynchronous loader that
fills it off the step loop (issue 14, BAL).

Pure and generic over the loaded value (the torch side stores its tensors; tests store strings): no torch.

Cache rule. Entries carry their size in bytes. After every insertion and every last unpin, the least
recently used *unpinned* entries are evicted until the bytes held fit the budget; pinned entries (an adapter
a running or joining request uses) are never evicted. So at any moment either the bytes held fit the budget
or every entry still held is pinned: pinned entries may push the cache over its budget, and an entry larger
than the whole budget is admitted only while pinned (it is evicted at its last unpin; offered unpinned, it
is not stored at all and counted as `rejected`). Pins count references and may be taken before the entry
exists (a request pins what it waits for), so a load that completes for a waiting request is never evicted
before the request joins. One lock guards everything.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from .errors import ConfigError, RequestFailedError, ShutdownError

log = logging.getLogger(__name__)

V = TypeVar("V")


class LoraLoadError(RequestFailedError):
    """An adapter's file could not be read or loaded; the requests that use it are answered with it
    (INTERNAL: the server's adapter is at fault, not the request)."""

    def __init__(self, adapter: str, cause: BaseException):
        self.adapter = adapter
        self.cause = cause
        super().__init__(f"adapter {adapter!r}: load failed: {type(cause).__name__}: {cause}")


@dataclass(frozen=True, slots=True)
class CacheStats:
    """Counters since start (hits ... bytes_evicted) and the state now (entries ... budget_bytes)."""

    hits: int  # lookups that found the adapter in memory
    misses: int  # lookups that did not
    evictions: int  # entries evicted to fit the budget (rejected ones not included)
    rejected: int  # unpinned entries larger than the budget, offered and not stored
    bytes_inserted: int  # bytes of every entry stored
    bytes_evicted: int
    entries: int
    pinned: int  # entries held now with at least one pin
    bytes_held: int  # may exceed budget_bytes only through pinned entries
    budget_bytes: int


class LoraCache(Generic[V]):
    """A bytes-bounded LRU of loaded adapters with reference-counted pins (rule in the module docstring)."""

    def __init__(self, budget_bytes: int, max_entries: int | None = None) -> None:
        """`max_entries`: also at most this many entries (unpinned ones evicted first, the same LRU rule)."""
        if budget_bytes < 0:
            raise ConfigError(f"lora_cache_bytes: negative; allowed a size in bytes >= 0, got {budget_bytes}")
        if max_entries is not None and max_entries < 1:
            raise ConfigError(f"cache entries: allowed >= 1, got {max_entries}")
        self.budget_bytes = budget_bytes
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()  # least recently used first
        self._pins: dict[str, int] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = self._rejected = 0
        self._bytes_inserted = self._bytes_evicted = 0

    def lookup(self, name: str) -> V | None:
        """The value (now most recently used) or None; counted as a hit or a miss."""
        with self._lock:
            item = self._entries.get(name)
            if item is None:
                self._misses += 1
                return None
            self._hits += 1
            self._entries.move_to_end(name)
            return item[0]

    def peek(self, name: str) -> V | None:
        """The value or None, without counting or touching the LRU order."""
        with self._lock:
            item = self._entries.get(name)
            return None if item is None else item[0]

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def put(self, name: str, value: V, nbytes: int) -> tuple[str, ...]:
        """Store `value` (replacing an older value of `name`) as most recently used, then evict to the budget.
        Returns the names evicted (or `(name,)` when it was rejected: unpinned and larger than the budget)."""
        if nbytes < 0:
            raise ValueError(f"LoraCache.put({name!r}): nbytes must be >= 0, got {nbytes}")
        with self._lock:
            if nbytes > self.budget_bytes and not self._pins.get(name):
                self._rejected += 1
                return (name,)
            old = self._entries.pop(name, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[name] = (value, nbytes)
            self._bytes += nbytes
            self._bytes_inserted += nbytes
            return self._evict()

    def pin(self, name: str) -> None:
        """Take one reference on `name` (present or not yet): not evicted until every pin is released."""
        with self._lock:
            self._pins[name] = self._pins.get(name, 0) + 1

    def unpin(self, name: str) -> tuple[str, ...]:
        """Release one reference; at the last one, evict to the budget. Returns the names evicted."""
        with self._lock:
            count = self._pins.get(name, 0)
            if count <= 0:
                raise ValueError(f"LoraCache.unpin({name!r}): not pinned")
            if count > 1:
                self._pins[name] = count - 1
                return ()
            del self._pins[name]
            return self._evict()

    def pins(self, name: str) -> int:
        with self._lock:
            return self._pins.get(name, 0)

    def names(self) -> tuple[str, ...]:
        """Names held, least recently used first."""
        with self._lock:
            return tuple(self._entries)

    def stats(self) -> CacheStats:
        with self._lock:
            pinned = sum(1 for n in self._entries if self._pins.get(n))
            return CacheStats(self._hits, self._misses, self._evictions, self._rejected, self._bytes_inserted,
                              self._bytes_evicted, len(self._entries), pinned, self._bytes, self.budget_bytes)

    def _fits(self) -> bool:
        return self._bytes <= self.budget_bytes and (self.max_entries is None or len(self._entries) <= self.max_entries)

    def _evict(self) -> tuple[str, ...]:
        """Evict least recently used unpinned entries until the bytes held fit (caller holds the lock)."""
        evicted = []
        if not self._fits():
            for name in [n for n in self._entries if not self._pins.get(n)]:
                _, nbytes = self._entries.pop(name)
                self._bytes -= nbytes
                self._bytes_evicted += nbytes
                self._evictions += 1
                evicted.append(name)
                if self._fits():
                    break
        if evicted:
            log.debug("LoRA cache evicted %s (%d bytes held, budget %d)", evicted, self._bytes,
                      self.budget_bytes)
        return tuple(evicted)


class LoadState(str, enum.Enum):
    ABSENT = "absent"  # not in memory, not loading
    LOADING = "loading"
    READY = "ready"  # in memory
    FAILED = "failed"  # the last load failed; `error(name)` says why


@dataclass(frozen=True, slots=True)
class LoaderStats:
    loads: int  # loads started (each a file read)
    load_failures: int
    bytes_loaded: int
    load_s: float  # seconds spent loading, summed over loads (load_delay_s included)
    in_flight: int  # loads started and not finished


class LoraLoader(Generic[V]):
    """Loads adapters off the caller's thread into a LoraCache.

    `request(name)` pins `name` and returns at once: READY when cached (a hit), else a load is queued (a miss)
    unless one is in flight. `ready`, `state`, `get` and `error` never block; `wait` does, up to a timeout.
    Every `request` is matched by one `release` (when the request finishes, fails or is cancelled).

    A failed load is kept (FAILED, its LoraLoadError) while any request that asked for the adapter still
    holds it, so each of them is answered with the error rather than left waiting; when the last one releases
    it, the failure is forgotten and the next request loads again (a fixed file is picked up, and a broken one
    is not reloaded by every step).

    `resolve(name) -> path` (the registry's `path`) and `load(path) -> (value, nbytes)` run on the loader
    threads (`workers`, default 1); `load_delay_s` sleeps before each load (emulating remote storage);
    `on_done(name)` is called on the loader thread after each load succeeds or fails (the engine loop wakes
    on it)."""

    def __init__(self, cache: LoraCache[V], resolve: Callable[[str], Path],
                 load: Callable[[Path], tuple[V, int]], *, workers: int = 1, load_delay_s: float = 0.0,
                 on_done: Callable[[str], None] | None = None, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if workers < 1:
            raise ConfigError(f"lora_load_workers: allowed an integer >= 1, got {workers}")
        if load_delay_s < 0:
            raise ConfigError(f"lora_load_delay_s: allowed seconds >= 0, got {load_delay_s}")
        self.cache = cache
        self._resolve = resolve
        self._load = load
        self.load_delay_s = load_delay_s
        self._on_done = on_done
        self._sleep = sleep
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tessera-lora")
        self._cond = threading.Condition()
        self._in_flight: set[str] = set()
        self._failed: dict[str, LoraLoadError] = {}
        self._held: dict[str, int] = {}  # requests holding each name (the pins this loader took)
        self._closed = False
        self._loads = self._failures = self._bytes = 0
        self._load_s = 0.0

    def request(self, name: str) -> LoadState:
        """Pin `name` for one request and start loading it if needed; never blocks on the load."""
        with self._cond:
            if self._closed:
                raise ShutdownError("LoRA loader: closed")
            self.cache.pin(name)
            self._held[name] = self._held.get(name, 0) + 1
            if name in self._failed:
                return LoadState.FAILED
            if self.cache.lookup(name) is not None:  # counted as a hit or a miss
                return LoadState.READY
            if name in self._in_flight:
                return LoadState.LOADING
            self._in_flight.add(name)
            self._loads += 1
        self._pool.submit(self._run, name)
        return LoadState.LOADING

    def release(self, name: str) -> None:
        """Drop one request's hold on `name` (the pin taken by `request`)."""
        with self._cond:
            count = self._held.get(name, 0)
            if count <= 0:
                raise ValueError(f"LoraLoader.release({name!r}): not requested")
            if count == 1:
                del self._held[name]
                self._failed.pop(name, None)
            else:
                self._held[name] = count - 1
        self.cache.unpin(name)

    def state(self, name: str) -> LoadState:
        with self._cond:
            if name in self._failed:
                return LoadState.FAILED
            if name in self._in_flight:
                return LoadState.LOADING
        return LoadState.READY if name in self.cache else LoadState.ABSENT

    def ready(self, name: str) -> bool:
        return self.state(name) is LoadState.READY

    def get(self, name: str) -> V | None:
        """The loaded value, or None; never blocks and counts nothing."""
        return self.cache.peek(name)

    def error(self, name: str) -> LoraLoadError | None:
        with self._cond:
            return self._failed.get(name)

    def wait(self, name: str, timeout_s: float | None = None) -> V:
        """Block until `name` is loaded (its value), failed (raises its LoraLoadError) or `timeout_s` passes
        (TimeoutError). `name` should be requested (pinned) first, or it may be evicted as it arrives; waiting
        for a name neither loading nor cached raises KeyError at once rather than hang."""
        deadline = None if timeout_s is None else self._clock() + timeout_s
        with self._cond:
            while True:
                if name in self._failed:
                    raise self._failed[name]
                value = self.cache.peek(name)
                if value is not None:
                    return value
                if self._closed:
                    raise ShutdownError("LoRA loader: closed")
                if name not in self._in_flight:
                    raise KeyError(f"adapter {name!r} is neither loading nor in memory: request() it first")
                left = None if deadline is None else deadline - self._clock()
                if left is not None and left <= 0:
                    raise TimeoutError(f"adapter {name!r}: still loading after {timeout_s} s")
                self._cond.wait(left)

    def stats(self) -> LoaderStats:
        with self._cond:
            return LoaderStats(self._loads, self._failures, self._bytes, self._load_s, len(self._in_flight))

    def close(self) -> None:
        """Stop taking requests, drop queued loads, wake every waiter (ShutdownError); a load already running
        finishes on its thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, name: str) -> None:
        start = self._clock()
        error: LoraLoadError | None = None
        nbytes = 0
        try:
            if self.load_delay_s:
                self._sleep(self.load_delay_s)
            value, nbytes = self._load(self._resolve(name))
            self.cache.put(name, value, nbytes)
        except Exception as e:  # kept per adapter and answered to its requests
            error = LoraLoadError(name, e)
            log.warning("[tessera] %s", error)
        with self._cond:
            self._in_flight.discard(name)
            self._load_s += self._clock() - start
            if error is None:
                self._bytes += nbytes
            else:
                self._failures += 1
                if self._held.get(name):
                    self._failed[name] = error
            self._cond.notify_all()
        if self._on_done is not None:
            try:
                self._on_done(name)
            except Exception:
                log.exception("LoRA loader: on_done(%r) failed", name)
