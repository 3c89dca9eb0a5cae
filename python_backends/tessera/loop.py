"""EngineLoop: the engine's own thread. Other threads only submit and cancel; the loop applies both at
the next step boundary, steps while there is work, and hands every RequestOutput to `sink`.

Admission runs on the submitting thread and answers at once: a full engine (OverloadedError), a stopped
one (ShutdownError), and with early refusal a request the current plan cannot fit by its deadline
(RefusedError), tested against the snapshot the loop publishes after every drain and step. If the loop
itself fails (anything the engine's own containment did not catch), every accepted request is answered,
later submissions are refused and `on_dead` is called: the model reports itself not ready.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from .engine import Engine
from .errors import OverloadedError, RefusedError, RequestFailedError, ShutdownError
from .plan import EngineView, RequestOutput
from .request import FinishReason, RequestState

log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        sink: Callable[[RequestOutput], None],
        is_cancelled: Callable[[str], bool] | None = None,
        max_in_flight: int = 256,
        early_refusal: bool = False,
        on_dead: Callable[[BaseException], None] | None = None,
    ):
        self.engine, self.sink, self.is_cancelled = engine, sink, is_cancelled
        self.max_in_flight = max_in_flight
        self.early_refusal = early_refusal
        self.on_dead = on_dead
        self._inbox: deque[tuple[str, object]] = deque()
        self._cv = threading.Condition()
        self._pending = 0  # submitted, not yet finished (lock-guarded by _cv)
        self._stop = False
        self.dead: BaseException | None = None  # why the loop stopped, if it failed
        self._published = engine.snapshot()  # the engine as of the last step boundary (lock-guarded)
        self._thread = threading.Thread(target=self._run, name="tessera-engine", daemon=True)

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    @property
    def pending(self) -> int:
        with self._cv:
            return self._pending

    def submit(self, state: RequestState) -> None:
        """Admit `state` or raise (answered at once by the caller). Called from one thread (Triton's execute):
        the plan is copied under the lock and tested outside it, so answers on the loop are not held up."""
        self.engine.admit(state)
        with self._cv:
            self._check_open()
            view = self._planned_view() if self.early_refusal else None
        if view is not None and (reason := self.engine.policy.refuse(view, state, self.engine.clock())) is not None:
            raise RefusedError(reason)
        with self._cv:
            self._check_open()
            self._pending += 1
            self._inbox.append(("add", state))
            self._cv.notify()

    def _check_open(self) -> None:
        if self._stop or self.dead is not None:
            raise ShutdownError("engine: not serving (shutting down or its loop stopped); allowed: retry on "
                                "another instance")
        if self._pending >= self.max_in_flight:
            raise OverloadedError(
                f"engine: overloaded; allowed at most {self.max_in_flight} requests in flight, got one more"
            )

    def _planned_view(self) -> EngineView:
        """The published snapshot plus the requests accepted since (not yet in the engine)."""
        view = self._published
        queued = tuple(p for kind, p in self._inbox if kind == "add")
        return EngineView(view.waiting + queued, view.running, view.step_no, view.last_advance)

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
        for kind, payload in items:
            if kind == "add":
                try:
                    self.engine.add(payload, admitted=True)  # type: ignore[arg-type]
                except Exception as e:  # noqa: BLE001 - answered, never lost (e.g. a duplicate id)
                    self._emit(RequestOutput(payload.request_id, True, 0, payload.params.num_steps,  # type: ignore[union-attr]
                                             error=RequestFailedError(f"request {payload.request_id}: {e}"),  # type: ignore[union-attr]
                                             finish_reason=FinishReason.ERROR))
            else:
                self._cancel(payload)  # type: ignore[arg-type]
        if self.early_refusal and items:
            self._publish()  # newcomers now in the engine must be in the plan admission tests against
        if self.is_cancelled is not None:
            for rid in [*self.engine.waiting, *self.engine.running]:
                if self.is_cancelled(rid):
                    self._cancel(rid)

    def _cancel(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            log.info("[tessera] cancelled %s at step %d", request_id, out.step_index)
            self._emit(out)

    def _publish(self) -> None:
        snapshot = self.engine.snapshot()
        with self._cv:
            self._published = snapshot

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 - anything the engine did not contain ends the loop
            self._die(e)
            return
        self._answer_all(ShutdownError("engine: shutting down; the request was not finished"))

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self.engine.has_work() and not self._stop:
                    self.engine.idle()
                    self._cv.wait()
                if self._stop:
                    return
            self._drain()
            if self.engine.has_work():
                self.engine.step(emit=self._emit)  # each output is answered the moment it exists
            if self.early_refusal:
                self._publish()

    def _die(self, e: BaseException) -> None:
        log.critical("[tessera] engine loop stopped: %s: %s; the model reports not ready", type(e).__name__, e,
                     exc_info=e)
        with self._cv:
            self.dead = e
        try:
            self._answer_all(ShutdownError(f"engine: loop stopped ({type(e).__name__}: {e}); the request was not "
                                           "finished; allowed: retry on another instance"))
        finally:
            if self.on_dead is not None:
                try:
                    self.on_dead(e)
                except Exception:  # noqa: BLE001
                    log.exception("[tessera] marking the model not ready failed")

    def _answer_all(self, error: Exception) -> None:
        """Every accepted request still in flight gets its one final response."""
        with self._cv:
            items = list(self._inbox)
            self._inbox.clear()
        for kind, payload in items:
            if kind == "add":
                self.engine.waiting.setdefault(payload.request_id, payload)  # type: ignore[union-attr]
        for rid in [*self.engine.waiting, *self.engine.running, *self.engine.finishing]:
            try:
                out = self.engine.abort(rid, FinishReason.ERROR, error)
            except Exception:  # noqa: BLE001 - answer the others
                log.exception("[tessera] answering %s failed", rid)
                continue
            if out is not None:
                self._emit(out)
