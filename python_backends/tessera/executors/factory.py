"""Build the engine's denoiser executor from its config."""

from __future__ import annotations

from pathlib import Path

from ..config import EngineConfig
from ..options import DenoiseMode, Family, Runtime
from ..spec import PipelineSpec
from .base import Components
from .denoise import ConcatDenoiser, PatchDenoiser, TiledDenoiser, torch_call


def load_torch_denoiser(spec: PipelineSpec, repo: str | Path):
    import diffusers

    path = Path(repo) / spec.torch_denoiser
    cls = getattr(diffusers, "UNet2DConditionModel" if spec.family is Family.SD else "SD3Transformer2DModel")
    return cls.from_pretrained(path).eval()


def make_denoiser(config: EngineConfig, spec: PipelineSpec, repo: str | Path, components: Components):
    if config.denoiser_runtime is Runtime.ORT:
        call = components.denoise
    else:
        model = load_torch_denoiser(spec, repo)
        if config.denoise_mode is DenoiseMode.PATCHES:
            return PatchDenoiser(model, spec.family, spec.denoiser_multiple, config.patch_size)
        call = torch_call(model, spec.family)
    if config.denoise_mode is DenoiseMode.TILED:
        return TiledDenoiser(call, config.tile_size, config.tile_overlap)
    return ConcatDenoiser(call)
