"""Exporter checks: tolerance enforced, GPU target refused clearly without TensorRT, specs written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tessera.errors import ExportError, RuntimeUnavailableError
from tessera.spec import PipelineSpec


def test_export_gpu_target_without_tensorrt_says_so(tiny_pipelines, tmp_path):
    from tessera_export.repository import export_pipeline

    with pytest.raises(RuntimeUnavailableError, match=r"--target gpu: (TensorRT is not available|no CUDA GPU)"):
        export_pipeline(tiny_pipelines["unet"], tmp_path / "repo", target="gpu", progress=lambda *_: None)
    assert not (tmp_path / "repo").exists(), "nothing is written when the target cannot be built"


def test_export_fails_above_tolerance(tiny_pipelines, tmp_path):
    from tessera_export.repository import export_pipeline

    with pytest.raises(ExportError, match=r"^text_encoder: ONNX output differs from torch by .*; allowed at most"):
        export_pipeline(tiny_pipelines["unet"], tmp_path / "repo", tolerance=-1.0, progress=lambda *_: None)


def test_export_writes_repository_and_manifests(repo):
    for name in ("txt2img", "engine", "text_encoder", "denoiser", "vae_decoder", "dit_txt2img", "dit_engine",
                 "dit_text_encoder_2"):
        assert (repo / name / "config.pbtxt").is_file(), name
    spec = PipelineSpec.load(repo / "engine" / "1" / "manifest.json")
    assert spec.family == "sd" and spec.vae_scale_factor == 8 and spec.limits.size_multiple == 16
    dit = PipelineSpec.load(repo / "dit_engine" / "1" / "manifest.json")
    assert dit.family == "sd3" and dit.text_encoders == ("dit_text_encoder", "dit_text_encoder_2")
    comp = json.loads((repo / "denoiser" / "1" / "manifest.json").read_text())
    assert comp["max_abs_diff_vs_torch"] <= 1e-3 and comp["source_class"] == "UNet2DConditionModel"
    assert 'string_value: "local"' in (repo / "engine_local" / "config.pbtxt").read_text()
    assert 'string_value: "engine_local"' in (repo / "txt2img_local" / "config.pbtxt").read_text()
    assert (repo / "denoiser" / "1" / "torch" / "config.json").is_file()


@pytest.mark.parametrize("kind, prefix", [("unet", ""), ("dit", "dit_")])
def test_generation_in_process_equals_diffusers(repo, diffusers_pipes, kind, prefix):
    """Tessera's step loop over the exported ONNX files equals diffusers' own pipeline (torch weights)."""
    from transformers import CLIPTokenizer

    from conftest import PROMPT, diffusers_image
    from tessera.executors.ort import LocalComponents
    from tessera.generation import Txt2Img
    from tessera.request import GenerationParams

    spec = PipelineSpec.load(repo / f"{prefix}engine" / "1" / "manifest.json")
    toks = [CLIPTokenizer.from_pretrained(repo / f"{prefix}engine" / "1" / d) for d in spec.tokenizers]
    runner = Txt2Img(spec, LocalComponents(spec, repo), toks)
    p = GenerationParams(PROMPT, "blurry", 128, 192, 6, 4.0, 11)
    ours = runner.generate(p)
    ref = diffusers_image(diffusers_pipes[kind], PROMPT, 128, 192, 6, 4.0, 11, negative="blurry")
    assert ours.shape == ref.shape == (128, 192, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2
    other = runner.generate(GenerationParams(PROMPT, "blurry", 128, 192, 6, 4.0, 12))
    assert np.abs(other.astype(int) - ref.astype(int)).max() > 2, "a different seed must give another image"
