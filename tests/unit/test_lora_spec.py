"""The per-request `lora` input: parsing, canonical order, and every refusal naming the field and range."""

from __future__ import annotations

import pytest

from tessera.errors import InvalidInputError, Status
from tessera.lora_spec import NO_LORA, LoraSet, known_adapters, parse_lora

KNOWN = frozenset({"outline", "stripes", "dark", "pastel", "neon"})


def refusal(entries, known=KNOWN, **kw) -> str:
    with pytest.raises(InvalidInputError) as info:
        parse_lora(entries, known, **kw)
    assert info.value.field == "lora"
    assert info.value.status is Status.INVALID_ARG
    return str(info.value)


def test_lora_spec_parses_names_and_scales():
    s = parse_lora([b"stripes:0.5", b"outline"], KNOWN)
    assert s.entries == (("outline", 1.0), ("stripes", 0.5))
    assert s.names == ("outline", "stripes")
    assert str(s) == "outline:1,stripes:0.5"
    assert parse_lora(["dark:-1.25"], KNOWN).entries == (("dark", -1.25),)


def test_lora_spec_is_canonical_and_hashable():
    a = parse_lora([b"stripes:0.5", b"outline:1"], KNOWN)
    b = parse_lora([b"outline", b"stripes:.50"], KNOWN)
    assert a == b and hash(a) == hash(b)
    assert len({a, b, parse_lora([b"outline"], KNOWN)}) == 2
    assert a != parse_lora([b"outline", b"stripes:0.6"], KNOWN)


def test_lora_spec_empty_padding_comma_lists_and_zero_scale():
    assert parse_lora(None, KNOWN) is NO_LORA
    assert parse_lora([], KNOWN) == NO_LORA and not parse_lora([b"", b" "], KNOWN)
    assert parse_lora([b"outline, stripes:2", b""], KNOWN).names == ("outline", "stripes")
    # an adapter at scale 0 changes nothing: dropped, so the request shares steps with plain ones
    assert parse_lora([b"outline:0", b"dark:-0.0"], KNOWN) == NO_LORA
    assert str(NO_LORA) == "-"


def test_lora_spec_too_many():
    msg = refusal([b"outline", b"stripes", b"dark", b"pastel", b"neon"])
    assert msg == "lora: too many adapters; allowed at most 4 entries `name` or `name:scale`, got 5"
    assert "too many" in refusal([b"outline,stripes,dark", b"pastel,neon"])  # counted after splitting
    assert parse_lora([b"outline", b"stripes"], KNOWN, max_entries=2).names == ("outline", "stripes")
    assert "at most 1 entries" in refusal([b"outline", b"stripes"], max_entries=1)


@pytest.mark.parametrize("entry, problem", [
    (b"outline:abc", "bad scale for adapter 'outline'"),
    (b"outline:", "bad scale for adapter 'outline'"),
    (b"outline:nan", "scale out of range for adapter 'outline'"),
    (b"outline:inf", "scale out of range for adapter 'outline'"),
    (b"outline:4.5", "scale out of range for adapter 'outline'"),
    (b"outline:-4.01", "scale out of range for adapter 'outline'"),
])
def test_lora_spec_bad_scale(entry, problem):
    msg = refusal([entry])
    assert msg.startswith(f"lora: {problem}; allowed a finite number in [-4, 4], got ")


def test_lora_spec_scale_bounds_inclusive_and_configurable():
    assert parse_lora([b"outline:4", b"dark:-4"], KNOWN).entries == (("dark", -4.0), ("outline", 4.0))
    assert "[-2, 2]" in refusal([b"outline:3"], max_abs_scale=2.0)


def test_lora_spec_unknown_lists_known_adapters():
    msg = refusal([b"stripse"])
    assert msg.startswith("lora: unknown adapter; allowed one of the known adapters: stripes, ")
    assert msg.endswith(", got stripse")
    for name in KNOWN:
        assert name in msg
    assert "more" not in msg


def test_lora_spec_unknown_with_many_adapters_is_truncated():
    many = frozenset(f"style{i:04d}" for i in range(7000))
    msg = refusal([b"style0042x"], known=many)
    assert msg.count("style") == 12 + 1  # twelve listed and the name asked for
    assert "(and 6988 more)" in msg
    assert "style0042," in msg  # the closest names are listed first
    assert len(msg) < 400


def test_lora_spec_no_adapters_known():
    assert "serves no adapters" in refusal([b"outline"], known=frozenset())
    assert known_adapters([]) == "none: this model serves no adapters (engine setting lora_dir)"


def test_lora_spec_duplicates_empty_names_and_bytes():
    assert refusal([b"outline", b"outline:0.5"]) == (
        "lora: adapter listed twice; allowed each adapter at most once, got outline")
    assert refusal([b":0.5"]).startswith("lora: empty adapter name")
    assert refusal([b"\xff\xfe"]).startswith("lora: not valid UTF-8")
    assert refusal([3]).startswith("lora: wrong entry type")


def test_lora_spec_order_of_checks():
    # the count comes first, then each entry in order
    assert "too many" in refusal([b"bad:x", b"b", b"c", b"d", b"e"])
    assert "bad scale" in refusal([b"outline:x", b"nosuch"])
    assert "unknown adapter" in refusal([b"nosuch", b"outline:x"])


def test_lora_set_of_refuses_a_name_twice():
    with pytest.raises(ValueError):
        LoraSet.of([("a", 1.0), ("a", 2.0)])
