"""Tessera's error tree. Each class carries the Triton status it is answered with (a type, not a message
prefix) and a stable `code`; messages follow `<field>: <problem>; allowed <range or set>, got <value>`.

Triton 2.51 drops the status of a decoupled response's error on the way back through BLS, and gRPC
streams carry only the message, so error messages leave Tessera tagged `... [tessera:<code>]`
(`wire_message`) and `from_message` recovers the class: the adapters and the load generator's
classifier share this one mapping.
"""

from __future__ import annotations

import enum
import re


class Status(str, enum.Enum):
    """The Triton status an error is answered with (HTTP status in the comment, from Triton's
    HttpCodeFromError)."""

    INVALID_ARG = "INVALID_ARG"  # 400
    UNAVAILABLE = "UNAVAILABLE"  # 503: retry, here or elsewhere
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"  # 500


class TesseraError(Exception):
    """Base of every error Tessera raises on purpose."""

    status = Status.INTERNAL
    code = "internal"


class InvalidInputError(TesseraError, ValueError):
    """A request field is missing or out of range; `.field` names it (answered with INVALID_ARG)."""

    status = Status.INVALID_ARG
    code = "invalid_argument"

    def __init__(self, field: str, problem: str, allowed: str | None = None, got: object = None):
        self.field = field
        msg = f"{field}: {problem}"
        if allowed is not None:
            msg += f"; allowed {allowed}"
        if got is not None:
            msg += f", got {_short(got)}"
        super().__init__(msg)


class ConfigError(TesseraError, ValueError):
    """A server or export setting is wrong; raised at load time so the model fails loudly."""


class RuntimeUnavailableError(TesseraError, RuntimeError):
    """A runtime the configuration asks for (TensorRT, a CUDA GPU) is not present on this host."""


class ExecutorError(TesseraError, RuntimeError):
    """A component call (text encoder, denoiser, VAE decoder) failed."""


class ExportError(TesseraError, RuntimeError):
    """Exporting a pipeline failed (for example: ONNX output differs from torch above tolerance)."""


class DeadlineUnreachableError(TesseraError, RuntimeError):
    """The request cannot meet its deadline: refused at admission (the plan cannot fit it) or dropped
    (not even alone). Answered UNAVAILABLE: another instance may have room."""

    status = Status.UNAVAILABLE
    code = "deadline_unreachable"


class RefusedError(DeadlineUnreachableError):
    """Early refusal: at admission, the current plan cannot fit the request by its deadline (UNAVAILABLE,
    answered within milliseconds of arrival: a client or load balancer can retry elsewhere)."""

    code = "refused"


class OverloadedError(TesseraError, RuntimeError):
    """Admission is full; answered at once (UNAVAILABLE)."""

    status = Status.UNAVAILABLE
    code = "overloaded"


class ShutdownError(TesseraError, RuntimeError):
    """The engine is shutting down or its loop has stopped; answered UNAVAILABLE."""

    status = Status.UNAVAILABLE
    code = "unavailable"


class CancelledError(TesseraError, RuntimeError):
    """The client cancelled the request."""

    status = Status.CANCELLED
    code = "cancelled"


class RequestFailedError(TesseraError, RuntimeError):
    """Serving one request failed (its prompt encoding, sampler update, decode or preview), or the step it
    was part of failed; the message names the request and the stage. Answered INTERNAL."""

    status = Status.INTERNAL
    code = "internal"


ERRORS: dict[str, type[TesseraError]] = {
    c.code: c for c in (InvalidInputError, DeadlineUnreachableError, RefusedError, OverloadedError, ShutdownError,
                        CancelledError)
}
_TAG = re.compile(r" \[tessera:([a-z_]+)\]")


def status_of(exc: BaseException | None) -> Status:
    """INVALID_ARG for bad input, the class's status for Tessera errors, INTERNAL for anything else."""
    return exc.status if isinstance(exc, TesseraError) else Status.INTERNAL


def wire_message(exc: BaseException, request_id: str = "") -> str:
    """The message an error leaves Tessera with: its text, the client's request id (gRPC streams carry only
    the message, so streaming clients match errors by it) and the class tag."""
    text = str(exc) if isinstance(exc, TesseraError) else f"{type(exc).__name__}: {exc}"
    code = exc.code if isinstance(exc, TesseraError) else "internal"
    tag = f" [request id: {request_id}]" if request_id else ""
    return f"{text}{tag} [tessera:{code}]"


def from_message(message: str) -> type[TesseraError] | None:
    """The error class a wire message was tagged with; None for untagged (foreign) messages."""
    m = _TAG.search(message)
    return ERRORS.get(m.group(1), RequestFailedError) if m else None


def _short(value: object, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
