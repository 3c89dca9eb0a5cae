"""Benchmarks share tessera.results (result files with provenance)."""

from tessera.results import RESULTS, write_result  # noqa: F401
