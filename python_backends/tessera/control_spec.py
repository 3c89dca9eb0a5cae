"""The per-request ControlNet inputs (`controlnet`, `control_scale`, `control_image`) -> a frozen
`ControlSpec` (issue 15). Pure; every error names the input and what is allowed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError

MAX_CONTROLNETS = 3
SCALE_RANGE = (0.0, 2.0)


@dataclass(frozen=True, slots=True, eq=False)
class ControlSpec:
    """A request's ControlNets: names in the order given, a scale each, and one condition map each
    (uint8 [K, H, W, 3] at the image's size)."""

    names: tuple[str, ...]
    scales: tuple[float, ...]
    maps: np.ndarray

    def condition(self, k: int) -> np.ndarray:
        """Map k as the ControlNet's condition: float32 [1, 3, H, W] in [0, 1] (diffusers' control image
        processor: no normalisation to [-1, 1])."""
        return np.ascontiguousarray(self.maps[k].transpose(2, 0, 1)[None].astype(np.float32) / 255.0)


def parse_control(names: Sequence[str] | None, scales: Sequence[float] | None, image: np.ndarray | None,
                  height: int, width: int, served: frozenset[str] | None = None) -> ControlSpec | None:
    """The request's `controlnet`, `control_scale` and `control_image` inputs as a ControlSpec (None: no
    ControlNet). Every error names the input and what is allowed. `served`: the names this engine serves
    (None: names are checked later, by the engine)."""
    names = tuple(n.strip() for n in names or () if n.strip())
    if not names:
        if image is not None or scales is not None:
            raise InvalidInputError("controlnet", "missing: control_image or control_scale given without it",
                                    f"1 to {MAX_CONTROLNETS} ControlNet names with them")
        return None
    if len(names) > MAX_CONTROLNETS or len(set(names)) != len(names):
        raise InvalidInputError("controlnet", "too many or repeated names", f"1 to {MAX_CONTROLNETS} distinct names",
                                list(names))
    if served is not None:
        unknown = [n for n in names if n not in served]
        if unknown:
            allowed = ", ".join(sorted(served)) or "none (this engine serves no ControlNet)"
            raise InvalidInputError("controlnet", "unknown ControlNet", allowed, unknown[0])
    k = len(names)
    if scales is None:
        scales = (1.0,) * k
    scales = tuple(float(s) for s in np.asarray(scales, dtype=np.float64).reshape(-1))
    if len(scales) == 1 and k > 1:
        scales = scales * k
    if len(scales) != k:
        raise InvalidInputError("control_scale", "wrong count", f"one value, or one per controlnet ({k})",
                                f"{len(scales)} values")
    lo, hi = SCALE_RANGE
    for s in scales:
        if not lo <= s <= hi:  # NaN fails too
            raise InvalidInputError("control_scale", "out of range", f"[{lo}, {hi}]", s)
    return ControlSpec(names, scales, control_maps(image, k, height, width))


def control_maps(image: np.ndarray | None, k: int, height: int, width: int) -> np.ndarray:
    """`control_image` as K RGB maps uint8 [K, H, W, 3]. Allowed: [H, W] or [H, W, 1] (grey) or [H, W, 3]:
    one map for every ControlNet; [H, W, 3K]: map k in channels 3k..3k+2."""
    if image is None:
        raise InvalidInputError("control_image", "missing", "UINT8 [height, width], [height, width, 3] or "
                                "[height, width, 3 x controlnets] with controlnet")
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InvalidInputError("control_image", "wrong data type", "UINT8", str(image.dtype).upper())
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[:2] != (height, width):
        raise InvalidInputError("control_image", "wrong shape", f"the image's size [{height}, {width}] (then "
                                "channels)", list(image.shape))
    c = image.shape[2]
    if c == 1:
        maps = np.repeat(image, 3, axis=2)[None].repeat(k, axis=0)
    elif c == 3:
        maps = image[None].repeat(k, axis=0)
    elif c == 3 * k:
        maps = image.reshape(height, width, k, 3).transpose(2, 0, 1, 3)
    else:
        raise InvalidInputError("control_image", "wrong channel count", f"1, 3 or 3 x controlnets ({3 * k})", c)
    return np.ascontiguousarray(maps)
