"""Tessera's error tree. Messages follow `<field>: <problem>; allowed <range or set>, got <value>`."""

from __future__ import annotations


class TesseraError(Exception):
    """Base of every error Tessera raises on purpose."""


class InvalidInputError(TesseraError, ValueError):
    """A request field is missing or out of range; `.field` names it (answered with INVALID_ARG)."""

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


def _short(value: object, limit: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
