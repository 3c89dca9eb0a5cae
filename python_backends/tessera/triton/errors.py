"""Tessera errors as Triton errors, in one place: the status each error class carries becomes the
TritonError code, and the message carries the class tag (errors.wire_message) so relays can recover it."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from ..errors import Status, from_message, status_of, wire_message



def _code(status: Status):
    """pb_utils.TritonError's code for `status` (looked up when used: the stub fills pb_utils in after
    import, so module-level lookups fail during auto-complete)."""
    return getattr(pb_utils.TritonError, status.value)


def triton_error(exc: BaseException, request_id: str = "") -> pb_utils.TritonError:
    """The TritonError for `exc`; `request_id` (the client's) is named in the message for stream clients."""
    return pb_utils.TritonError(wire_message(exc, request_id), _code(status_of(exc)))


def error_response(exc: BaseException, request_id: str = "") -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[], error=triton_error(exc, request_id))


def relayed_error(message: str) -> pb_utils.TritonError:
    """An engine's error relayed over BLS (which drops the code in 2.51), its code restored from the class
    tag. The engine tags every error it sends; an untagged one is Triton's own (the engine model is not
    loaded or not ready, its stub is gone): UNAVAILABLE, retry elsewhere."""
    cls = from_message(message)
    return pb_utils.TritonError(message, _code(cls.status if cls is not None else Status.UNAVAILABLE))
