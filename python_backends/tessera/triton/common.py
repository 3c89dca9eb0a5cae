"""Helpers shared by the Triton adapters: config parameters, input tensors, logging."""

from __future__ import annotations

import json
import logging

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
