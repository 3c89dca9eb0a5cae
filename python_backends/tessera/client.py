"""tritonclient helpers for the entry model: build inputs, infer over HTTP or gRPC. Used by the CLI,
the demo, the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .wire import ENTRY_INPUTS, ENTRY_MODEL, OUTPUT_IMAGE, OUTPUT_STEPS, client_datatype

PROTOCOLS = ("http", "grpc")
_SPECS = {s.name: s for s in ENTRY_INPUTS}


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as m
    elif protocol == "grpc":
        import tritonclient.grpc as m
    else:
        raise ValueError(f"protocol: unknown protocol; allowed {', '.join(PROTOCOLS)}, got {protocol!r}")
    return m


def request_arrays(
    prompt: str | list[str],
    height: int,
    width: int,
    steps: int,
    guidance_scale: float = 5.0,
    seed: int | list[int] = 0,
    negative_prompt: str | list[str] | None = None,
    slo_ms: int | None = None,
    early_exit: bool | None = None,
    lora: str | None = None,
    controlnet: str | None = None,
    control_image: np.ndarray | None = None,
    control_scale: float | list[float] | None = None,
) -> dict[str, np.ndarray]:
    """The entry model's input tensors for one request ([batch, 1] each; ControlNets: `controlnet` names
    comma-separated, `control_image` uint8 [H, W], [H, W, 3] or [H, W, 3K], `control_scale` one or K)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    n = len(prompts)
    seeds = [seed] * n if isinstance(seed, int) else list(seed)

    def col(values, dtype):
        return np.asarray(values, dtype=dtype).reshape(n, 1)

    arrays = {
        "prompt": col([p.encode() for p in prompts], np.object_),
        "height": col([height] * n, np.int32),
        "width": col([width] * n, np.int32),
        "steps": col([steps] * n, np.int32),
        "guidance_scale": col([guidance_scale] * n, np.float32),
        "seed": col(seeds, np.int64),
    }
    if negative_prompt is not None:
        negs = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
        arrays["negative_prompt"] = col([s.encode() for s in negs], np.object_)
    if slo_ms is not None:
        arrays["slo_ms"] = col([slo_ms] * n, np.int32)
    if early_exit is not None:
        arrays["early_exit"] = col([early_exit] * n, np.bool_)
    if lora is not None:  # "name" or "name:scale", comma-separated
        arrays["lora"] = col([lora.encode()] * n, np.object_)
    if controlnet is not None:
        arrays["controlnet"] = col([controlnet.encode()] * n, np.object_)
    if control_image is not None:
        arrays["control_image"] = np.repeat(np.asarray(control_image, np.uint8).reshape(
            (1, *control_image.shape[:2], -1)), n, axis=0)
    if control_scale is not None:
        arrays["control_scale"] = np.tile(np.asarray(control_scale, np.float32).reshape(1, -1), (n, 1))
    return arrays


def infer_inputs(protocol: str, arrays: Mapping[str, np.ndarray], declared_types: bool = True):
    """tritonclient InferInput objects. With declared_types=False each tensor is sent with its numpy
    dtype, even where the model declares another (tests send wrong ones)."""
    m = _module(protocol)
    inputs = []
    for name, array in arrays.items():
        spec = _SPECS.get(name)
        dtype = client_datatype(spec) if spec and declared_types else _np_datatype(array)
        inp = m.InferInput(name, list(array.shape), dtype)
        inp.set_data_from_numpy(array)
        inputs.append(inp)
    return inputs


def _np_datatype(array: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(array.dtype)


def make_client(protocol: str, url: str, **kw):
    m = _module(protocol)
    return m.InferenceServerClient(url=url, **kw)


def infer_image(
    client, protocol: str, arrays: Mapping[str, np.ndarray], model: str = ENTRY_MODEL, timeout_s: float | None = None
) -> np.ndarray:
    """Send one request and return the image tensor [batch, H, W, 3] uint8 (raises InferenceServerException)."""
    return infer(client, protocol, arrays, model, timeout_s)[0]


def infer(
    client, protocol: str, arrays: Mapping[str, np.ndarray], model: str = ENTRY_MODEL, timeout_s: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Send one request: (image [batch, H, W, 3] uint8, steps run [batch] int32)."""
    m = _module(protocol)
    outputs = [m.InferRequestedOutput(OUTPUT_IMAGE), m.InferRequestedOutput(OUTPUT_STEPS)]
    kw = {}
    if timeout_s is not None and protocol == "grpc":
        kw["client_timeout"] = timeout_s
    result = client.infer(model, infer_inputs(protocol, arrays), outputs=outputs, **kw)
    return result.as_numpy(OUTPUT_IMAGE), result.as_numpy(OUTPUT_STEPS).reshape(-1)
