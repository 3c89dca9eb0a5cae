"""Per-request adapters behind one small interface the engine calls at fixed points (admit, gate, rows,
release), so Engine.step has no adapter branches: `NoAdapters` when a model serves none, `LoraAdapters`
(bounded asynchronous LoRA loading, SwiftDiffusion's BAL) when it has an adapter directory.

Pure: the loaded adapters are opaque values (the torch executor's LoraAdapter); nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .bal import Bal, BalAction, effective_k
from .errors import RequestFailedError
from .lora_cache import LoraLoader
from .lora_registry import LoraRegistry
from .options import LoraBatching
from .request import RequestState

Assignment = tuple[tuple[Any, float], ...]  # one request's (loaded adapter, scale) pairs for this step


@dataclass(frozen=True, slots=True)
class AdapterCounters:
    """Adapter metrics since start (cache_bytes and cache_entries: now)."""

    loads: int = 0  # adapter files read
    load_failures: int = 0
    load_bytes: int = 0
    load_s: float = 0.0  # seconds spent loading, summed (emulated storage delay included)
    cache_hits: int = 0  # an admitted request's adapter already in memory
    cache_misses: int = 0
    cache_bytes: int = 0
    cache_entries: int = 0
    joins: int = 0  # requests whose adapters joined
    steps_before_join: int = 0  # steps run without their adapters, summed over joins
    wait_steps: int = 0  # request-steps sat out at K, adapters still loading
    requests_waited: int = 0


@dataclass(frozen=True, slots=True)
class Gate:
    """Who of a step's batch steps now, with which adapters; who sits it out; who failed."""

    step: tuple[RequestState, ...]
    rows: tuple[Assignment, ...] | None  # per stepping request (None: nobody has adapters this step)
    wait: tuple[RequestState, ...] = ()
    failed: tuple[tuple[RequestState, Exception], ...] = ()
    controls: tuple[Any, ...] | None = None  # per stepping request, its controlnet.ControlCall (None: nobody's)


class NoAdapters:
    """A model without adapters: everyone steps, nothing to load."""

    def names(self) -> frozenset[str]:
        return frozenset()

    def admit(self, state: RequestState) -> None:
        pass

    def gate(self, batch: Sequence[RequestState]) -> Gate:
        return Gate(tuple(batch), None)

    def release(self, request_id: str) -> None:
        pass

    def counters(self) -> AdapterCounters:
        return AdapterCounters()


@dataclass
class LoraAdapters:
    """LoRA per request with BAL: loads start at admission (off the step loop), a request steps without
    its adapters until they are in memory and joins them at the next step boundary; still missing at its K,
    it sits steps out while the others step (`idle_wait_s` at most per step when nobody can step).
    `batching=one_set`: each step runs the adapter set of its most urgent request (none counts as a set) and
    the other requests sit it out (the one-adapter-per-batch baseline of perf/lora.py)."""

    registry: LoraRegistry
    loader: LoraLoader
    bal: Bal
    batching: LoraBatching = LoraBatching.MIXED
    idle_wait_s: float = 0.05

    def names(self) -> frozenset[str]:
        return self.registry.names()

    def admit(self, state: RequestState) -> None:
        """Start its loads; tell the cost model its K and, when an adapter is not in memory yet, how long
        the load is expected to take (the mean of the loads so far)."""
        k = self.bal.admit(state.request_id, state.params.lora, state.params.num_steps)
        state.adapter_k = effective_k(k, state.params.num_steps)
        if any(not self.loader.ready(n) for n in state.params.lora.names):
            stats = self.loader.stats()  # load_s sums finished loads; loads counts started ones
            finished = stats.loads - stats.in_flight
            state.adapter_load_s = stats.load_s / finished if finished > 0 else 0.0  # none finished: unknown

    def gate(self, batch: Sequence[RequestState]) -> Gate:
        step, rows, wait, failed = [], [], [], []
        for s in batch:
            d = self.bal.step(s.request_id, s.step_index, s.step_index + s.steps_left)
            if d.action is BalAction.FAIL:
                failed.append((s, RequestFailedError(str(d.error))))
            elif d.action is BalAction.WAIT:
                wait.append(s)
            else:
                if d.action is BalAction.JOIN:
                    s.adapter_load_s = 0.0  # in memory: nothing left to wait for
                step.append(s)
                rows.append(d.lora)
        if self.batching is LoraBatching.ONE_SET and step:  # the most urgent request's set; the rest sit out
            chosen = rows[min(range(len(step)), key=lambda i: step[i].deadline_s)]
            wait += [s for s, lora in zip(step, rows, strict=True) if lora != chosen]
            step = [s for s, lora in zip(step, rows, strict=True) if lora == chosen]
            rows = [chosen] * len(step)
        rows = [tuple((self.loader.get(name), scale) for name, scale in lora.entries) for lora in rows]
        if wait and not step:  # nobody can step: wait (briefly) for one missing adapter instead of spinning
            missing = [n for s in wait for n in s.params.lora.names if not self.loader.ready(n)]
            if missing:
                try:
                    self.loader.wait(missing[0], self.idle_wait_s)
                except Exception:  # noqa: BLE001 - a failure or a timeout shows at the next gate
                    pass
        return Gate(tuple(step), tuple(rows) if any(rows) else None, tuple(wait), tuple(failed))

    def release(self, request_id: str) -> None:
        self.bal.finish(request_id)

    def counters(self) -> AdapterCounters:
        loads, cache, bal = self.loader.stats(), self.loader.cache.stats(), self.bal.counters()
        return AdapterCounters(loads.loads, loads.load_failures, loads.bytes_loaded, loads.load_s, cache.hits,
                               cache.misses, cache.bytes_held, cache.entries, bal.joins, bal.steps_before_join,
                               bal.wait_steps, bal.requests_waited)
