"""Helpers shared by the Triton adapters: config parameters, input tensors, logging."""

from __future__ import annotations

import collections
import json
import logging
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from ..errors import ConfigError


def parameters(args: dict) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


def int_param(params: dict[str, str], key: str, default: int) -> int:
    raw = params.get(key, str(default))
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"{key}: not an integer; allowed an integer, got {raw!r}") from e


def input_or_none(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class _TritonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        msg = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(msg)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(msg)
        else:
            pb_utils.Logger.log_info(msg)


def setup_logging() -> None:
    root = logging.getLogger("tessera")
    if not any(isinstance(h, _TritonLogHandler) for h in root.handlers):
        root.addHandler(_TritonLogHandler())
        root.setLevel(logging.INFO)
        root.propagate = False


class InFlight:
    """Requests an entry model accepted and has not answered yet, bounded: over the bound a request is answered
    OVERLOADED at once, never queued to time out late (txt2img and cascade entries)."""

    def __init__(self, name: str, limit: int):
        self.name, self.limit, self.count = name, limit, 0
        self.lock = threading.Lock()

    def enter(self) -> bool:
        with self.lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.count -= 1

    def overloaded(self):
        from ..errors import OverloadedError
        from .errors import error_response

        return error_response(OverloadedError(
            f"{self.name}: overloaded; allowed at most {self.limit} requests in flight, got one more"))


def requested(request) -> frozenset[str]:
    """The outputs a request asked for (all of the model's when it named none), for `response`."""
    return frozenset(request.requested_output_names())


def response(tensors: list, wanted: frozenset[str]):
    """A response of the `tensors` (pb_utils.Tensor) the request asked for, the others dropped here, under the GIL.
    The stub drops unrequested outputs itself, but inside ResponseSender::Send with the GIL released, and in
    python_backend r24.10 PbTensor's destructor does not take it: their numpy arrays were freed without the GIL,
    corrupting the interpreter (the cascade entry's stub died under 8 concurrent clients; docs/architecture.md)."""
    return pb_utils.InferenceResponse([t for t in tensors if t.name() in wanted])


class Relayed(Exception):
    """A model's error answer over BLS, relayed with its message (and so its Tessera class tag)."""


class _Parked:
    """Decoupled BLS response iterators held for `hold_s` after their last response, then dropped here, under the GIL.
    In python_backend r24.10 (tritonserver 2.51) the stub's utility thread erases a finished iterator from its map
    without the GIL (Stub::SendCleanupId); when Python has dropped its reference first, that erase destroys the
    iterator, its responses and their tensors, and PbTensor's destructor frees their numpy arrays without the GIL
    (upstream python_backend takes the GIL there since b771f4f, December 2024). Holding the iterator until the erase is long done makes
    Python's drop the last one. The cascade entry, which drops each BLS response right after copying its image,
    lost its stub to this after ~2,500 requests at ~100 requests/s (docs/architecture.md). Idle, the last few
    stay held until the next call."""

    def __init__(self, hold_s: float = 5.0):
        self.hold_s, self.items, self.lock = hold_s, collections.deque(), threading.Lock()

    def park(self, iterator) -> None:
        now, expired = time.monotonic(), []
        with self.lock:
            self.items.append((now + self.hold_s, iterator))
            while self.items and self.items[0][0] <= now:
                expired.append(self.items.popleft())
        del expired  # dropped here, outside the lock, with the GIL


_PARKED = _Parked()


def engine_final(engine: str, inputs: list, outputs: tuple[str, ...]) -> dict | None:
    """Run one request on decoupled model `engine` over BLS; its final response's `outputs` (pb_utils tensors, a
    missing one None), None if it finished without an image. Relayed on an error answer."""
    bls = pb_utils.InferenceRequest(model_name=engine, inputs=inputs, requested_output_names=list(outputs))
    final = None
    iterator = bls.exec(decoupled=True)
    try:
        for response in iterator:
            if response.has_error():
                raise Relayed(response.error().message())
            tensors = {n: pb_utils.get_output_tensor_by_name(response, n) for n in outputs}
            if tensors[outputs[0]] is not None:
                final = tensors
    finally:
        _PARKED.park(iterator)
    return final
