"""LoRA on an exported ONNX denoiser (issue 14): which initializer holds each targeted UNet weight, and that
initializer's merged value W0 + sum_a s_a * scale_a * B_a @ A_a for one adapter set. Shared by the ONNX
Runtime executor (lora_ort: a session per set) and the TensorRT refit path (lora_trt: the ONNX parser names
an engine's refittable weights after these initializers).

Where the legacy exporter (tessera_export.onnx_export, opset 17, constant folding on) puts a module's weight:
  Conv2d                       its own name, `model.<module>.weight`, [out, in, kh, kw] as torch has it
  Linear on a 2-D input        its own name, input B of a Gemm with transB=1: [out, in] as torch has it
  Linear on a 3-D input        constant-folded: the Transpose is folded into a fresh initializer
                               `onnx::MatMul_<n>` = W^T [in, out], input B of a MatMul
The folded names carry nothing of the module, so weights are found through the nodes that use them: the
exporter names every node after its module scope (`/model/down_blocks.1/.../attn1/to_q/MatMul`), and a
module's weight is input 1 of the Conv / Gemm / MatMul in its scope; the layout follows from that node
(and from a Transpose perm=[1,0] in between, as an export without folding has). Graphs without scope names
(rewritten by other tools) fall back to the initializer name `<module>.weight` (any prefix), which finds
convolutions and Gemm Linears but not the folded MatMul weights. Each found initializer is checked: its
shape must be the module's (transposed where the layout says), and every node using it must lie in the
module's scope (the exporter deduplicates equal initializers: a weight shared with another layer is never
overwritten). Anything that fails is refused with `LoraMappingError`, naming the modules and why: a module
is never skipped silently, and ORT would not complain (`SessionOptions.add_initializer` ignores unknown
names and does not check shapes; measured with onnxruntime 1.31).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .lora_torch import LoraAdapter

_WEIGHT_OPS = {"Conv": False, "Gemm": None, "MatMul": True}  # op -> initializer holds W^T (Gemm: per transB)


class LoraMappingError(ValueError):
    """An adapter targets a module whose weight cannot be placed in the ONNX graph."""


@dataclass(frozen=True, slots=True)
class OnnxWeight:
    """Where one module's weight lives: the initializer, and whether it holds W^T ([in, out]) instead of
    W as torch has it ([out, in] or [out, in, kh, kw])."""

    module: str
    initializer: str
    transposed: bool
    shape: tuple[int, ...]  # the initializer's
    dtype: np.dtype


def lora_deltas(adapters_with_scales: Sequence[tuple[LoraAdapter, float]]) -> dict[str, torch.Tensor]:
    """Per targeted module: sum_a s_a * delta_a in fp32 and torch's layout (LoraLayer.delta, the math
    TorchLora.merge applies), adapters in the order given. Scale-0 entries contribute nothing."""
    deltas: dict[str, torch.Tensor] = {}
    for adapter, s in adapters_with_scales:
        if s == 0.0:
            continue
        for name, layer in adapter.layers.items():
            d = layer.delta(float(s))
            deltas[name] = deltas[name].add_(d) if name in deltas else d
    return deltas


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            import onnx

            return onnx.helper.get_attribute_value(a)
    return default


class OnnxWeights:
    """The LoRA-targetable weights of one ONNX model, found per UNet module name (module docstring).

    Holds the parsed model: its embedded initializers are the base weights W0 (about the size of the file);
    initializers in external data stay there and are read when a merge needs them."""

    def __init__(self, path: str | Path):
        import onnx
        from onnx.external_data_helper import uses_external_data

        self.path = Path(path)
        self.model = model = onnx.load(str(path), load_external_data=False)
        graph = model.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self._index = {t.name: i for i, t in enumerate(graph.initializer)}
        self.external = frozenset(t.name for t in graph.initializer if uses_external_data(t))
        self._consumers: dict[str, list[tuple[object, int]]] = {}
        self._producer = {out: node for node in graph.node for out in node.output}
        for node in graph.node:
            for k, name in enumerate(node.input):
                self._consumers.setdefault(name, []).append((node, k))
        scoped = [n.name.strip("/").split("/") for n in graph.node if n.name.startswith("/")]
        firsts = {p[0] for p in scoped if len(p) > 2}
        self._wrapper = firsts.pop() if len(firsts) == 1 else None  # the export wrapper's attribute ("model")
        self._by_scope: dict[str, list] = {}
        for node in graph.node:
            scope = self.scope(node)
            if scope and node.op_type in _WEIGHT_OPS:
                self._by_scope.setdefault(scope, []).append(node)
        self._found: dict[str, OnnxWeight | str] = {}

    def scope(self, node) -> str | None:
        """The module path a node belongs to (`down_blocks.1.attentions.0...to_q`), or None without one."""
        if not node.name.startswith("/"):
            return None
        parts = node.name.strip("/").split("/")[:-1]  # the last part is the op's own name
        if self._wrapper is not None and parts and parts[0] == self._wrapper:
            parts = parts[1:]
        return ".".join(parts) or None

    def find(self, module: str) -> OnnxWeight | str:
        """The weight of `module`, or why it cannot be placed (a sentence)."""
        hit = self._found.get(module)
        if hit is None:
            hit = self._found[module] = self._find(module)
        return hit

    def _find(self, module: str) -> OnnxWeight | str:
        candidates = {}
        for node in self._by_scope.get(module, ()):
            if len(node.input) > 1:
                name = self._source(node.input[1])
                if name is not None:
                    candidates[name] = node
        if not candidates:
            named = [n for n in self.initializers
                     if n == f"{module}.weight" or n.endswith(f".{module}.weight")]
            if len(named) > 1:
                return f"several initializers are named after it ({', '.join(sorted(named))})"
            if not named:
                return ("no node in its scope takes a constant weight and no initializer is named after it "
                        "(folded, renamed or fused by whatever wrote the graph)")
            candidates = {named[0]: None}
        if len(candidates) > 1:
            return f"several initializers in its scope ({', '.join(sorted(candidates))})"
        (name,) = candidates
        transposed = self._layout(name, module)
        if isinstance(transposed, str):
            return f"initializer {name!r}: {transposed}"
        t = self.initializers[name]
        import onnx

        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        return OnnxWeight(module, name, transposed, tuple(int(d) for d in t.dims), dtype)

    def _source(self, tensor: str) -> str | None:
        """The initializer a weight input comes from: itself, or through one Transpose."""
        if tensor in self.initializers:
            return tensor
        node = self._producer.get(tensor)
        if node is not None and node.op_type == "Transpose" and node.input and node.input[0] in self.initializers:
            return node.input[0]
        return None

    def _layout(self, name: str, module: str) -> bool | str:
        """Whether initializer `name` holds W^T, from every node that uses it; a sentence if they disagree,
        use it as something else than a weight, or lie outside `module`'s scope."""
        layouts = set()
        users = list(self._consumers.get(name, ()))
        flip = {id(n): False for n, _ in users}
        while users:
            node, k = users.pop()
            scope = self.scope(node)
            if scope is not None and scope != module:
                return f"also used by {node.name!r} outside {module!r} (a shared weight)"
            if node.op_type == "Transpose" and list(_attr(node, "perm", [])) == [1, 0]:
                for out in node.output:
                    for n2, k2 in self._consumers.get(out, ()):
                        flip[id(n2)] = not flip[id(node)]
                        users.append((n2, k2))
                continue
            if node.op_type not in _WEIGHT_OPS or k != 1:
                return f"used as input {k} of a {node.op_type} ({node.name or 'unnamed'}), not as a layer weight"
            t = _WEIGHT_OPS[node.op_type]
            if t is None:  # Gemm: B is W with transB=1, W^T without
                t = not _attr(node, "transB", 0)
            layouts.add(t != flip.get(id(node), False))
        if len(layouts) != 1:
            return "used by no layer" if not layouts else "used both as W and as W^T"
        return layouts.pop()

    def resolve(self, adapters: Sequence[LoraAdapter]) -> dict[str, OnnxWeight]:
        """Every module the adapters target -> its weight; LoraMappingError naming each one that cannot be
        placed, or whose shape is not the adapter's."""
        out: dict[str, OnnxWeight] = {}
        bad: list[str] = []
        for adapter in adapters:
            for module, layer in adapter.layers.items():
                w = self.find(module)
                if isinstance(w, str):
                    bad.append(f"{adapter.name}: {module}: {w}")
                    continue
                want = (layer.B.shape[0], *layer.A.shape[1:])
                have = (w.shape[1], w.shape[0]) if w.transposed and len(w.shape) == 2 else w.shape
                if (w.transposed and len(w.shape) != 2) or tuple(have) != tuple(want):
                    bad.append(f"{adapter.name}: {module}: initializer {w.initializer!r} is {list(w.shape)}"
                               f"{' (W^T)' if w.transposed else ''}, the adapter's delta is {list(want)}")
                    continue
                out[module] = w
        if bad:
            raise LoraMappingError(
                f"lora: {len(bad)} targeted weight(s) cannot be placed in the ONNX graph {self.path}; every "
                "targeted module needs its own weight initializer (Conv, Gemm or MatMul input 1) of the "
                "module's shape:\n  " + "\n  ".join(bad[:20])
                + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""))
        return out

    def base(self, initializer: str) -> np.ndarray:
        """W0 as stored (a fresh, writable array; external data read from the file's directory)."""
        from onnx import numpy_helper

        return np.array(numpy_helper.to_array(self.initializers[initializer], base_dir=str(self.path.parent)))

    def serialized_with(self, values: dict[str, np.ndarray]) -> bytes:
        """The model's bytes with the embedded initializers in `values` replaced (the parsed model is left as
        it was). Not thread-safe: callers serialise (OrtLora holds its lock)."""
        from onnx import TensorProto, numpy_helper

        graph, saved = self.model.graph, {}
        try:
            for name, array in values.items():
                if name in self.external:
                    raise ValueError(f"lora: {name} is in external data; pass it as an external initializer")
                t = graph.initializer[self._index[name]]
                saved[name] = TensorProto()
                saved[name].CopyFrom(t)
                t.CopyFrom(numpy_helper.from_array(array, name))
            return self.model.SerializeToString()
        finally:
            for name, t in saved.items():
                graph.initializer[self._index[name]].CopyFrom(t)

    def merged(self, adapters_with_scales: Sequence[tuple[LoraAdapter, float]]) -> dict[str, np.ndarray]:
        """Initializer name -> W0 + sum s * scale * B @ A for the set, in the initializer's layout and dtype
        (the sum in fp32, rounded once: TorchLora.merge's arithmetic, so an fp32 weight is bit-identical to
        the torch merge of the same set). Only the weights the set touches; {} for an empty set."""
        weights = self.resolve([a for a, s in adapters_with_scales if s != 0.0])
        out: dict[str, np.ndarray] = {}
        for module, d in lora_deltas(adapters_with_scales).items():
            w = weights[module]
            w0 = torch.from_numpy(self.base(w.initializer))
            w0 = w0.T if w.transposed else w0
            merged = w0.float() + d
            merged = merged.T if w.transposed else merged
            out[w.initializer] = np.ascontiguousarray(merged.to(w0.dtype).numpy())
        return out
