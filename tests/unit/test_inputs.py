"""Entry-input validation, field by field (pure: no server)."""

from __future__ import annotations

import numpy as np
import pytest

from tessera.client import request_arrays
from tessera.errors import InvalidInputError
from tessera.inputs import Limits, parse_request

LIMITS = Limits(min_size=64, max_size=512, size_multiple=16, max_steps=200)


def _ok(**kw):
    base = dict(prompt="a red circle", height=128, width=192, steps=10, guidance_scale=5.0, seed=7)
    base.update(kw)
    return request_arrays(**base)


def test_inputs_valid_request_parses_every_field():
    arrays = _ok(negative_prompt="blurry", slo_ms=1500)
    (p,) = parse_request(arrays, LIMITS, count_tokens=lambda s: len(s.split()) + 2)
    assert (p.prompt, p.negative_prompt, p.height, p.width, p.num_steps, p.seed, p.slo_ms) == (
        "a red circle", "blurry", 128, 192, 10, 7, 1500,
    )
    assert p.guidance_scale == pytest.approx(5.0) and p.do_cfg


def test_inputs_batch_gives_one_params_per_item():
    arrays = request_arrays(["a", "b", "c"], 64, 64, 2, 1.0, [1, 2, 3])
    items = parse_request(arrays, LIMITS)
    assert [p.seed for p in items] == [1, 2, 3] and not items[0].do_cfg


@pytest.mark.parametrize(
    "field, change, words",
    [
        ("height", dict(height=32), "allowed [64, 512]"),
        ("height", dict(height=1024), "allowed [64, 512]"),
        ("height", dict(height=100), "multiple of 16"),
        ("width", dict(width=130), "multiple of 16"),
        ("steps", dict(steps=0), "[1, 200]"),
        ("steps", dict(steps=201), "[1, 200]"),
        ("guidance_scale", dict(guidance_scale=-1.0), "[0.0, 30.0]"),
        ("guidance_scale", dict(guidance_scale=float("nan")), "[0.0, 30.0]"),
        ("prompt", dict(prompt=""), "empty"),
        ("prompt", dict(prompt="   "), "empty"),
        ("prompt", dict(prompt="\x00"), "no visible characters"),
        ("prompt", dict(prompt="\u200b\t\u200d"), "no visible characters"),
        ("prompt", dict(prompt="x" * 5000), "at most 4096"),
        ("seed", dict(seed=-1), "[0, 9223372036854775807]"),
        ("slo_ms", dict(slo_ms=0), "[1, 3600000]"),
    ],
)
def test_inputs_bad_value_names_field_and_range(field, change, words):
    with pytest.raises(InvalidInputError) as e:
        parse_request(_ok(**change), LIMITS)
    assert e.value.field == field
    assert str(e.value).startswith(f"{field}: ") and words in str(e.value)


def test_inputs_too_many_tokens_is_refused_not_truncated():
    with pytest.raises(InvalidInputError, match=r"^prompt: too long; allowed at most 77 tokens, got 80 tokens"):
        parse_request(_ok(), LIMITS, count_tokens=lambda s: 80 if s else 2)


def test_inputs_invalid_utf8():
    arrays = _ok()
    arrays["prompt"] = np.array([[b"\xff\xfe"]], dtype=np.object_)
    with pytest.raises(InvalidInputError, match="^prompt: not valid UTF-8"):
        parse_request(arrays, LIMITS)


def test_inputs_missing_wrong_dtype_wrong_shape_batch_mismatch():
    arrays = _ok()
    del arrays["seed"]
    with pytest.raises(InvalidInputError, match="^seed: missing"):
        parse_request(arrays, LIMITS)
    arrays = _ok()
    arrays["height"] = arrays["height"].astype(np.float32)
    with pytest.raises(InvalidInputError, match="^height: wrong data type; allowed INT32, got FLOAT32"):
        parse_request(arrays, LIMITS)
    arrays = _ok()
    arrays["steps"] = np.array([[10, 10]], dtype=np.int32)
    with pytest.raises(InvalidInputError, match=r"^steps: wrong shape"):
        parse_request(arrays, LIMITS)
    arrays = request_arrays(["a", "b"], 64, 64, 2)
    arrays["height"] = arrays["height"][:1]
    with pytest.raises(InvalidInputError, match="^height: batch size differs"):
        parse_request(arrays, LIMITS)


def test_inputs_one_size_per_request():
    arrays = request_arrays(["a", "b"], 64, 64, 2)
    arrays["height"] = np.array([[64], [128]], dtype=np.int32)
    with pytest.raises(InvalidInputError, match="^height: items of one request must share one size"):
        parse_request(arrays, LIMITS)


def test_inputs_unknown_input_is_named():
    arrays = _ok()
    arrays["strength"] = np.array([[0.5]], dtype=np.float32)
    with pytest.raises(InvalidInputError, match="^strength: unknown input"):
        parse_request(arrays, LIMITS)


def test_inputs_early_exit_is_an_optional_bool_per_item():
    (p,) = parse_request(_ok(early_exit=False), LIMITS)
    assert p.early_exit is False
    assert parse_request(_ok(), LIMITS)[0].early_exit is None  # absent: the engine's default
    arrays = _ok()
    arrays["early_exit"] = np.array([[1]], dtype=np.int32)
    with pytest.raises(InvalidInputError, match=r"^early_exit: wrong data type; allowed BOOL, got INT32"):
        parse_request(arrays, LIMITS)


def test_inputs_lora_parsed_against_the_served_adapters():
    from tessera.lora_spec import NO_LORA, LoraSet

    (p,) = parse_request(_ok(lora="stripes:0.5, dark"), LIMITS, adapters={"stripes", "dark", "outline"})
    assert p.lora == LoraSet.of([("dark", 1.0), ("stripes", 0.5)])
    (p,) = parse_request(_ok(), LIMITS)
    assert p.lora == NO_LORA
    with pytest.raises(InvalidInputError) as e:  # a model serving no adapters says so, naming the field
        parse_request(_ok(lora="stripes"), LIMITS)
    assert str(e.value).startswith("lora: unknown adapter; allowed none: this model serves no adapters")
    with pytest.raises(InvalidInputError) as e:
        parse_request(_ok(lora="stripse"), LIMITS, adapters={"stripes", "dark"})
    assert e.value.field == "lora" and "stripes" in str(e.value)
    (p,) = parse_request(_ok(lora="anything:2"), LIMITS, adapters=None)  # the facade: names are the engine's
    assert p.lora.names == ("anything",)
    with pytest.raises(InvalidInputError) as e:  # syntax is still checked there
        parse_request(_ok(lora="a:9"), LIMITS, adapters=None)
    assert e.value.field == "lora"
