"""Denoiser executors for the step engine: run one step for many requests at once.

Each item is one request's denoiser inputs (`Txt2Img.denoiser_inputs`): `sample` [n, C, h, w] (n = 2 with
classifier-free guidance), `timestep` [n], `encoder_hidden_states` [n, S, D] and, for SD3,
`pooled_projections` [n, P]. `run(items)` returns one noise prediction per item and the call stats.

  ConcatDenoiser  step-level batching without patches: one call per latent resolution
  PatchDenoiser   exact patches (torch): ONE call for all patches of all resolutions (patches.py)
  TiledDenoiser   fixed-shape tiles with overlap, blended back (ORT/TensorRT): approximate, measured
Torch denoisers run where their weights are (CPU or CUDA, fp32 or fp16): inputs go to the model's
device and dtype, outputs come back as FP32 numpy on the CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np

from ..interfaces import CallStats, Inputs
from ..options import Family

DenoiseCall = Callable[..., np.ndarray]  # (inputs, adapters=None): adapters per item, with its rows (CFG halves)


def _concat(items: list[Inputs]) -> Inputs:
    return {k: np.concatenate([it[k] for it in items]) for k in items[0]}


def _split(out: np.ndarray, items: list[Inputs]) -> list[np.ndarray]:
    res, start = [], 0
    for it in items:
        n = it["sample"].shape[0]
        res.append(out[start : start + n])
        start += n
    return res


def no_controlnets(controls: list | None, mode: str) -> None:
    if controls is not None and any(c is not None for c in controls):
        raise RuntimeError(f"controlnet: denoise_mode {mode} without the UNet's encoder/decoder parts cannot apply "
                           "ControlNets (executors.control.ControlDenoiser does)")


class ConcatDenoiser:
    """Requests at the same latent size share one call; each distinct size is its own call."""

    mode = "concat"

    def __init__(self, call: DenoiseCall):
        self.call = call

    def run(self, items: list[Inputs], adapters: list | None = None,
            controls: list | None = None, places: list | None = None) -> tuple[list[np.ndarray], CallStats]:
        no_controlnets(controls, "concat")
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            key = it["sample"].shape[1:] + it["encoder_hidden_states"].shape[1:]
            groups.setdefault(key, []).append(i)
        outs: list[np.ndarray | None] = [None] * len(items)
        batch, reqs = [], []
        for idxs in groups.values():
            group = [items[i] for i in idxs]
            merged = _concat(group)
            own = [(adapters[i], items[i]["sample"].shape[0]) for i in idxs] if adapters else None
            out = self.call(merged) if own is None else self.call(merged, own)  # adapter-aware calls (torch, OrtLora)
            for i, o in zip(idxs, _split(out, group), strict=True):
                outs[i] = o
            batch.append(merged["sample"].shape[0])
            reqs.append(len(idxs))
        return outs, CallStats(tuple(batch), (1,) * len(batch), tuple(reqs))  # type: ignore[return-value]


class RowParallel:
    """Latent (CFG) parallelism in one process (issue 15): a call of n >= 2 rows runs as `degree` contiguous
    parts at once on a thread pool and the outputs are concatenated back in row order, so a lone request's
    conditional and unconditional halves run at the same time. For calls that release the GIL while they
    compute (ONNX Runtime, one intra-op thread each): rows are independent, so the output equals one call's
    up to the kernels' batch-size-dependent rounding."""

    def __init__(self, call: Callable[[Inputs], np.ndarray], degree: int = 2, max_rows: int | None = None):
        """`max_rows`: split only calls of at most this many rows (None: every call of 2+ rows)."""
        from concurrent.futures import ThreadPoolExecutor

        if degree < 2:
            raise ValueError(f"cfg_parallel: degree allowed >= 2, got {degree}")
        self.call, self.degree, self.max_rows = call, degree, max_rows
        self._pool = ThreadPoolExecutor(max_workers=degree - 1, thread_name_prefix="tessera-rows")

    def __call__(self, inputs: Inputs) -> np.ndarray:
        n = inputs["sample"].shape[0]
        if n < 2 or self.max_rows is not None and n > self.max_rows:
            return self.call(inputs)
        cuts = np.linspace(0, n, min(self.degree, n) + 1).round().astype(int)
        parts = [{k: v[a:b] for k, v in inputs.items()} for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
        futures = [self._pool.submit(self.call, p) for p in parts[1:]]
        first = self.call(parts[0])  # this thread runs one part itself
        return np.concatenate([first, *(f.result() for f in futures)])


def torch_call(model, family: Family) -> DenoiseCall:
    """A numpy-in, numpy-out call of a diffusers denoiser (UNet2DConditionModel or SD3Transformer2DModel)."""
    import torch

    def call(inputs: Inputs, adapters=None) -> np.ndarray:
        """`adapters`: per item of the call, (its (adapter, scale) pairs, its rows): applied per row."""
        t = to_model(model, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()})
        with torch.no_grad(), _rows(model, adapters):
            return to_host(torch_forward(model, family, t))

    return call


def _rows(model, adapters):
    """LoRA for one call (executors/lora_torch), chosen per call: every item with the same set -> that set
    merged into the weights (kept merged while the next calls use it too: no per-row work at all); items
    with different sets, or some without -> the merged set, if any, unmerged exactly, then per-row hooks;
    no adapters -> the base weights."""
    from .lora_torch import TorchLora

    lora = TorchLora.attached(model)  # None until a call of this model carried adapters
    sets = [tuple((a, float(s)) for a, s in assignment) for assignment, _ in adapters or ()]
    if not any(sets):
        if lora is not None:
            lora.unmerge()
        return contextlib.nullcontext()
    first = sets[0]
    if first and all(s == first for s in sets):  # adapters compare by identity, scales by value
        TorchLora.of(model).merge(first)
        return contextlib.nullcontext()
    from .lora_torch import LoraPlan, lora_rows

    TorchLora.of(model).unmerge()
    return lora_rows(model, LoraPlan.for_items([a for a, _ in adapters], [n for _, n in adapters]))


def to_model(model, tensors: dict) -> dict:
    """Tensors onto the model's device, floating ones (but the timestep) in its dtype (fp16 on a GPU).
    For a CPU fp32 model these are the same tensors (Tensor.to returns self when nothing changes)."""
    p = next(model.parameters())
    return {k: v.to(p.device, p.dtype if v.is_floating_point() and k != "timestep" else v.dtype)
            for k, v in tensors.items()}


def to_host(out) -> np.ndarray:
    """A denoiser output as the executors return it: FP32 numpy on the CPU (no copy if it already is)."""
    import torch

    return out.to("cpu", torch.float32).numpy()


def torch_forward(model, family: Family, t: dict):
    if family is Family.SD:
        return model(t["sample"], t["timestep"], encoder_hidden_states=t["encoder_hidden_states"], return_dict=False)[0]
    return model(
        hidden_states=t["sample"], timestep=t["timestep"], encoder_hidden_states=t["encoder_hidden_states"],
        pooled_projections=t["pooled_projections"], return_dict=False,
    )[0]


class PatchDenoiser:
    """All patches of all requests (CFG halves included) in one exact call (PatchedServe §3)."""

    mode = "patches"

    def __init__(self, model, family: Family, multiple: int, patch_size: int = 0):
        self.model, self.family, self.multiple, self.patch_size = model, family, multiple, patch_size

    def run(self, items: list[Inputs], adapters: list | None = None,
            controls: list | None = None, places: list | None = None) -> tuple[list[np.ndarray], CallStats]:
        no_controlnets(controls, "patches")
        if adapters is not None and any(adapters):
            raise RuntimeError("adapters: exact patches cannot apply LoRA yet (needs denoise_mode concat)")
        import torch

        from ..patch_index import PatchIndex, patch_edge
        from ..patches import cut_patches, exact_patch_mode, per_patch, stitch_patches

        # one copy per request onto the model's device, then one [C, h, w] view per row (CFG halves)
        samples = {i: torch.from_numpy(np.ascontiguousarray(it["sample"])) for i, it in enumerate(items)}
        images = [row for sample in to_model(self.model, samples).values() for row in sample]
        per_image = to_model(self.model, {
            k: torch.from_numpy(np.concatenate([it[k] for it in items])) for k in items[0] if k != "sample"
        })
        sizes = [tuple(img.shape[-2:]) for img in images]
        index = PatchIndex.build(sizes, patch_edge(sizes, self.multiple, self.patch_size))
        inputs = {k: per_patch(index, v) for k, v in per_image.items()}
        inputs["sample"] = cut_patches(index, images)
        with torch.no_grad(), exact_patch_mode(self.model, index):
            out = torch_forward(self.model, self.family, inputs)
        stitched = stitch_patches(index, out)
        outs, start = [], 0
        for it in items:  # the images of one item (its CFG halves) share a size
            n = it["sample"].shape[0]
            outs.append(to_host(torch.stack(stitched[start : start + n])))
            start += n
        stats = CallStats((index.n_patches,), (len(index.groups),), (len(items),))
        return outs, stats


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, size) with tiles of `tile` cells overlapping by >= `overlap`."""
    if size <= tile:
        return [0]
    stride = max(tile - overlap, 1)
    n = math.ceil((size - tile) / stride) + 1
    return sorted({min(i * stride, size - tile) for i in range(n)})


class TiledDenoiser:
    """Fixed-shape tiles (one static engine shape for every resolution), averaged where they overlap
    (MultiDiffusion-style). Approximate: attention and GroupNorm see one tile, not the image."""

    mode = "tiled"

    def __init__(self, call: DenoiseCall, tile: int, overlap: int):
        if not 0 <= overlap < tile:
            raise ValueError(f"tile_overlap: must be in [0, tile_size); allowed [0, {tile}), got {overlap}")
        self.call, self.tile, self.overlap = call, tile, overlap

    def run(self, items: list[Inputs], adapters: list | None = None,
            controls: list | None = None, places: list | None = None) -> tuple[list[np.ndarray], CallStats]:
        no_controlnets(controls, "tiled")
        if adapters is not None and any(adapters):
            raise RuntimeError("adapters: tiles cannot apply LoRA yet (needs denoise_mode concat)")
        T = self.tile
        rows: list[Inputs] = []
        places = []  # (item, row-in-item, y, x)
        small = []  # items smaller than a tile: run whole, in their own call
        for i, it in enumerate(items):
            _, _, h, w = it["sample"].shape
            if h < T or w < T:
                small.append(i)
                continue
            for y in tile_starts(h, T, self.overlap):
                for x in tile_starts(w, T, self.overlap):
                    tile_in = dict(it)
                    tile_in["sample"] = it["sample"][:, :, y : y + T, x : x + T]
                    rows.append(tile_in)
                    places.append((i, y, x))
        outs = [np.zeros_like(it["sample"]) for it in items]
        weights = [np.zeros((1, 1) + it["sample"].shape[2:], np.float32) for it in items]
        batch, reqs, res = [], [], []
        if rows:
            merged = _concat(rows)
            for (i, y, x), o in zip(places, _split(self.call(merged), rows), strict=True):
                outs[i][:, :, y : y + T, x : x + T] += o
                weights[i][:, :, y : y + T, x : x + T] += 1.0
            batch.append(merged["sample"].shape[0])
            reqs.append(len({p[0] for p in places}))
            res.append(len({items[p[0]]["sample"].shape[2:] for p in places}))
        for i in range(len(items)):
            if i not in small:
                outs[i] = outs[i] / weights[i]
        if small:
            group = [items[i] for i in small]
            sub, stats = ConcatDenoiser(self.call).run(group)
            for i, o in zip(small, sub, strict=True):
                outs[i] = o
            batch += list(stats.batch)
            reqs += list(stats.requests)
            res += list(stats.resolutions)
        return outs, CallStats(tuple(batch), tuple(res), tuple(reqs))
