"""EngineLoop: the engine's own thread. Other threads only submit and cancel; the loop applies both at
the next step boundary, steps while there is work, and hands every RequestOutput to `sink`."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from .engine import Engine, FinishReason, RequestOutput, RequestState
from .errors import TesseraError

log = logging.getLogger(__name__)


class OverloadedError(TesseraError, RuntimeError):
    """Admission is full; answered at once (UNAVAILABLE)."""


class ShutdownError(TesseraError, RuntimeError):
    """The model is shutting down; in-flight requests are failed with this (UNAVAILABLE)."""


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        sink: Callable[[RequestOutput], None],
        is_cancelled: Callable[[str], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_in_flight: int = 256,
        prepare: Callable[[], None] | None = None,
    ):
        """`prepare` runs on the loop thread when the first request arrives (the start-up profile:
        BLS is refused until the model's initialize has returned)."""
        self.prepare = prepare
        self.engine, self.sink, self.is_cancelled, self.clock = engine, sink, is_cancelled, clock
        self.max_in_flight = max_in_flight
        self._inbox: deque[tuple[str, object]] = deque()
        self._cv = threading.Condition()
        self._pending = 0  # submitted, not yet finished (lock-guarded by _cv)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tessera-engine", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    @property
    def pending(self) -> int:
        with self._cv:
            return self._pending

    def submit(self, state: RequestState) -> None:
        with self._cv:
            if self._stop:
                raise ShutdownError("engine: shutting down; allowed: retry on another instance")
            if self._pending >= self.max_in_flight:
                raise OverloadedError(
                    f"engine: overloaded; allowed at most {self.max_in_flight} requests in flight, got one more"
                )
            self._pending += 1
            self._inbox.append(("add", state))
            self._cv.notify()

    def cancel(self, request_id: str) -> None:
        with self._cv:
            self._inbox.append(("cancel", request_id))
            self._cv.notify()

    def stop(self, timeout_s: float = 30.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout_s)

    def _emit(self, out: RequestOutput) -> None:
        if out.final:
            with self._cv:
                self._pending -= 1
        try:
            self.sink(out)
        except Exception:  # noqa: BLE001 - a broken client must not stop the loop
            log.exception("[tessera] sending a response for %s failed", out.request_id)

    def _drain(self) -> None:
        with self._cv:
            items = list(self._inbox)
            self._inbox.clear()
        now = self.clock()
        for kind, payload in items:
            if kind == "add":
                self.engine.add(payload)  # type: ignore[arg-type]
            else:
                out = self.engine.abort(payload, now)  # type: ignore[arg-type]
                if out is not None:
                    log.info("[tessera] cancelled %s at step %d", payload, out.step_index)
                    self._emit(out)
        if self.is_cancelled is not None:
            ids = list(self.engine.waiting) + list(self.engine.running)
            for rid in ids:
                if self.is_cancelled(rid):
                    out = self.engine.abort(rid, now)
                    if out is not None:
                        log.info("[tessera] cancelled %s at step %d", rid, out.step_index)
                        self._emit(out)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self.engine.has_work() and not self._stop:
                    self._cv.wait()
                if self._stop:
                    break
            if self.prepare is not None:  # first work: the model's initialize has returned by now
                prepare, self.prepare = self.prepare, None
                try:
                    prepare()
                except Exception:  # noqa: BLE001 - serve without a profile rather than not at all
                    log.exception("[tessera] start-up profile failed; deadlines use an unfitted predictor")
            self._drain()
            if self.engine.has_work():
                try:  # each output is answered the moment the engine has it (emit)
                    self.engine.step(self.clock(), self.clock, emit=self._emit)
                except Exception:  # noqa: BLE001 - keep serving; the engine fails requests itself
                    log.exception("[tessera] engine step failed")
        # Shutdown: every accepted request still gets its one final response.
        self._drain()
        now = self.clock()
        for rid in list(self.engine.waiting) + list(self.engine.running):
            out = self.engine.abort(rid, now, FinishReason.ERROR, ShutdownError("engine: shutting down; the request was not finished"))
            if out is not None:
                self._emit(out)
