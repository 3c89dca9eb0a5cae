"""Result files for benchmarks: perf/results/<name>.json (+ .png), with the run's provenance."""

from __future__ import annotations

import datetime as dt
import json
import math
import platform
import subprocess
from pathlib import Path

RESULTS = Path.cwd() / "perf" / "results"  # benchmarks run from the repository root
SCHEMA_VERSION = 1


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def device() -> str:
    import os

    return f"{platform.machine()} CPU, {os.cpu_count()} cores, 1 thread per process ({platform.python_version()})"


def _clean(obj):
    """JSON has no NaN or Infinity: write null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_result(name: str, config: dict, results: dict, out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": git_commit(),
        "device": device(),
        "config": config,
        **results,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(_clean(doc), indent=2) + "\n")
    return path
