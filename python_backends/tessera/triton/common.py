"""Helpers shared by the Triton adapters: config parameters, error responses, logging."""

from __future__ import annotations

import json
import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from ..errors import ConfigError, InvalidInputError
from ..wire import ENTRY_INPUT_NAMES, STREAM_INPUTS

ENTRY_FIELDS = set(ENTRY_INPUT_NAMES) | set(STREAM_INPUTS)


def parameters(args: dict) -> dict[str, str]:
    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


def int_param(params: dict[str, str], key: str, default: int) -> int:
    raw = params.get(key, str(default))
    try:
        return int(raw)
    except ValueError as e:
        raise ConfigError(f"{key}: not an integer; allowed an integer, got {raw!r}") from e


def error_response(exc: BaseException) -> pb_utils.InferenceResponse:
    """INVALID_ARG for bad input (HTTP 400), INTERNAL for anything else (HTTP 500)."""
    code = pb_utils.TritonError.INVALID_ARG if isinstance(exc, InvalidInputError) else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc), code))


# Stable prefixes of the engine's error messages (an API: tests and the facade rely on them).
ENGINE_ERROR_PREFIXES = {
    "engine: overloaded": "UNAVAILABLE",
    "engine: shutting down": "UNAVAILABLE",
    "deadline cannot be met": "UNAVAILABLE",
    "request cancelled": "CANCELLED",
}


def code_for_engine_error(message: str):
    """The TritonError code for an engine error message relayed over BLS (which drops the code)."""
    for prefix, code in ENGINE_ERROR_PREFIXES.items():
        if message.startswith(prefix):
            return getattr(pb_utils.TritonError, code)
    field = message.split(":", 1)[0]
    if field in ENTRY_FIELDS:
        return pb_utils.TritonError.INVALID_ARG
    return pb_utils.TritonError.INTERNAL


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
