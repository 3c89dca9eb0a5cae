"""Per-request adapters behind one small interface the engine calls at fixed points (admit, gate, rows,
release), so Engine.step has no adapter branches: `NoAdapters` when a model serves none, `LoraAdapters`
(bounded asynchronous LoRA loading, SwiftDiffusion's BAL) when it has an adapter directory.

Pure: the loaded adapters are opaque values (the torch executor's LoraAdapter); nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .bal import Bal, BalAction
from .errors import RequestFailedError
from .lora_cache import LoraLoader
from .lora_registry import LoraRegistry
from .request import RequestState

Assignment = tuple[tuple[Any, float], ...]  # one request's (loaded adapter, scale) pairs for this step


@dataclass(frozen=True, slots=True)
class Gate:
    """Who of a step's batch steps now, with which adapters; who sits it out; who failed."""

    step: tuple[RequestState, ...]
    rows: tuple[Assignment, ...] | None  # per stepping request (None: nobody has adapters this step)
    wait: tuple[RequestState, ...] = ()
    failed: tuple[tuple[RequestState, Exception], ...] = ()


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


@dataclass
class LoraAdapters:
    """LoRA per request with BAL: loads start at admission (off the step loop), a request steps without
    its adapters until they are in memory and joins them at the next step boundary; still missing at its K,
    it sits steps out while the others step (`idle_wait_s` at most per step when nobody can step)."""

    registry: LoraRegistry
    loader: LoraLoader
    bal: Bal
    idle_wait_s: float = 0.05
    waits: int = field(default=0)  # request-steps sat out at K

    def names(self) -> frozenset[str]:
        return self.registry.names()

    def admit(self, state: RequestState) -> None:
        self.bal.admit(state.request_id, state.params.lora, state.params.num_steps)

    def gate(self, batch: Sequence[RequestState]) -> Gate:
        step, rows, wait, failed = [], [], [], []
        for s in batch:
            d = self.bal.step(s.request_id, s.step_index, s.step_index + s.steps_left)
            if d.action is BalAction.FAIL:
                failed.append((s, RequestFailedError(str(d.error))))
            elif d.action is BalAction.WAIT:
                wait.append(s)
            else:
                step.append(s)
                rows.append(tuple((self.loader.get(name), scale) for name, scale in d.lora.entries))
        self.waits += len(wait)
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
