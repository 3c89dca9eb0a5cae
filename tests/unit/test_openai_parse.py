"""The OpenAI front's pure parts: body validation, engine-error mapping, partial-image marks."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.errors import InvalidInputError, OverloadedError, RefusedError, ShutdownError, wire_message
from tessera.openai_front import (
    ApiError, FrontDefaults, api_error_of, parse_generation, partial_marks, upscale,
)


def parse(**body):
    return parse_generation({"prompt": "a red circle at top left"} | body, FrontDefaults((128, 64), 9, 4.0),
                            seed_source=lambda: 77)


def test_defaults_and_extensions():
    r = parse()
    assert (r.width, r.height, r.steps, r.guidance_scale, r.seed, r.n, r.stream) == (128, 64, 9, 4.0, 77, 1, False)
    r = parse(size="192x128", n=3, seed=5, num_inference_steps=30, guidance_scale=7, negative_prompt="blue",
              slo_ms=900, early_exit=True, stream=True, partial_images=2, quality="auto", user="u")
    assert (r.width, r.height, r.n, r.seed, r.steps, r.guidance_scale) == (192, 128, 3, 5, 30, 7.0)
    assert (r.negative_prompt, r.slo_ms, r.early_exit, r.partial_images, r.size) == ("blue", 900, True, 2, "192x128")
    assert parse(lora=["a:0.5", "b"]).lora == "a:0.5,b" and parse(lora="a").lora == "a" and parse().lora is None


@pytest.mark.parametrize("body,param", [
    ({"n": True}, "n"), ({"n": 2.0}, "n"), ({"size": "64"}, "size"), ({"size": "64x64x64"}, "size"),
    ({"stream": "yes"}, "stream"), ({"partial_images": 4, "stream": True}, "partial_images"),
    ({"guidance_scale": float("nan")}, "guidance_scale"), ({"negative_prompt": 3}, "negative_prompt"),
    ({"early_exit": 1}, "early_exit"), ({"slo_ms": 1.5}, "slo_ms"), ({"background": "transparent"}, "background"),
    ({"user": 5}, "user"), ({"lora": 5}, "lora"), ({"lora": ["a", 2]}, "lora"), ({"model": 3}, "model"), ({"seed": 2**63}, "seed"),
    ({"controlnet": 3}, "controlnet"), ({"control_image": "not base64!"}, "control_image"),
    ({"control_image": [1]}, "control_image"), ({"control_scale": "1"}, "control_scale"),
])
def test_invalid_names_the_parameter(body, param):
    with pytest.raises(ApiError) as e:
        parse(**body)
    assert e.value.status == 400 and e.value.param == param and str(e.value).startswith(param + ":")


def _png(array: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_control_inputs_decode_and_stack():
    grey = np.zeros((64, 128), np.uint8)
    grey[5, 7] = 200
    r = parse(controlnet="box", control_image=_png(grey), control_scale=0.5)
    assert r.controlnet == "box" and r.control_image.shape == (64, 128, 1) and r.control_image[5, 7, 0] == 200
    assert r.control_scale == (0.5,)
    rgb = np.zeros((64, 128, 3), np.uint8)
    r = parse(controlnet=["box", "silhouette"], control_image=[_png(grey), _png(rgb)], control_scale=[1, 0.25])
    assert r.controlnet == "box,silhouette" and r.control_image.shape == (64, 128, 6) and r.control_scale == (1.0, 0.25)
    assert r.control_image[5, 7].tolist() == [200, 200, 200, 0, 0, 0]


def test_body_must_be_an_object():
    with pytest.raises(ApiError) as e:
        parse_generation(["prompt"])
    assert e.value.status == 400 and e.value.param is None


@pytest.mark.parametrize("error,status,param", [
    (InvalidInputError("height", "out of range", "[64, 512]", 4096), 400, "size"),
    (InvalidInputError("steps", "out of range", "[1, 200]", 0), 400, "num_inference_steps"),
    (InvalidInputError("prompt", "no visible characters"), 400, "prompt"),
    (RefusedError("deadline cannot be met"), 429, "slo_ms"),
    (OverloadedError("engine: overloaded"), 429, None),
    (ShutdownError("engine: stopping"), 503, None),
    (RuntimeError("boom"), 500, None),
])
def test_engine_errors_map_to_openai_status_and_parameter(error, status, param):
    e = api_error_of(wire_message(error, "3"))
    assert (e.status, e.param) == (status, param)
    assert "[tessera:" not in str(e) and (param is None or str(e).startswith(param + ":"))


def test_untagged_errors_are_unavailable():
    assert api_error_of("Request for unknown model: 'x' is not found").status == 503


def test_partial_marks_spread_and_exclude_the_last_step():
    assert partial_marks(8, 3) == [2, 4, 6]
    assert partial_marks(20, 1) == [10]
    assert partial_marks(2, 3) == [1]  # fewer steps than partial images: what fits
    assert partial_marks(1, 2) == []
    assert partial_marks(20, 0) == []


def test_upscale_nearest_to_the_requested_size():
    preview = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = upscale(preview, 16, 24)
    assert big.shape == (16, 24, 3)
    assert np.array_equal(big[::8, ::8], preview) and np.array_equal(big[7, 7], preview[0, 0])
