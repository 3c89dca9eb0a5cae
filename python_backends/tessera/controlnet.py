"""ControlNets per request (issue 15, SwiftDiffusion's ControlNet-as-a-Service): what a request asks for
(`ControlSpec`, parsed and checked from the wire), and the engine add-on that serves it (`ControlNets`).

The service: the ControlNets a repository holds (models `controlnet_<name>`, shared by every base
pipeline exported over the same UNet) are loaded on demand, off the step loop, when a request asking for
them is admitted; the loaded ones stay resident in an LRU bounded by count and by bytes
(`lora_cache.LoraCache`, the same cache the LoRA adapters use); one a request uses is pinned until it is
answered. A request steps once its ControlNets are in memory (sync semantics: every step gets its
residuals); until then it sits steps out while the others step. A load that fails fails the requests that
asked for it (INTERNAL), and the next request loads again.

Each stepping request's `ControlCall` carries its loaded ControlNets, scales, condition images and a small
state the executor keeps across steps (`control_mode=async`: the residuals of the previous step).
Pure: no torch, no Triton; a loaded ControlNet is an opaque value (an ORT session in executors/control.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import RequestFailedError
from .lora_cache import LoraLoader
from .request import RequestState

MODEL_PREFIX = "controlnet_"  # the Triton model of ControlNet `name` is controlnet_<name>


@dataclass(slots=True)
class ControlState:
    """Kept by the executor across a request's steps: async mode's residuals of the previous step (summed
    over the request's ControlNets, scaled; one array per skip, then mid; rows = its CFG halves)."""

    residuals: list[np.ndarray] | None = None
    conditions: tuple[np.ndarray, ...] | None = None  # the request's maps as ControlNet conditions


@dataclass(frozen=True, slots=True, eq=False)
class ControlCall:
    """One stepping request's ControlNets for this step."""

    nets: tuple[tuple[Any, float], ...]  # (loaded ControlNet, scale), in the request's order
    conditions: tuple[np.ndarray, ...]  # per net: float32 [1, 3, H, W]
    state: ControlState


@dataclass(frozen=True, slots=True)
class ControlCounters:
    """ControlNet service metrics since start (resident_*: now)."""

    loads: int = 0
    load_failures: int = 0
    load_s: float = 0.0
    cache_hits: int = 0
    cache_misses: int = 0
    evictions: int = 0
    resident: int = 0
    resident_bytes: int = 0
    wait_steps: int = 0  # request-steps sat out, ControlNets still loading
    calls: int = 0  # ControlNet calls (the executor's)
    decoder_wait_s: float = 0.0  # the decoder waiting for residuals after the encoder (the executor's)


@dataclass(frozen=True, slots=True)
class ControlGate:
    step: tuple[RequestState, ...]
    calls: tuple[ControlCall | None, ...] | None  # per stepping request (None: nobody has ControlNets)
    wait: tuple[RequestState, ...] = ()
    failed: tuple[tuple[RequestState, Exception], ...] = ()


class NoControls:
    """An engine without ControlNets: a request naming one was refused at parsing."""

    def names(self) -> frozenset[str]:
        return frozenset()

    def admit(self, state: RequestState) -> None:
        pass

    def gate(self, batch: Sequence[RequestState]) -> ControlGate:
        return ControlGate(tuple(batch), None)

    def release(self, request_id: str) -> None:
        pass

    def counters(self) -> ControlCounters:
        return ControlCounters()


@dataclass
class ControlNets:
    """The ControlNet service of one engine (module docstring). `loader` loads ControlNet `name` (its
    Triton model name, controlnet_<name>) into its bounded cache."""

    served: frozenset[str]
    loader: LoraLoader
    idle_wait_s: float = 0.05
    _states: dict[str, ControlState] = field(default_factory=dict)
    _held: dict[str, tuple[str, ...]] = field(default_factory=dict)  # request id -> the models it pinned
    _wait_steps: int = 0

    def names(self) -> frozenset[str]:
        return self.served

    def admit(self, state: RequestState) -> None:
        """Start loading (and pin) the request's ControlNets."""
        models = tuple(MODEL_PREFIX + n for n in _names(state))
        for m in models:
            self.loader.request(m)
        if models:
            self._held[state.request_id] = models

    def gate(self, batch: Sequence[RequestState]) -> ControlGate:
        step, calls, wait, failed = [], [], [], []
        for s in batch:
            spec = s.params.control
            if spec is None:
                step.append(s)
                calls.append(None)
                continue
            models = [MODEL_PREFIX + n for n in spec.names]
            error = next((e for m in models if (e := self.loader.error(m)) is not None), None)
            if error is not None:
                failed.append((s, RequestFailedError(str(error))))
            elif all(self.loader.ready(m) for m in models):
                nets = tuple((self.loader.get(m), scale) for m, scale in zip(models, spec.scales, strict=True))
                state = self._states.setdefault(s.request_id, ControlState())
                if state.conditions is None:  # prepared once per request
                    state.conditions = tuple(spec.condition(k) for k in range(len(models)))
                calls.append(ControlCall(nets, state.conditions, state))
                step.append(s)
            else:
                wait.append(s)
        self._wait_steps += len(wait)
        if wait and not step:  # nobody can step: wait briefly for a load instead of spinning
            missing = [m for s in wait for m in (MODEL_PREFIX + n for n in s.params.control.names)
                       if not self.loader.ready(m)]
            try:
                self.loader.wait(missing[0], self.idle_wait_s)
            except Exception:  # noqa: BLE001 - a failure or a timeout shows at the next gate
                pass
        return ControlGate(tuple(step), tuple(calls) if any(c is not None for c in calls) else None, tuple(wait),
                           tuple(failed))

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        for m in self._held.pop(request_id, ()):
            self.loader.release(m)

    def counters(self) -> ControlCounters:
        loads, cache = self.loader.stats(), self.loader.cache.stats()
        return ControlCounters(loads.loads, loads.load_failures, loads.load_s, cache.hits, cache.misses,
                               cache.evictions, cache.entries, cache.bytes_held, self._wait_steps)


def _names(state: RequestState) -> tuple[str, ...]:
    spec = state.params.control
    return () if spec is None else spec.names


@dataclass
class WithControlNets:
    """The engine's add-ons when it serves ControlNets: its adapters (adapters.NoAdapters or LoraAdapters)
    decide who steps first, then the ControlNets of those (the same admit / gate / release interface)."""

    adapters: Any
    controls: ControlNets

    def names(self) -> frozenset[str]:
        return self.adapters.names()

    def admit(self, state: RequestState) -> None:
        self.adapters.admit(state)
        self.controls.admit(state)

    def gate(self, batch: Sequence[RequestState]):
        from .adapters import Gate

        g = self.adapters.gate(batch)
        c = self.controls.gate(g.step)
        rows = None
        if g.rows is not None:
            by_id = {s.request_id: r for s, r in zip(g.step, g.rows, strict=True)}
            rows = tuple(by_id[s.request_id] for s in c.step)
        return Gate(c.step, rows if rows and any(rows) else None, g.wait + c.wait, g.failed + c.failed, c.calls)

    def release(self, request_id: str) -> None:
        self.adapters.release(request_id)
        self.controls.release(request_id)

    def counters(self):
        return self.adapters.counters()
