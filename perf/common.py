"""Benchmarks share tessera.results (result files with provenance) and the tiny-UNet set-up."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tessera.results import RESULTS, write_result  # noqa: F401


def tiny_unet_repo(name: str) -> tuple[Path, Path, Path]:
    """One thread (two on the 2 shared cores gave 100x outliers), then a tiny UNet pipeline built with
    fixed seeds and exported to a fresh work dir. Returns (work dir, pipeline dir, repository)."""
    import torch

    torch.set_num_threads(1)
    from tessera_export.repository import export_pipeline
    from tessera_export.tiny import build_tiny

    work = Path(tempfile.mkdtemp(prefix=f"tessera-{name}-"))
    pipeline = build_tiny(work / "tiny-sd", kind="unet")
    export_pipeline(pipeline, work / "repo", progress=lambda *_: None)
    return work, pipeline, work / "repo"
