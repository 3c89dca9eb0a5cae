"""LoRA adapters on a torch denoiser (issue 14): load diffusers/PEFT LoRA files, apply them merged in place
or unmerged and batched per row.

Loading (`load_lora`, `lora_from_state_dict`): the files `pipe.load_lora_weights(dir)` reads for a
StableDiffusionPipeline UNet -- what `save_lora_weights` writes (`unet.<module>.lora_A.weight` /
`lora_B.weight`, optional `lora_adapter_metadata` in the safetensors header), the older diffusers
attention-processor keys (`...to_q_lora.down.weight`, `.lora.up.`), and kohya-ss files (`lora_unet_*`,
`lora_down`/`lora_up`, `.alpha`). Each targeted UNet module becomes one `LoraLayer` (A, B, scale), keyed
by the module's name in the UNet (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`). The
per-module scale is diffusers' + PEFT's: `lora_alpha / r` (or `/ sqrt(r)` with rsLoRA), r and alpha from the
metadata's `rank_pattern` / `alpha_pattern` (PEFT's pattern matching), else from kohya's `.alpha` entries,
else alpha = r (scale 1: diffusers' convention for files without either). The key conversion and the
config derivation are diffusers' own functions, so a file means here what it means to `load_lora_weights`.
Text-encoder entries are not applied here (`LoraAdapter.skipped` names them).

Applying (`TorchLora`, one per model; `merge(model, ...)` / `unmerge(model)` / `lora_rows(model, plan)`):

  merged    W = W0 + sum_a s_a * scale_a * B_a @ A_a on every targeted Linear / Conv2d, computed in fp32 from
            a master copy of W0 taken the first time a weight is touched (kept in the weight's own dtype,
            bit for bit: a copy, no rounding, half the memory of an fp32 master for fp16 weights), so a
            merge never builds on an earlier one and `unmerge` copies the master back: bit-identical after
            any number of cycles, no subtractive drift.
  unmerged  forward hooks on the targeted layers: y_r = W x_r + sum_a s_{r,a} * scale_a * B_a A_a x_r for
            each row r of the call, from a `LoraPlan` (the call's distinct adapters, then per row its
            (adapter index, scale) pairs). Two ways (`TorchLora.rows(plan, mode)`): `grouped`, per layer and
            adapter an index_select of its rows, A, the per-row scale on the r-wide activation, B, an
            index_add (no index ops and the scale fused into the add when one adapter has every row);
            `stacked`, the plan's adapters side by side along the rank (cached across calls), all rows
            through all of them with a [rows, rank] scale matrix that is 0 where a row does not use an
            adapter: 4 ops per layer whatever the adapter count. `auto` (default): grouped for one adapter,
            stacked unless it does more than twice grouped's LoRA work. Rows with no adapter get exactly
            the base output; hooks without a plan return the base output untouched. Conv layers follow
            PEFT: A is a conv with the base layer's kernel, stride and padding, B a 1x1 conv.

Why not PEFT's own mixed-adapter batches (`adapter_names=` in forward): they give each row ONE adapter at
the adapter's one global scale (no row with X+Y, no per-request scale), reach the layers through pre-hooks
that only PeftModel/LoraModel installs (diffusers injects adapters into UNet2DConditionModel without one,
and its forward takes no adapter_names), build Python index lists per layer per call, and need every
adapter created inside the model as modules (PEFT's create-and-replace, the ~2 s of SwiftDiffusion's
trace) with a delete_adapter pass to evict one. Here adapters are plain tensors an LRU cache can hold and
drop, the hooks are attached once, and PEFT is needed only by the tests (diffusers' reference path).
PEFT's merge/unmerge subtracts (W -= delta), which drifts; hence the masters.

Rows and classifier-free guidance: a plan has one entry per row of the denoiser call. With CFG a request
contributes two rows, [uncond, cond] (Txt2Img.denoiser_inputs), and BOTH get its adapters, as in diffusers
(the LoRA is in the UNet, which sees the doubled batch). `LoraPlan.for_items` builds a plan from per-item
(request) assignments and each item's row count, in the order the executor concatenates the items;
`LoraPlan.expand` maps it onto calls whose rows are something else (patches: row i of the call belongs to
plan row owner[i]). Unmerged application assumes batch-first inputs on every targeted layer (true for the
UNet and SD3's transformer) and checks each layer's batch against the plan.

Not supported (refused with a message when loading or applying): DoRA, LoRA biases, LoKr, grouped or
dilated convolutions, non-zero padding modes, and unmerged kxk convolutions under exact patches
(`exact_patch_mode` overrides their forward; merge instead).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes
UNET_PREFIX = "unet"
_TEXT_PREFIXES = ("text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = ("lora_te_", "lora_unet_", "lora_te1_", "lora_te2_")
_METADATA_KEY = "lora_adapter_metadata"


# --------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoraLayer:
    """One targeted module: A [r, in] (Linear) or [r, in, kh, kw] (Conv2d), B [out, r] or [out, r, 1, 1];
    delta W = scale * B @ A with scale = alpha / r (PEFT's `scaling` before any user weight)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    def delta(self, weight: float = 1.0) -> torch.Tensor:
        """weight * scale * B @ A in fp32, shaped like the base weight (PEFT's get_delta_weight; for a kxk
        conv delta[o, i, kh, kw] = sum_r B[o, r] A[r, i, kh, kw]). The factor goes on B, the small side."""
        b = self.B.flatten(1).float() * (self.scale * weight)
        return (b @ self.A.flatten(1).float()).reshape(self.B.shape[0], *self.A.shape[1:])


@dataclass(frozen=True, eq=False)
class LoraAdapter:
    """A loaded adapter: its layers keyed by UNet module name. Compared by identity."""

    name: str
    layers: Mapping[str, LoraLayer]
    source: str = ""
    skipped: tuple[str, ...] = ()  # components in the file that are not applied here (e.g. text_encoder)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers.values())

    def to(self, device=None, dtype=None) -> LoraAdapter:
        """A copy with A and B on `device` in `dtype` (the model's); scales unchanged. Self if nothing moves."""
        first = next(iter(self.layers.values()), None)
        if first is None or (
            (device is None or first.A.device == torch.device(device)) and (dtype is None or first.A.dtype == dtype)
        ):
            return self
        layers = {k: LoraLayer(v.A.to(device, dtype), v.B.to(device, dtype), v.scale) for k, v in self.layers.items()}
        return LoraAdapter(self.name, layers, self.source, self.skipped)


def _pattern_key(pattern_keys, key: str) -> str:
    """PEFT's get_pattern_key: the first pattern that matches `key` as a dotted suffix (or `key` itself)."""
    for pat in pattern_keys:
        if re.match(rf"(.*\.)?({pat})$", key):
            return pat
    return key


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import safe_open

    if path.is_dir():
        cands = [path / LORA_WEIGHT_NAME] if (path / LORA_WEIGHT_NAME).is_file() else sorted(path.glob("*.safetensors"))
        if len(cands) != 1:
            raise ValueError(f"lora: {path} must hold {LORA_WEIGHT_NAME} or exactly one .safetensors file, "
                             f"found {[c.name for c in cands]}")
        path = cands[0]
    with safe_open(str(path), framework="pt", device="cpu") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        header = f.metadata() or {}
    raw = header.get(_METADATA_KEY)
    return state, (json.loads(raw) if raw else None)


def load_lora(path: str | Path, name: str | None = None, *, device=None, dtype=None) -> LoraAdapter:
    """Read a LoRA file (or a directory holding `pytorch_lora_weights.safetensors`) for a UNet."""
    p = Path(path)
    state, metadata = _read(p)
    stem = p.name if p.is_dir() else p.stem
    adapter = lora_from_state_dict(state, metadata, name=name or stem, source=str(p))
    return adapter.to(device, dtype)


def lora_from_state_dict(state: Mapping[str, torch.Tensor], metadata: Mapping | None = None, *, name: str = "",
                         source: str = "", prefix: str = UNET_PREFIX) -> LoraAdapter:
    """The UNet part of a LoRA state dict, as diffusers' `load_lora_weights` reads it (lora_state_dict, then
    load_lora_adapter's prefix filter, key conversion and LoraConfig derivation)."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    state = {k: v for k, v in state.items() if "dora_scale" not in k}  # diffusers drops these too (with a warning)
    network_alphas = None
    if state and all(k.startswith(_KOHYA_PREFIXES) for k in state):
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

        state, network_alphas = _convert_non_diffusers_lora_to_diffusers(dict(state))
    components = sorted({k.split(".", 1)[0] for k in state})
    if any(k.startswith(f"{prefix}.") for k in state):
        skipped = tuple(c for c in components if c != prefix)
        state = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
        if metadata is not None:
            metadata = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
        if network_alphas:
            network_alphas = {k.removeprefix(f"{prefix}."): v for k, v in network_alphas.items()
                              if k.startswith(f"{prefix}.")}
    elif any(k.startswith(tuple(f"{p}." for p in _TEXT_PREFIXES)) for k in state):
        skipped, state = tuple(components), {}  # text encoder only
    else:
        skipped = ()  # keys without a component prefix: taken as the UNet's (older single-model files)
    if not state:
        return LoraAdapter(name, {}, source, skipped)
    if any(".lokr_" in k for k in state):
        raise NotImplementedError(f"lora {name!r}: LoKr adapters are not supported")
    if "lora_A" not in next(iter(state)):
        state = convert_unet_state_dict_to_peft(state)
    if any("lora_magnitude_vector" in k for k in state):
        raise NotImplementedError(f"lora {name!r}: DoRA adapters are not supported")
    if any(".lora_B." in k and k.endswith(".bias") for k in state):
        raise NotImplementedError(f"lora {name!r}: LoRA biases (lora_bias) are not supported")

    ranks = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    cfg = dict(metadata) if metadata else get_peft_kwargs(ranks, network_alphas, state, is_unet=True)
    if cfg.get("use_dora"):
        raise NotImplementedError(f"lora {name!r}: DoRA adapters are not supported")
    if cfg.get("lora_bias"):
        raise NotImplementedError(f"lora {name!r}: LoRA biases (lora_bias) are not supported")
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_pat, alpha_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora"))

    layers: dict[str, LoraLayer] = {}
    for key in state:
        if not key.endswith(".lora_A.weight"):
            if not (key.endswith(".lora_B.weight") or ".lora_A." in key or ".lora_B." in key):
                raise ValueError(f"lora {name!r}: unexpected key {key!r}")
            continue
        module = key.removesuffix(".lora_A.weight")
        b_key = f"{module}.lora_B.weight"
        if b_key not in state:
            raise ValueError(f"lora {name!r}: {key} has no {b_key}")
        A, B = state[key], state[b_key]
        r = rank_pat.get(_pattern_key(rank_pat.keys(), module), r0)
        alpha = alpha_pat.get(_pattern_key(alpha_pat.keys(), module), alpha0)
        if r != A.shape[0] or B.shape[1] != A.shape[0]:
            raise ValueError(f"lora {name!r}: {module}: rank {r} from the config, A {tuple(A.shape)}, "
                             f"B {tuple(B.shape)}")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        layers[module] = LoraLayer(A, B, float(scale))
    return LoraAdapter(name, layers, source, skipped)


# --------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True, eq=False)
class LoraPlan:
    """One denoiser call's adapters: the distinct adapters, then per row of the call a tuple of
    (adapter index, user scale) pairs (empty: base model for that row)."""

    adapters: tuple[LoraAdapter, ...]
    rows: tuple[tuple[tuple[int, float], ...], ...]
    # per adapter index: (rows, their scales) -- grouped once, shared by every layer
    groups: tuple[tuple[int, tuple[int, ...], tuple[float, ...]], ...] = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "rows", tuple(tuple((int(a), float(s)) for a, s in row) for row in self.rows))
        per: dict[int, tuple[list[int], list[float]]] = {}
        for r, row in enumerate(self.rows):
            seen = set()
            for a, s in row:
                if not 0 <= a < len(self.adapters):
                    raise ValueError(f"lora plan: row {r} names adapter {a}; allowed [0, {len(self.adapters)})")
                if a in seen:
                    raise ValueError(f"lora plan: row {r} names adapter {a} twice")
                seen.add(a)
                if s != 0.0:
                    idx, sc = per.setdefault(a, ([], []))
                    idx.append(r)
                    sc.append(s)
        object.__setattr__(self, "groups", tuple((a, tuple(i), tuple(s)) for a, (i, s) in sorted(per.items())))

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    @classmethod
    def for_items(cls, per_item: Sequence[Sequence[tuple[LoraAdapter, float]]],
                  rows_per_item: Sequence[int]) -> LoraPlan:
        """A plan from each item's (request's) adapters and its number of rows in the call, items in call
        order: every row of an item (both CFG halves) gets the item's adapters."""
        if len(per_item) != len(rows_per_item):
            raise ValueError("lora plan: one adapter list per item")
        adapters: list[LoraAdapter] = []
        index: dict[int, int] = {}
        rows = []
        for assign, n in zip(per_item, rows_per_item, strict=True):
            row = []
            for adapter, scale in assign:
                if id(adapter) not in index:
                    index[id(adapter)] = len(adapters)
                    adapters.append(adapter)
                row.append((index[id(adapter)], scale))
            rows += [tuple(row)] * n
        return cls(tuple(adapters), tuple(rows))

    def expand(self, owner: Sequence[int]) -> LoraPlan:
        """The plan for a call whose row i belongs to this plan's row owner[i] (e.g. patches of images)."""
        return LoraPlan(self.adapters, tuple(self.rows[o] for o in owner))


# --------------------------------------------------------------------------------------------- applying


def _check_layer(module: torch.nn.Module, name: str, layer: LoraLayer, adapter: LoraAdapter) -> None:
    where = f"lora {adapter.name!r}: {name}"
    if isinstance(module, torch.nn.Linear):
        ok = layer.A.dim() == 2 and layer.A.shape[1] == module.in_features and layer.B.shape[0] == module.out_features
    elif isinstance(module, torch.nn.Conv2d):
        if module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros":
            raise NotImplementedError(f"{where}: grouped, dilated or non-zero-padded convolutions are not supported")
        ok = (layer.A.dim() == 4 and tuple(layer.A.shape[1:]) == (module.in_channels, *module.kernel_size)
              and tuple(layer.B.shape) == (module.out_channels, layer.rank, 1, 1))
    else:
        raise ValueError(f"{where}: targets a {type(module).__name__}; only Linear and Conv2d layers are supported")
    if not ok:
        raise ValueError(f"{where}: A {tuple(layer.A.shape)} / B {tuple(layer.B.shape)} do not fit {module}")


class TorchLora:
    """The LoRA state of one torch model: merged weights (with their masters) and the row plan of the
    current call. Get it with `TorchLora.of(model)`; it lives on the model."""

    ATTR = "_tessera_lora"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules: dict[str, torch.nn.Module] = dict(model.named_modules())
        self.masters: dict[str, torch.Tensor] = {}  # module name -> untouched weight (a bit-exact copy)
        self.merged_names: set[str] = set()
        self.merged: tuple[tuple[str, float], ...] = ()  # (adapter name, scale) of the merged set
        self._merged_key: tuple = ()
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._checked: weakref.WeakSet[LoraAdapter] = weakref.WeakSet()  # adapters that fit (by identity)
        self._plan: LoraPlan | None = None
        self._state: tuple | None = None  # the active plan, prepared for the hooks
        self._stack_cache: OrderedDict = OrderedDict()
        self._moved: weakref.WeakKeyDictionary[LoraAdapter, LoraAdapter] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model: torch.nn.Module) -> TorchLora:
        state = model.__dict__.get(cls.ATTR)
        if state is None:
            state = cls(model)
            model.__dict__[cls.ATTR] = state  # not a submodule: invisible to state_dict / named_modules
        return state

    @classmethod
    def attached(cls, model: torch.nn.Module) -> TorchLora | None:
        """The model's LoRA state if it has one (`of` creates it)."""
        return model.__dict__.get(cls.ATTR)

    def check(self, adapter: LoraAdapter) -> None:
        """Raise unless every layer of `adapter` names a Linear/Conv2d of this model of the right shape."""
        if adapter in self._checked:
            return
        for name, layer in adapter.layers.items():
            module = self.modules.get(name)
            if module is None:
                raise ValueError(f"lora {adapter.name!r}: the model has no module {name!r}")
            _check_layer(module, name, layer, adapter)
        self._checked.add(adapter)

    @property
    def master_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.masters.values())

    # ---- merged

    def merge(self, adapters_with_scales: Sequence[tuple[LoraAdapter, float]]) -> None:
        """Weights become W0 + sum s * scale * B @ A (fp32 arithmetic) for this set; layers of an earlier
        merged set that this one does not touch go back to W0. A no-op when the set is already merged."""
        key = tuple((a, float(s)) for a, s in adapters_with_scales)
        if key == self._merged_key:  # adapters compare by identity (eq=False), scales by value
            return
        device = next(self.model.parameters()).device
        deltas: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for adapter, s in key:
                self.check(adapter)
                if s == 0.0:
                    continue
                for name, layer in adapter.to(device).layers.items():
                    d = layer.delta(s)
                    deltas[name] = deltas[name].add_(d) if name in deltas else d
            for name in self.merged_names - deltas.keys():
                self.modules[name].weight.copy_(self.masters[name])
            for name, d in deltas.items():
                w = self.modules[name].weight
                master = self.masters.get(name)
                if master is None:
                    master = self.masters[name] = w.detach().clone()
                if w.dtype == torch.float32:
                    torch.add(master, d, out=w.data)  # fp32 model: straight into the weight
                else:
                    w.copy_(d.add_(master))  # fp32 sum, rounded once into the weight's dtype
        self.merged_names = set(deltas)
        self.merged = tuple((a.name, float(s)) for a, s in adapters_with_scales)
        self._merged_key = key

    def unmerge(self) -> None:
        """Every merged weight back to its master, bit for bit."""
        with torch.no_grad():
            for name in self.merged_names:
                self.modules[name].weight.copy_(self.masters[name])
        self.merged_names = set()
        self.merged = ()
        self._merged_key = ()

    # ---- unmerged, per row

    @contextlib.contextmanager
    def rows(self, plan: LoraPlan, mode: str = "auto") -> Iterator[None]:
        """Within the block, each model call of `plan.n_rows` rows applies each row its own adapters.

        mode  grouped: per layer and adapter, its rows only (index_select, A, B, index_add): LoRA work in
                       proportion to the rows that use each adapter, ~4 ops per adapter and layer.
              stacked: per layer, the plan's adapters side by side (A's stacked along the rank, B's along
                       theirs, cached across calls for the same adapters): every row through every adapter,
                       the rows' scales (0 where a row does not use an adapter) on the rank-wide activation:
                       4 ops per layer however many adapters, LoRA work rows x total rank.
              auto:    stacked unless it would do more than twice the grouped LoRA work.
        A row without adapters gets exactly the base output either way.

        Plans nest: an inner `rows(sub_plan)` applies until its block ends, then the outer plan again. That
        is for layers that see another batch inside the call: under exact patches the convolutions see one
        row per patch (`plan.expand(patch_image)`) but self-attention runs per resolution group on whole
        images, so its wrapper would enter `rows(plan.expand(images_of_group))` around each group."""
        if mode not in ("auto", "grouped", "stacked"):
            raise ValueError(f"lora: mode must be auto, grouped or stacked, got {mode!r}")
        p = next(self.model.parameters())
        used = [a for a, _, _ in plan.groups]
        adapters = {a: self._on_model(plan.adapters[a], p) for a in used}
        for a in adapters.values():
            self.check(a)
        if mode == "auto" and used:  # one adapter: grouped (no index ops when it has every row)
            rank = {a: max(layer.rank for layer in adapters[a].layers.values()) for a in used}
            grouped_work = sum(len(idx) * rank[a] for a, idx, _ in plan.groups)
            stack = len(used) > 1 and plan.n_rows * sum(rank.values()) <= 2 * grouped_work
            mode = "stacked" if stack else "grouped"
        state: tuple | None = None
        if mode == "grouped" and used:
            groups = []
            for a, idx, scales in plan.groups:
                uniform = scales[0] if all(s == scales[0] for s in scales) else None
                groups.append((
                    adapters[a],
                    None if idx == tuple(range(plan.n_rows)) else torch.tensor(idx, dtype=torch.long, device=p.device),
                    None if uniform is not None else torch.tensor(scales, dtype=p.dtype, device=p.device),
                    uniform,
                ))
            state = ("grouped", plan.n_rows, groups)
        elif used:
            stacks = self._stacks(tuple(adapters[a] for a in used))
            scale = torch.zeros(plan.n_rows, len(used), dtype=p.dtype)  # per row and used adapter
            for j, (_, idx, scales) in enumerate(plan.groups):
                scale[list(idx), j] = torch.tensor(scales, dtype=p.dtype)
            state = ("stacked", plan.n_rows, (stacks, scale.to(p.device), {}))
        for a in adapters.values():
            for name in a.layers:
                if name not in self._hooks:
                    self._hooks[name] = self.modules[name].register_forward_hook(self._make_hook(name))
        outer = self._plan, self._state
        self._plan, self._state = plan, state
        try:
            yield
        finally:
            self._plan, self._state = outer

    def _on_model(self, adapter: LoraAdapter, p: torch.Tensor) -> LoraAdapter:
        """`adapter` on the model's device in its dtype: itself when it already is (load adapters that way:
        `load_lora(..., device=, dtype=)`), else a copy made once and kept while the adapter lives."""
        moved = adapter.to(p.device, p.dtype)
        if moved is adapter:
            return adapter
        hit = self._moved.get(adapter)
        if hit is None or hit.to(p.device, p.dtype) is not hit:
            hit = self._moved[adapter] = moved
        return hit

    def _stacks(self, adapters: tuple[LoraAdapter, ...]) -> dict:
        """Per layer: (A's stacked along the rank, B's * scale stacked along it, the column -> adapter map,
        its key). Kept for the last few adapter tuples (consecutive steps usually share theirs)."""
        key = tuple(id(a) for a in adapters)
        hit = self._stack_cache.get(key)
        if hit is not None and all(x is y for x, y in zip(hit[0], adapters, strict=True)):
            self._stack_cache.move_to_end(key)
            return hit[1]
        stacks = {}
        names = dict.fromkeys(n for a in adapters for n in a.layers)
        for name in names:
            parts = [(j, a.layers[name]) for j, a in enumerate(adapters) if name in a.layers]
            cols = tuple(j for j, layer in parts for _ in range(layer.rank))
            A = torch.cat([layer.A for _, layer in parts])
            B = torch.cat([layer.B * layer.scale for _, layer in parts], dim=1)
            stacks[name] = (A, B, torch.tensor(cols, dtype=torch.long, device=A.device), cols)
        self._stack_cache[key] = (adapters, stacks)
        while len(self._stack_cache) > 4:
            self._stack_cache.popitem(last=False)
        return stacks

    def detach(self) -> None:
        """Remove the forward hooks (they cost a Python call per layer call while installed)."""
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()

    def _make_hook(self, name: str):
        def hook(module, args, out):
            state = self._state
            if state is None:  # no plan, or one without adapters
                return None
            kind, n_rows, data = state
            x = args[0]
            if x.shape[0] != n_rows:
                raise RuntimeError(f"lora: {name} saw a batch of {x.shape[0]} rows, the plan has {n_rows}")
            conv = isinstance(module, torch.nn.Conv2d)
            if conv and module.kernel_size != (1, 1) and "forward" in module.__dict__:
                raise NotImplementedError(
                    f"lora: {name}: unmerged LoRA on a {module.kernel_size} convolution whose forward is "
                    "overridden (exact patches) is not supported; merge the adapters instead")
            if torch.is_grad_enabled():
                out = out.clone()  # under autograd; otherwise the base output is a fresh tensor: add in place
            if kind == "stacked":
                stacks, scale, per_cols = data
                entry = stacks.get(name)
                if entry is None:
                    return out
                A, B, col, cols = entry
                s = per_cols.get(cols)
                if s is None:
                    s = per_cols[cols] = scale.index_select(1, col)  # [rows, total rank]
                if conv:
                    h = F.conv2d(x, A, None, module.stride, module.padding)
                    h = h * s.view(n_rows, -1, 1, 1)
                    out.add_(F.conv2d(h, B))
                else:
                    h = F.linear(x, A)
                    h = h * s.view(n_rows, *([1] * (h.dim() - 2)), -1)
                    out.add_(F.linear(h, B))
                return out
            for adapter, idx, scales, uniform in data:
                layer = adapter.layers.get(name)
                if layer is None:
                    continue
                xa = x if idx is None else x.index_select(0, idx)
                h = F.conv2d(xa, layer.A, None, module.stride, module.padding) if conv else F.linear(xa, layer.A)
                if scales is not None:
                    h = h * scales.view(-1, *([1] * (h.dim() - 1)))
                d = F.conv2d(h, layer.B) if conv else F.linear(h, layer.B)
                alpha = layer.scale * (1.0 if uniform is None else uniform)
                if idx is None:
                    out.add_(d, alpha=alpha)
                else:
                    out.index_add_(0, idx, d, alpha=alpha)
            return out

        return hook


def merge(model: torch.nn.Module, adapters_with_scales: Sequence[tuple[LoraAdapter, float]]) -> None:
    TorchLora.of(model).merge(adapters_with_scales)


def unmerge(model: torch.nn.Module) -> None:
    TorchLora.of(model).unmerge()


def lora_rows(model: torch.nn.Module, plan: LoraPlan, mode: str = "auto"):
    """Context manager: the model's calls inside apply `plan` per row (unmerged; modes: TorchLora.rows)."""
    return TorchLora.of(model).rows(plan, mode)
