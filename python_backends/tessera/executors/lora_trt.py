"""LoRA on a TensorRT engine by refit (issue 14). Written against TensorRT's Python refit API; NOT run here
(no TensorRT, no GPU on the machines this was written on): on such a host it stops at once with
RuntimeUnavailableError saying so.

TensorRT has no per-row weights either, and rebuilding an engine per adapter set takes minutes, but an
engine built with `trt.BuilderFlag.REFIT` can take new weights in place (`trt.Refitter`): for an adapter set,
the merged weights W0 + sum s * scale * B @ A of the ONNX initializers it touches (lora_onnx, the same math
and mapping as the ORT path: TensorRT's ONNX parser names an engine's weights after the initializers), then
`set_named_weights` for each, `refit_cuda_engine()`. Switching to another set refits its weights and puts
the previous set's other weights back to W0 from the ONNX file; `reset()` puts everything back (un-refit).
Weights TensorRT folded away at build time are not refittable: they are refused by name before anything
changes. Weights the builder fused with a changed one (`get_missing_weights` after the set) get their W0.

Not wired into serving: the repository's `tensorrt_plan` denoiser is run by Triton's TensorRT backend, which
holds its engine and exposes no refit, and its plans are built without REFIT (tessera_export.repository).
This class is for an engine the process holds itself (`trt.Runtime(logger).deserialize_cuda_engine`). A
refit changes the engine for every execution context: refit between denoiser calls, never during one, and
one set at a time (a step whose rows carry different sets would refit per set).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ExecutorError, RuntimeUnavailableError
from .lora_onnx import LoraMappingError, OnnxWeights
from .lora_ort import SetKey, set_entries, set_key
from .lora_torch import LoraAdapter


def require_tensorrt():
    """The tensorrt module, or RuntimeUnavailableError when TensorRT or a CUDA GPU is missing."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a missing libnvinfer behind the bindings
        raise RuntimeUnavailableError(
            f"lora: LoRA on TensorRT needs the tensorrt package and a CUDA GPU; it runs only on a GPU host, and "
            f"this host has no TensorRT ({type(e).__name__}: {e}). Use denoiser_runtime=torch or ort here.") from e
    import torch

    if not torch.cuda.is_available():
        raise RuntimeUnavailableError(
            "lora: LoRA on TensorRT needs a CUDA GPU; it runs only on a GPU host, and this host has none "
            "(torch.cuda.is_available() is False). Use denoiser_runtime=torch or ort here.")
    return trt


class TrtLora:
    """Refits one refittable engine to one adapter set at a time (module docstring)."""

    def __init__(self, engine, onnx_path: str | Path, logger=None):
        """`engine`: a trt.ICudaEngine built with BuilderFlag.REFIT from `onnx_path` (the exported denoiser)."""
        trt = require_tensorrt()
        self.trt = trt
        self.weights = OnnxWeights(onnx_path)
        self.refitter = trt.Refitter(engine, logger or trt.Logger(trt.Logger.WARNING))
        self.refittable = frozenset(self.refitter.get_all_weights())
        if not self.refittable:
            raise ConfigError("engine: no refittable weights; allowed an engine built with trt.BuilderFlag.REFIT, "
                              "got one built without it")
        self.applied: dict[str, np.ndarray] = {}  # initializer -> the merged value now in the engine
        self._key: SetKey = ()
        self._entries: tuple = ()  # keeps the applied adapters (and their ids) alive
        self.refits = 0

    @property
    def current(self) -> tuple[tuple[str, float], ...]:
        """(adapter name, scale) of the set now in the engine; () for the base weights."""
        return tuple((a.name, s) for a, s in self._entries)

    def apply(self, adapters_with_scales: Sequence[tuple[LoraAdapter, float]]) -> None:
        """The engine's weights become those of this set (a no-op when it already is; the empty set resets)."""
        entries = set_entries(adapters_with_scales)
        key = set_key(entries)
        if key == self._key:
            return
        merged = self.weights.merged(entries)
        absent = sorted(set(merged) - self.refittable)
        if absent:
            raise LoraMappingError(
                f"lora: {len(absent)} weight(s) the set changes are not refittable in this engine (folded or "
                f"fused away when it was built): {', '.join(absent[:10])}{' ...' if len(absent) > 10 else ''}")
        restore = {n: self.weights.base(n) for n in self.applied if n not in merged}
        self._refit({**restore, **merged})
        self.applied, self._key, self._entries = merged, key, entries

    def reset(self) -> None:
        """Every refitted weight back to W0 (un-refit)."""
        self.apply(())

    def _refit(self, values: dict[str, np.ndarray]) -> None:
        if not values:
            return
        held: dict[str, np.ndarray] = {}  # TensorRT reads these host buffers during refit_cuda_engine

        def put(name: str, array: np.ndarray) -> None:
            proto = getattr(self.refitter, "get_weights_prototype", None)  # TensorRT >= 10: the engine's dtype
            if proto is not None:
                array = array.astype(self.trt.nptype(proto(name).dtype), copy=False)
            held[name] = np.ascontiguousarray(array)
            if not self.refitter.set_named_weights(name, held[name]):
                raise ExecutorError(f"lora: TensorRT refused weights {name!r} {list(array.shape)} {array.dtype} "
                                    "(wrong count or type for the engine)")

        for name, array in values.items():
            put(name, array)
        for name in self.refitter.get_missing_weights():  # fused with a changed weight: supply W0
            if name in self.weights.initializers and name not in held:
                put(name, self.weights.base(name))
        missing = list(self.refitter.get_missing_weights())
        if missing:
            raise ExecutorError(f"lora: refit needs weights that are not ONNX initializers: {missing[:10]}")
        if not self.refitter.refit_cuda_engine():
            raise ExecutorError("lora: TensorRT's refit_cuda_engine() failed (see the TensorRT log)")
        self.refits += 1
