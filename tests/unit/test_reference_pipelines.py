"""The committed quality reference pipelines load with a plain `DiffusionPipeline.from_pretrained(dir)` (no
`torch_dtype`) in one dtype and generate: they are stored in fp32, as `tessera train-reference` saves them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

MODELS = Path(__file__).resolve().parents[2] / "quality_models"


@pytest.mark.skipif(not (MODELS / "heavy").is_dir(), reason="quality_models/heavy is not committed")
def test_heavy_reference_loads_plainly_in_fp32_and_generates():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(MODELS / "heavy", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    modules = {name: m for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    assert set(modules) >= {"text_encoder", "unet", "vae"}
    dtypes = {name: {p.dtype for p in m.parameters()} for name, m in modules.items()}
    assert all(d == {torch.float32} for d in dtypes.values()), dtypes

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = pipe("a red circle at top left", height=64, width=64, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        torch.set_num_threads(threads)
    image = out.images
    assert image.shape == (1, 64, 64, 3) and image.dtype == np.float32
    assert np.isfinite(image).all() and 0.0 <= image.min() and image.max() <= 1.0
