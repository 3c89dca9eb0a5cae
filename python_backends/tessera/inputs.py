"""Raw numpy tensors (as Triton hands them over) -> validated GenerationParams.

Pure and unit-tested per field. Checks run dtype, shape, batch size, range, NaN/inf, empty string, in
that order, and stop at the first problem; each error names the field and what is allowed.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass

import numpy as np

from .errors import InvalidInputError
from .control_spec import parse_control
from .lora_spec import NO_LORA, parse_lora
from .request import GenerationParams
from .wire import ENTRY_INPUTS, ENTRY_MAX_BATCH, InputSpec

INT64_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """What one served pipeline accepts. Written by the exporter into the entry model's manifest."""

    min_size: int = 64  # pixels, inclusive, for height and width
    max_size: int = 512  # pixels, inclusive
    size_multiple: int = 16  # pixels: VAE factor x denoiser downsampling (or patch size)
    max_steps: int = 200
    min_guidance: float = 0.0
    max_guidance: float = 30.0
    max_prompt_bytes: int = 4096
    max_prompt_tokens: int = 77  # including the start and end tokens
    max_slo_ms: int = 3_600_000
    max_batch: int = ENTRY_MAX_BATCH

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Limits:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _dtype_name(dtype: np.dtype) -> str:
    return "BYTES" if dtype == np.object_ or dtype.kind in "SU" else str(np.dtype(dtype)).upper()


def _check_tensor(spec: InputSpec, value: np.ndarray, batch: int | None) -> int:
    want = np.dtype(spec.dtype)
    got = value.dtype
    if want == np.object_:
        ok = got == np.object_ or got.kind in "SU"
    else:
        ok = got == want
    if not ok:
        raise InvalidInputError(spec.name, "wrong data type", f"{_dtype_name(want)}", _dtype_name(got))
    if value.ndim != 1 + len(spec.dims) or any(d not in (-1, v) for d, v in zip(spec.dims, value.shape[1:])):
        shape = ", ".join("N" if d == -1 else str(d) for d in spec.dims)
        raise InvalidInputError(spec.name, "wrong shape", f"[batch, {shape}]", list(value.shape))
    n = value.shape[0]
    if not 1 <= n <= ENTRY_MAX_BATCH:
        raise InvalidInputError(spec.name, "batch size out of range", f"[1, {ENTRY_MAX_BATCH}]", n)
    if batch is not None and n != batch:
        raise InvalidInputError(spec.name, "batch size differs from the other inputs", f"{batch}", n)
    return n


def _text(field: str, raw: object, limits: Limits, allow_empty: bool) -> str:
    data = raw if isinstance(raw, bytes) else str(raw).encode()
    if len(data) > limits.max_prompt_bytes:
        raise InvalidInputError(field, "too long", f"at most {limits.max_prompt_bytes} UTF-8 bytes", f"{len(data)} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(field, "not valid UTF-8", "UTF-8 text", f"invalid byte at {e.start}") from e
    if not allow_empty and not text.strip():
        raise InvalidInputError(field, "empty", "a non-empty text", "an empty string")
    if not allow_empty and not any(unicodedata.category(ch)[0] not in "CZ" for ch in text):
        # only whitespace, control or format characters (NUL, zero-width spaces, ...): nothing to draw
        raise InvalidInputError(field, "no visible characters", "text with at least one visible character",
                                " ".join(f"U+{ord(ch):04X}" for ch in text[:8]))
    return text


def _int_in(field: str, raw: object, lo: int, hi: int, multiple: int = 1) -> int:
    v = int(raw)
    if not lo <= v <= hi:
        extra = f", a multiple of {multiple}" if multiple > 1 else ""
        raise InvalidInputError(field, "out of range", f"[{lo}, {hi}]{extra}", v)
    if v % multiple:
        raise InvalidInputError(field, f"not a multiple of {multiple}", f"multiples of {multiple} in [{lo}, {hi}]", v)
    return v


def _control(values: Mapping[str, np.ndarray], i: int, height: int, width: int,
             served: Collection[str] | None):
    names = None
    if "controlnet" in values:
        raw = values["controlnet"][i]
        names = _text("controlnet", raw, Limits(), allow_empty=True).split(",")
    scales = values["control_scale"][i] if "control_scale" in values else None
    image = values["control_image"][i] if "control_image" in values else None
    return parse_control(names, scales, image, height, width, None if served is None else frozenset(served))


def parse_request(
    tensors: Mapping[str, np.ndarray | None],
    limits: Limits,
    count_tokens: Callable[[str], int] | None = None,
    adapters: Collection[str] | None = (),
    controlnets: Collection[str] | None = (),
) -> list[GenerationParams]:
    """Validate one entry request ([batch, 1] tensors by input name) into one GenerationParams per item.

    `count_tokens(text)` returns the token count including start/end tokens; if given, prompts longer
    than `limits.max_prompt_tokens` are refused (diffusers would silently truncate them). `adapters` are
    the LoRA names the model serves (none by default), `controlnets` its ControlNet names; None leaves names
    to the engine (the facade).
    """
    unknown = sorted(set(tensors) - {s.name for s in ENTRY_INPUTS})
    if unknown:
        raise InvalidInputError(unknown[0], "unknown input", ", ".join(s.name for s in ENTRY_INPUTS), unknown[0])
    batch: int | None = None
    values: dict[str, np.ndarray] = {}
    for spec in ENTRY_INPUTS:
        value = tensors.get(spec.name)
        if value is None:
            if spec.optional:
                continue
            raise InvalidInputError(spec.name, "missing", "a [batch, 1] tensor of " + _dtype_name(np.dtype(spec.dtype)))
        value = np.asarray(value)
        batch = _check_tensor(spec, value, batch)
        values[spec.name] = value.reshape(-1) if spec.dims == (1,) else value

    size_lo = max(limits.min_size, limits.size_multiple)
    out: list[GenerationParams] = []
    for i in range(batch or 0):
        prompt = _text("prompt", values["prompt"][i], limits, allow_empty=False)
        negative = ""
        if "negative_prompt" in values:
            negative = _text("negative_prompt", values["negative_prompt"][i], limits, allow_empty=True)
        if count_tokens is not None:
            for field, text in (("prompt", prompt), ("negative_prompt", negative)):
                n = count_tokens(text)
                if n > limits.max_prompt_tokens:
                    raise InvalidInputError(
                        field, "too long", f"at most {limits.max_prompt_tokens} tokens", f"{n} tokens"
                    )
        height = _int_in("height", values["height"][i], size_lo, limits.max_size, limits.size_multiple)
        width = _int_in("width", values["width"][i], size_lo, limits.max_size, limits.size_multiple)
        steps = _int_in("steps", values["steps"][i], 1, limits.max_steps)
        guidance = float(values["guidance_scale"][i])
        if not math.isfinite(guidance) or not limits.min_guidance <= guidance <= limits.max_guidance:
            raise InvalidInputError(
                "guidance_scale", "out of range", f"[{limits.min_guidance}, {limits.max_guidance}]", guidance
            )
        seed = _int_in("seed", values["seed"][i], 0, INT64_MAX)
        slo_ms = None
        if "slo_ms" in values:
            slo_ms = _int_in("slo_ms", values["slo_ms"][i], 1, limits.max_slo_ms)
        early_exit = bool(values["early_exit"][i]) if "early_exit" in values else None
        lora = parse_lora([values["lora"][i]], adapters) if "lora" in values else NO_LORA
        control = _control(values, i, height, width, controlnets)
        if control is not None and lora:
            raise InvalidInputError("controlnet", "not served together with lora yet", "one of lora, controlnet",
                                    "both")
        out.append(GenerationParams(prompt, negative, height, width, steps, guidance, seed, slo_ms, early_exit,
                                    lora, control))
    sizes = {(p.height, p.width) for p in out}
    if len(sizes) > 1:
        raise InvalidInputError(
            "height", "items of one request must share one size (send one request per size)", "one size",
            sorted(sizes),
        )
    return out
