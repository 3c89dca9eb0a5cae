"""Fan-in of engine outputs into Triton responses: one Triton request of n items is n engine requests,
answered together with one FINAL response (all n images, or the first error, after which the other items
are cancelled). Pure and thread-safe: all state under one lock; the caller sends outside it."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .plan import RequestOutput


@dataclass(slots=True)
class _Ticket:
    size: int  # items whose final output is still to come back (lowered when a submission is refused)
    context: Any  # the adapter's handle: Triton request, response sender, client id
    progress: bool  # relay per-step progress (single-item requests only)
    images: dict[int, np.ndarray] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    failed: bool = False  # its one FINAL response (an error) is decided
    finals: int = 0


@dataclass(frozen=True, slots=True)
class Answer:
    """What to send for one Triton request: a progress event, the FINAL images, or the FINAL error."""

    context: Any
    final: bool
    output: RequestOutput | None = None  # progress: the event; error: the failing item's output
    images: np.ndarray | None = None  # FINAL success: [n, H, W, 3] uint8
    steps: np.ndarray | None = None  # FINAL success: [n, 1] int32, steps each image ran
    cancel: tuple[str, ...] = ()  # engine request ids no longer needed (after an error)

    @property
    def error(self) -> Exception | None:
        return None if self.output is None or self.output.ok else self.output.error


class FanIn:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tickets: dict[int, _Ticket] = {}
        self._items: dict[str, tuple[int, int]] = {}  # engine request id -> (ticket, item index), until final
        self._keys = itertools.count()

    def __len__(self) -> int:
        with self._lock:
            return len(self._tickets)

    def open(self, size: int, context: Any, progress: bool = False) -> tuple[int, tuple[str, ...]]:
        """A new Triton request of `size` items: its key and the engine request ids to submit, in item order."""
        with self._lock:
            key = next(self._keys)
            self._tickets[key] = _Ticket(size, context, progress and size == 1)
            ids = tuple(f"r{key}/{k}" for k in range(size))
            self._items.update({rid: (key, k) for k, rid in enumerate(ids)})
        return key, ids

    def refused(self, key: int, ids: tuple[str, ...], submitted: int) -> tuple[tuple[str, ...], bool]:
        """Submitting item `submitted` of request `key` was refused. Returns (ids already submitted and still
        in flight, to cancel: their outputs will be absorbed; whether the caller sends the refusal as the
        request's one FINAL response: not if an earlier item's error already answered it)."""
        with self._lock:
            ticket = self._tickets.get(key)
            for rid in ids[submitted:]:
                self._items.pop(rid, None)
            if ticket is None:
                return (), False
            answer = not ticket.failed
            ticket.failed = True
            ticket.size = submitted  # only the submitted items' finals can still come back
            live = tuple(rid for rid in ids[:submitted] if rid in self._items)
            if ticket.finals >= ticket.size:
                del self._tickets[key]
        return live, answer

    def context(self, request_id: str) -> Any | None:
        """The adapter's handle for a live item (None once its request has failed or ended)."""
        with self._lock:
            key, _ = self._items.get(request_id, (None, 0))
            ticket = self._tickets.get(key)
            return None if ticket is None or ticket.failed else ticket.context

    def settle(self, out: RequestOutput) -> Answer | None:
        """Account for one engine output; what to send, if anything."""
        with self._lock:
            if out.request_id not in self._items:
                return None
            key, k = self._items[out.request_id]
            ticket = self._tickets[key]
            if not out.final:
                return Answer(ticket.context, False, out) if ticket.progress and not ticket.failed else None
            del self._items[out.request_id]
            ticket.finals += 1
            answer = None
            if ticket.failed:
                pass
            elif not out.ok:
                ticket.failed = True
                cancel = tuple(rid for rid, (tk, i) in self._items.items() if tk == key)
                answer = Answer(ticket.context, True, out, cancel=cancel)
            else:
                ticket.images[k], ticket.steps[k] = out.image, out.step_index
                if len(ticket.images) == ticket.size:
                    images = np.stack([ticket.images[i] for i in range(ticket.size)])
                    steps = np.array([[ticket.steps[i]] for i in range(ticket.size)], np.int32)
                    answer = Answer(ticket.context, True, images=images, steps=steps)
            if ticket.finals >= ticket.size:
                del self._tickets[key]
            return answer
