"""LoRA on the ONNX Runtime denoiser (issue 14): one merged session per adapter set, LRU-cached.

An exported graph has its weights as constants and ORT has no per-row weights, so a call cannot give each
row its own adapters the way the torch executor does (lora_torch: y_r = W x_r + sum s B A x_r). What this
runtime allows is the merged form: for an adapter set (its (adapter, scale) pairs) the targeted weights
become W0 + sum s * scale * B @ A (lora_onnx.OnnxWeights.merged: the torch merge's arithmetic, mapped onto
the exporter's initializers, transposed ones included) in a fresh InferenceSession, which then runs at the
base session's speed. Sessions are kept per set, least recently used dropped beyond `max_sessions`. A step
whose rows carry different sets is one ORT call per set (its rows gathered, outputs scattered back); rows
without adapters go to the base call (the engine's own denoiser: in-process or over BLS). A set is keyed by
its adapters' identity and scales, in name order: another scale is another set, so another session.
perf/results/lora_ort_cost.json measures a build against a call.

How the weights reach ORT (onnxruntime 1.31, measured here):
  embedded initializers   the model's bytes with those initializers replaced (OnnxWeights.serialized_with),
                          loaded from memory: ORT optimises the graph with the merged weights.
  external data           `SessionOptions.add_external_initializers`: ORT swaps them in when it loads the
                          graph, before optimising, and refuses unknown names (models over protobuf's 2 GB
                          are exported this way). It refuses to replace embedded initializers.
  not used                `SessionOptions.add_initializer`: meant for sharing weights between sessions, it is
                          applied after ORT's graph optimisations, so a weight ORT re-lays out or folds keeps
                          its old value without a word (a Conv weight at ORT_ENABLE_ALL: the output did not
                          change at all); it also ignores unknown names and wrong shapes.
The OrtValues handed to ORT are not copied: they live as long as their session, in the cache entry.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, ExecutorError
from .base import DENOISER_OUTPUT
from .lora_onnx import OnnxWeights
from .lora_torch import LoraAdapter
from .ort import OrtModel

SetKey = tuple[tuple[int, float], ...]  # (id(adapter), scale) in name order; () = the base model


def set_entries(assignment: Sequence[tuple[LoraAdapter, float]]) -> tuple[tuple[LoraAdapter, float], ...]:
    """One row's adapter set, normalised: scale-0 and empty adapters dropped, sorted by name (then identity)."""
    kept = [(a, float(s)) for a, s in assignment if s != 0.0 and a.layers]
    return tuple(sorted(kept, key=lambda e: (e[0].name, id(e[0]), e[1])))


def set_key(entries: Sequence[tuple[LoraAdapter, float]]) -> SetKey:
    return tuple((id(a), s) for a, s in entries)


class _MergedModel(OrtModel):
    """The denoiser ONNX file in a session with some initializers replaced by merged weights; runs like
    OrtModel (same session settings, Triton-shaped feeds)."""

    def __init__(self, weights: OnnxWeights, merged: dict[str, np.ndarray], threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()  # OrtModel's settings
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.arrays = merged
        external = [n for n in merged if n in weights.external]
        self.values = [ort.OrtValue.ortvalue_from_numpy(merged[n]) for n in external]  # read in place by ORT
        if external:
            opts.add_external_initializers(external, self.values)
        embedded = {n: a for n, a in merged.items() if n not in weights.external}
        source: str | bytes = str(weights.path)
        if embedded:
            source = weights.serialized_with(embedded)
            if weights.external:  # the rest of the external data, relative to the file's directory
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                              str(weights.path.parent))
        self.path = weights.path
        self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        self.input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def nbytes(self) -> int:
        """The merged weights this session was given (ORT holds its own copy of the whole model besides)."""
        return sum(a.nbytes for a in self.arrays.values())


@dataclass(slots=True)
class _Entry:
    entries: tuple[tuple[LoraAdapter, float], ...]  # keeps the adapters (and so their ids) alive
    model: _MergedModel
    build_s: float


@dataclass(frozen=True, slots=True)
class OrtLoraStats:
    builds: int  # merged sessions built (cache misses)
    hits: int  # calls served by a cached session
    evictions: int
    build_s_total: float  # seconds spent merging and building sessions
    cached: int  # sessions now in the cache


class OrtLora:
    """A DenoiseCall `(inputs, adapters=None)` for ConcatDenoiser: `adapters` per item of the call is
    (its (adapter, scale) pairs, its rows), both CFG halves of a request carrying its set."""

    def __init__(self, onnx_path: str | Path, base_call: Callable[[dict], np.ndarray], threads: int = 1,
                 max_sessions: int = 4):
        """`onnx_path`: the denoiser file the base call runs; `base_call`: the call for rows without
        adapters (the engine's own denoiser); `max_sessions`: merged sessions kept (>= 1)."""
        path = Path(onnx_path)
        if not path.is_file():
            raise ConfigError(f"lora_dir: LoRA on ONNX Runtime needs the denoiser's ONNX file in-process; "
                              f"allowed an exported repository with it, got no file at {path}")
        if max_sessions < 1:
            raise ConfigError(f"max_sessions: allowed >= 1, got {max_sessions}")
        self.path, self.base_call, self.threads, self.max_sessions = path, base_call, threads, max_sessions
        self.weights = OnnxWeights(path)
        self._cache: OrderedDict[SetKey, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # the engine loop and a start-up profile may both call
        self._builds = self._hits = self._evictions = 0
        self._build_s = 0.0

    def stats(self) -> OrtLoraStats:
        return OrtLoraStats(self._builds, self._hits, self._evictions, self._build_s, len(self._cache))

    def model_for(self, assignment: Sequence[tuple[LoraAdapter, float]]) -> OrtModel | None:
        """The merged model for one adapter set (built on a miss), None for the empty set (base call)."""
        entries = set_entries(assignment)
        if not entries:
            return None
        key = set_key(entries)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self._hits += 1
                return hit.model
            t0 = time.perf_counter()
            model = _MergedModel(self.weights, self.weights.merged(entries), self.threads)
            build_s = time.perf_counter() - t0
            self._cache[key] = _Entry(entries, model, build_s)
            self._builds += 1
            self._build_s += build_s
            while len(self._cache) > self.max_sessions:
                self._cache.popitem(last=False)
                self._evictions += 1
            return model

    def _run(self, model: OrtModel | None, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.base_call(inputs) if model is None else model.run(inputs)[DENOISER_OUTPUT]

    def __call__(self, inputs: dict[str, np.ndarray], adapters=None) -> np.ndarray:
        if not adapters or not any(a for a, _ in adapters):
            return self.base_call(inputs)
        n = inputs["sample"].shape[0]
        if sum(rows for _, rows in adapters) != n:
            raise ExecutorError(f"lora: the call has {n} rows, its items {sum(r for _, r in adapters)}")
        groups: dict[SetKey, tuple[tuple, list[int]]] = {}
        start = 0
        for assignment, rows in adapters:
            entries = set_entries(assignment)
            groups.setdefault(set_key(entries), (entries, []))[1].extend(range(start, start + rows))
            start += rows
        if len(groups) == 1:  # every row the same set: one call on the inputs as they are
            (entries, _), = groups.values()
            return self._run(self.model_for(entries), inputs)
        out = None
        for entries, rows in groups.values():
            idx = np.asarray(rows)
            part = self._run(self.model_for(entries), {k: v[idx] for k, v in inputs.items()})
            if out is None:
                out = np.empty((n, *part.shape[1:]), part.dtype)
            out[idx] = part
        return out
