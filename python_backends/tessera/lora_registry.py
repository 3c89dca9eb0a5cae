"""The adapter directory (`lora_dir`): which LoRA adapters are servable, where their files are, and each
adapter's BAL step K from its offline profile.

Pure Python on the filesystem (issue 14; no torch). Adapters are diffusers/PEFT LoRA safetensors, in either
layout `load_lora_weights` reads:
  <lora_dir>/<name>.safetensors                       (profile: <lora_dir>/<name>.profile.json)
  <lora_dir>/<name>/pytorch_lora_weights.safetensors  (profile: <lora_dir>/<name>/profile.json)
The second is what `save_lora_weights(dir)` writes and `load_lora_weights(dir)` finds (diffusers 0.42
`LORA_WEIGHT_NAME_SAFE`, loaders/lora_base.py). When both exist for one name, the single file wins.

Adapters added while the server runs become servable without a restart: `names()` re-lists the directory
when its mtime, or that of one of its adapter subdirectories, changes (checked at most every
`poll_interval_s`). Write adapter files under another name and rename them into place
(`x.tmp` -> `x.safetensors`): a rename changes the directory's mtime, while bytes written into an already
listed file do not.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .lora_spec import is_adapter_name

log = logging.getLogger(__name__)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers LORA_WEIGHT_NAME_SAFE
SUFFIX = ".safetensors"
PROFILE_SUFFIX = ".profile.json"  # beside <name>.safetensors
PROFILE_NAME = "profile.json"  # inside <name>/
RACY_NS = 2_000_000_000
"""A directory whose mtime lies within this of a scan's start may change again within the same mtime tick
(coarse filesystem clocks: up to 2 s on FAT): such a scan is repeated at the next check (as git does)."""


class Layout(str, enum.Enum):
    FILE = "file"  # <name>.safetensors
    DIR = "dir"  # <name>/pytorch_lora_weights.safetensors


@dataclass(frozen=True, slots=True)
class Adapter:
    """One servable adapter as last listed."""

    name: str
    path: Path  # the safetensors weights
    layout: Layout

    @property
    def profile_path(self) -> Path:
        """Where `tessera lora-profile` writes this adapter's profile and `k_for` reads it."""
        if self.layout is Layout.DIR:
            return self.path.parent / PROFILE_NAME
        return self.path.with_name(self.name + PROFILE_SUFFIX)


@dataclass(frozen=True, slots=True)
class LoraProfile:
    """An adapter's offline profile: K (steps the request may run without the adapter) per step count.

    File: {"k_by_steps": {"50": 10, "20": 4}, ...}; other keys (similarity curves) are kept by the tool and
    ignored here."""

    k_by_steps: tuple[tuple[int, int], ...]  # (steps, K), sorted by steps, 0 <= K <= steps

    def k_for(self, steps: int) -> int:
        """K for a request of `steps` steps.

        A profiled step count gives its K. Otherwise the fraction K/steps is interpolated linearly between
        the nearest profiled step counts below and above (the nearest one beyond either end), and
        K = floor(fraction x steps): the adapter joins no later, as a share of the trajectory, than the
        profile allows (quality first). The result lies in [0, steps]."""
        if steps <= 0:
            return 0
        table = dict(self.k_by_steps)
        if steps in table:
            return table[steps]
        points = [(s, k / s) for s, k in self.k_by_steps]
        below = [p for p in points if p[0] < steps]
        above = [p for p in points if p[0] > steps]
        if not below:
            frac = above[0][1]
        elif not above:
            frac = below[-1][1]
        else:
            (s0, f0), (s1, f1) = below[-1], above[0]
            frac = f0 + (f1 - f0) * (steps - s0) / (s1 - s0)
        return max(0, min(steps, math.floor(frac * steps + 1e-9)))


def parse_profile(data: object, source: str = "profile") -> LoraProfile:
    """A profile's JSON object -> LoraProfile; ConfigError naming `source` and the problem."""
    table = data.get("k_by_steps") if isinstance(data, Mapping) else None
    if not isinstance(table, Mapping) or not table:
        raise ConfigError(f"{source}: k_by_steps: missing or empty; allowed an object {{steps: K}}, "
                          f"got {table!r}")
    pairs = []
    for steps_text, k in table.items():
        try:
            steps = int(steps_text)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: k_by_steps: step count not an integer, "
                              f"got {steps_text!r}") from None
        if steps < 1 or isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= steps:
            raise ConfigError(f"{source}: k_by_steps[{steps_text}]: allowed steps >= 1 and an integer K in "
                              f"[0, steps], got {k!r}")
        pairs.append((steps, k))
    return LoraProfile(tuple(sorted(pairs)))


def load_profile(path: Path) -> LoraProfile:
    """Read and parse a profile file; ConfigError naming the file when it is unreadable or malformed."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable LoRA profile: {type(e).__name__}: {e}") from e
    return parse_profile(data, str(path))


@dataclass(frozen=True, slots=True)
class _Listing:
    adapters: Mapping[str, Adapter]
    names: frozenset[str]
    signature: tuple  # (top mtime_ns, ((subdir, mtime_ns), ...)); () when unreadable
    racy: bool  # repeat the scan at the next check
    subdirs: tuple[str, ...]  # the subdirectories whose mtimes the signature holds


class LoraRegistry:
    """The servable adapters of one `lora_dir` (None: LoRA off, no adapter is servable). Thread-safe: requests
    ask for `names()` on execute threads while the loader thread resolves paths."""

    def __init__(self, lora_dir: str | Path | None, *, poll_interval_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lora_dir = Path(lora_dir) if lora_dir else None
        if self.lora_dir is not None and not self.lora_dir.is_dir():
            raise ConfigError(f"lora_dir: not a directory; allowed an existing directory of LoRA "
                              f"safetensors, got {str(self.lora_dir)!r}")
        self.poll_interval_s = poll_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._listing = _Listing({}, frozenset(), (), True, ())
        self._checked_s = -math.inf
        self._profiles: dict[Path, tuple[tuple[int, int], LoraProfile | None]] = {}
        self._bad_profiles: set[tuple[Path, tuple[int, int]]] = set()
        self.scans = 0  # directory listings made (the re-list rule is tested by it)
        if self.lora_dir is not None:
            self.names(refresh=True)

    # -- listing ------------------------------------------------------------------------------------------
    def names(self, refresh: bool = False) -> frozenset[str]:
        """The servable adapter names. Re-lists the directory when it changed (checked at most every
        poll_interval_s; `refresh` checks now)."""
        if self.lora_dir is None:
            return frozenset()
        with self._lock:
            now = self._clock()
            if refresh or now - self._checked_s >= self.poll_interval_s:
                self._checked_s = now
                current = self._listing
                if current.racy or self._signature(current.subdirs) != current.signature:
                    self._listing = self._scan()
            return self._listing.names

    def adapter(self, name: str) -> Adapter:
        """The adapter `name` as last listed; KeyError naming the directory when it is not servable."""
        self.names()
        try:
            return self._listing.adapters[name]
        except KeyError:
            raise KeyError(f"adapter {name!r} is not in {self.lora_dir}") from None

    def path(self, name: str) -> Path:
        """The weights file of `name` (the loader's `resolve`)."""
        return self.adapter(name).path

    def nbytes(self, name: str) -> int:
        """Size of `name`'s weights file in bytes, now (0 if it vanished since the listing)."""
        try:
            return self.adapter(name).path.stat().st_size
        except OSError:
            return 0

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    # -- profiles -----------------------------------------------------------------------------------------
    def profile(self, name: str) -> LoraProfile | None:
        """`name`'s profile, or None without one; ConfigError when the file is malformed. Parsed once per
        file version (mtime, size)."""
        path = self.adapter(name).profile_path
        try:
            st = path.stat()
        except OSError:
            return None
        version = (st.st_mtime_ns, st.st_size)
        with self._lock:
            cached = self._profiles.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        profile = load_profile(path)
        with self._lock:
            self._profiles[path] = (version, profile)
        return profile

    def k_for(self, name: str, steps: int, default_k: int) -> int:
        """BAL's K for adapter `name` in a request of `steps` steps: from its profile (LoraProfile.k_for),
        else `default_k`; always in [0, steps]. A malformed profile falls back to `default_k` with one
        warning per file version (the request is served; `tessera lora-profile` rewrites the file)."""
        try:
            profile = self.profile(name)
        except ConfigError as e:
            path = self.adapter(name).profile_path
            try:
                st = path.stat()
                key = (path, (st.st_mtime_ns, st.st_size))
            except OSError:
                key = (path, (0, 0))
            with self._lock:
                first = key not in self._bad_profiles
                self._bad_profiles.add(key)
            if first:
                log.warning("[tessera] LoRA profile ignored, default K=%d used: %s", default_k, e)
            profile = None
        k = profile.k_for(steps) if profile is not None else default_k
        return max(0, min(steps, k))

    # -- internals ----------------------------------------------------------------------------------------
    def _signature(self, subdirs: tuple[str, ...]) -> tuple:
        assert self.lora_dir is not None
        try:
            top = self.lora_dir.stat().st_mtime_ns
        except OSError:
            return ()
        mtimes = []
        for sub in subdirs:
            try:
                mtimes.append((sub, (self.lora_dir / sub).stat().st_mtime_ns))
            except OSError:
                mtimes.append((sub, -1))
        return (top, tuple(mtimes))

    def _scan(self) -> _Listing:
        """List the directory (caller holds the lock). Every mtime of the signature is read before what it
        guards (the top directory before the listing, a subdirectory before its weights file), so a change
        made during the scan shows at the next check."""
        assert self.lora_dir is not None
        self.scans += 1
        start_ns = time.time_ns()
        files: dict[str, Adapter] = {}
        dirs: dict[str, Adapter] = {}
        mtimes: list[tuple[str, int]] = []
        try:
            top = self.lora_dir.stat().st_mtime_ns
            entries = list(os.scandir(self.lora_dir))
        except OSError as e:
            log.warning("[tessera] lora_dir %s unreadable: %s", self.lora_dir, e)
            return _Listing({}, frozenset(), (), True, ())
        for entry in entries:
            try:
                if entry.is_dir():
                    mtimes.append((entry.name, os.stat(entry.path).st_mtime_ns))
                    weights = Path(entry.path) / WEIGHT_NAME
                    if is_adapter_name(entry.name) and weights.is_file():
                        dirs[entry.name] = Adapter(entry.name, weights, Layout.DIR)
                elif entry.name.endswith(SUFFIX) and entry.is_file():
                    name = entry.name[: -len(SUFFIX)]
                    if is_adapter_name(name):
                        files[name] = Adapter(name, Path(entry.path), Layout.FILE)
            except OSError:
                continue  # vanished while listed: that changed the directory's mtime, so it is re-listed
        mtimes.sort()
        adapters = {**dirs, **files}  # the single file wins
        racy = max([top, *(m for _, m in mtimes)]) >= start_ns - RACY_NS
        subdirs = tuple(n for n, _ in mtimes)
        return _Listing(adapters, frozenset(adapters), (top, tuple(mtimes)), racy, subdirs)
