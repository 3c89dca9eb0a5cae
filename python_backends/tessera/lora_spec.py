"""The per-request `lora` input: up to four `name` or `name:scale` entries -> a frozen, canonical `LoraSet`.

Pure (issue 14). Requests whose sets are equal (same adapters, same scales, any order) compare and hash equal,
so the engine can run them in one merged step. Checks run count, text, syntax, scale, name, duplicates, in
that order, and stop at the first problem; every error names the field `lora` and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from .errors import InvalidInputError

FIELD = "lora"
MAX_ENTRIES = 4  # adapters per request
MAX_ABS_SCALE = 4.0  # scales are finite numbers in [-MAX_ABS_SCALE, MAX_ABS_SCALE]
DEFAULT_SCALE = 1.0  # `name` alone means `name:1`
MAX_NAME_CHARS = 128
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""Adapter names: what the registry accepts as a file or directory stem (no ':' or ',', the separators,
no '/', no leading dot)."""
MAX_LISTED = 12  # known adapters listed in an error message


def is_adapter_name(name: str) -> bool:
    """True when `name` may name an adapter (NAME_PATTERN, at most MAX_NAME_CHARS)."""
    return len(name) <= MAX_NAME_CHARS and NAME_PATTERN.fullmatch(name) is not None


@dataclass(frozen=True, slots=True)
class LoraSet:
    """The adapters of one request: (name, scale) pairs sorted by name, each name once, no zero scale.

    Hashable; equal sets share merged steps. The empty set means "no adapter" (`bool(s)` is False)."""

    entries: tuple[tuple[str, float], ...] = ()

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, float]]) -> LoraSet:
        """The canonical set of already-validated pairs: sorted by name, scales as float, zero scales dropped
        (an adapter at scale 0 changes nothing), -0.0 never kept. A name twice is a programming error."""
        entries = tuple(sorted((name, float(scale)) for name, scale in pairs if scale != 0))
        names = [n for n, _ in entries]
        if len(set(names)) != len(names):
            raise ValueError(f"LoraSet: a name appears twice in {names}")
        return cls(entries)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __str__(self) -> str:
        """`a:0.5,b:1` (canonical; what logs and metrics labels show); `-` for the empty set."""
        return ",".join(f"{n}:{s:g}" for n, s in self.entries) or "-"


NO_LORA = LoraSet()


def parse_lora(entries: Iterable[bytes | str] | None, known: Collection[str] | None, *,
               max_entries: int = MAX_ENTRIES, max_abs_scale: float = MAX_ABS_SCALE) -> LoraSet:
    """One request's `lora` entries (Triton BYTES values or str) -> its LoraSet.

    Each entry is `name` (scale 1) or `name:scale`; an entry may also hold several, comma-separated
    (`a:0.5,b`: the form the CLI and the OpenAI front take). Empty entries (padding of a [batch, N] tensor)
    are skipped; None or no entries gives NO_LORA. `known` is the servable adapter names (the registry's
    `names()`; None: names are checked where the adapters are, e.g. the engine behind a facade). Raises InvalidInputError(field `lora`) naming the allowed range and, for an unknown name,
    the known adapters (closest first, at most MAX_LISTED)."""
    if entries is None:
        return NO_LORA
    items = [item for raw in entries for item in _split(raw)]
    if len(items) > max_entries:
        allowed = f"at most {max_entries} entries `name` or `name:scale`"
        raise InvalidInputError(FIELD, "too many adapters", allowed, len(items))
    pairs = [_entry(item, known, max_abs_scale) for item in items]
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise InvalidInputError(FIELD, "adapter listed twice", "each adapter at most once", name)
        seen.add(name)
    return LoraSet.of(pairs)


def _split(raw: bytes | str) -> list[str]:
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInputError(FIELD, "not valid UTF-8", "UTF-8 entries `name` or `name:scale`",
                                    f"invalid byte at {e.start}") from e
    elif not isinstance(raw, str):
        raise InvalidInputError(FIELD, "wrong entry type", "BYTES entries `name` or `name:scale`",
                                type(raw).__name__)
    return [part.strip() for part in raw.split(",") if part.strip()]


def _entry(item: str, known: Collection[str] | None, max_abs_scale: float) -> tuple[str, float]:
    name, sep, scale_text = item.partition(":")
    name = name.strip()
    if not name:
        raise InvalidInputError(FIELD, "empty adapter name", "entries `name` or `name:scale`", item)
    scale = DEFAULT_SCALE
    allowed_scale = f"a finite number in [{-max_abs_scale:g}, {max_abs_scale:g}]"
    if sep:
        try:
            scale = float(scale_text.strip())
        except ValueError:
            raise InvalidInputError(FIELD, f"bad scale for adapter {name!r}", allowed_scale,
                                    scale_text) from None
        if not math.isfinite(scale) or abs(scale) > max_abs_scale:
            raise InvalidInputError(FIELD, f"scale out of range for adapter {name!r}", allowed_scale,
                                    scale_text.strip())
    if known is not None and name not in known:
        raise InvalidInputError(FIELD, "unknown adapter", known_adapters(known, name), name)
    return name, scale


def known_adapters(known: Collection[str], asked: str = "", limit: int = MAX_LISTED) -> str:
    """The `allowed` text of an unknown-adapter error: the names closest to `asked` first, then the rest
    in order, at most `limit`, with how many were left out."""
    if not known:
        return "none: this model serves no adapters (engine setting lora_dir)"
    ordered = sorted(known)
    close = difflib.get_close_matches(asked, ordered, n=limit, cutoff=0.6) if asked else []
    shown = close + [n for n in ordered if n not in close][: limit - len(close)]
    more = len(ordered) - len(shown)
    return "one of the known adapters: " + ", ".join(shown) + (f" (and {more} more)" if more else "")
