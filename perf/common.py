"""Benchmarks share tessera.results (result files with provenance) and the tiny-UNet set-up."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tessera.results import RESULTS, write_result  # noqa: F401


def parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: `python -m perf.<module>`, the first paragraph of its docstring, and every
    option's default in --help."""
    return argparse.ArgumentParser(prog=f"python -m perf.{module}", description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


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
