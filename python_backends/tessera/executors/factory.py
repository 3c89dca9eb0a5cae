"""Build the engine's denoiser executor from its config."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import EngineConfig
from ..options import CfgParallel, DenoiseMode, Family, Runtime
from ..spec import PipelineSpec
from .base import Components
from .denoise import ConcatDenoiser, PatchDenoiser, RowParallel, TiledDenoiser, torch_call

log = logging.getLogger(__name__)


def load_torch_denoiser(spec: PipelineSpec, repo: str | Path):
    return load_denoiser_module(Path(repo) / spec.torch_denoiser, spec.family)


def load_denoiser_module(path: Path, family: Family):
    """The diffusers denoiser saved at `path` (UNet2DConditionModel or SD3Transformer2DModel), in eval mode."""
    import diffusers

    cls = getattr(diffusers, "UNet2DConditionModel" if family is Family.SD else "SD3Transformer2DModel")
    return cls.from_pretrained(path).eval()


def serves_controlnets(config: EngineConfig, spec: PipelineSpec) -> bool:
    """ControlNets run over the exported encoder/decoder parts (in-process or over BLS): ORT, concat, no LoRA."""
    return bool(spec.controlnets) and config.denoiser_runtime is Runtime.ORT \
        and config.denoise_mode is DenoiseMode.CONCAT and not config.lora_dir


def residual_names(spec: PipelineSpec) -> tuple[str, ...]:
    return (*(f"down_{i}" for i in range(spec.down_residuals)), "mid")


def row_parallel(config: EngineConfig, call):
    """cfg_parallel: the call as two halves at once (on), only for lone CFG latents (auto), or as it is."""
    if not config.cfg_parallel:
        return call
    return RowParallel(call, max_rows=2 if config.cfg_parallel is CfgParallel.AUTO else None)


def make_denoiser(config: EngineConfig, spec: PipelineSpec, repo: str | Path, components: Components):
    if config.denoiser_workers > 1:
        return make_pooled_denoiser(config, spec, repo)
    if serves_controlnets(config, spec):
        from .base import DENOISER_OUTPUT
        from .control import ControlDenoiser

        whole = row_parallel(config, components.denoise)
        encoder = components.model(spec.denoiser_encoder, ("emb", *residual_names(spec)))
        decoder = components.model(spec.denoiser_decoder, (DENOISER_OUTPUT,))
        return ControlDenoiser(whole, encoder, decoder, spec.down_residuals, bool(config.control_parallel),
                               config.control_mode)
    if config.denoiser_runtime is Runtime.ORT:
        call = row_parallel(config, components.denoise)
        if config.lora_dir:  # merged sessions per adapter set, in-process; rows without adapters as before
            from .lora_ort import OrtLora

            call = OrtLora(Path(repo) / spec.denoiser / "1" / "model.onnx", call, config.intra_op_threads)
    else:
        model = load_torch_denoiser(spec, repo)
        if config.denoise_mode is DenoiseMode.PATCHES:
            return PatchDenoiser(model, spec.family, spec.denoiser_multiple, config.patch_size)
        call = torch_call(model, spec.family)
    if config.denoise_mode is DenoiseMode.TILED:
        return TiledDenoiser(call, config.tile_size, config.tile_overlap)
    return ConcatDenoiser(call)


def make_pooled_denoiser(config: EngineConfig, spec: PipelineSpec, repo: str | Path):
    """`denoiser_workers` processes, each with the diffusers denoiser, on one GPU each where the host has that many
    (NCCL), else on the CPU (gloo, `intra_op_threads` each)."""
    import torch

    from .workers import PooledDenoiser, WorkerPool

    n = config.denoiser_workers
    device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= n else "cpu"
    return PooledDenoiser(WorkerPool(Path(repo) / spec.torch_denoiser, spec.family, n, device, config.intra_op_threads))


def make_addons(config: EngineConfig, spec: PipelineSpec, repo: str | Path, components: Components):
    """The engine's add-ons: LoRA adapters (make_adapters), and with them the ControlNet service when the
    repository holds ControlNets for this pipeline and the engine can run them (serves_controlnets): each
    ControlNet is loaded on demand as an in-process session (local) or a handle on its shared Triton model
    (bls: the model itself is loaded with the server)."""
    adapters = make_adapters(config)
    if not serves_controlnets(config, spec):
        if spec.controlnets:
            log.warning("[tessera] ControlNets %s not served by this engine: they need denoiser_runtime=ort, "
                        "denoise_mode=concat and no lora_dir", ", ".join(spec.controlnets))
        return adapters
    from ..controlnet import ControlNets, WithControlNets
    from ..lora_cache import LoraCache, LoraLoader

    outputs = residual_names(spec)

    def resolve(model: str) -> Path:
        return Path(repo) / model

    def load(model_dir: Path):
        return components.model(model_dir.name, outputs), (model_dir / "1" / "model.onnx").stat().st_size

    cache = LoraCache(config.controlnet_cache_mb << 20, max_entries=config.controlnet_cache)
    return WithControlNets(adapters, ControlNets(frozenset(spec.controlnets), LoraLoader(cache, resolve, load)))


def make_adapters(config: EngineConfig):
    """The engine's per-request adapters: none, or LoRA from `lora_dir` with bounded asynchronous loading
    (adapters.LoraAdapters) applied by the torch denoiser per row (executors/lora_torch) or by ONNX Runtime
    in one merged session per adapter set (executors/lora_ort)."""
    from ..adapters import LoraAdapters, NoAdapters

    if not config.lora_dir:
        return NoAdapters()
    from ..bal import Bal
    from ..lora_cache import LoraCache, LoraLoader
    from ..lora_registry import LoraRegistry
    from .lora_torch import load_lora

    def load(path: Path):
        adapter = load_lora(path)
        return adapter, adapter.nbytes

    registry = LoraRegistry(config.lora_dir)
    loader = LoraLoader(LoraCache(config.lora_cache_mb << 20), registry.path, load,
                        load_delay_s=config.lora_load_delay_ms / 1e3)
    return LoraAdapters(registry, loader, Bal(loader, lambda name, steps: registry.k_for(name, steps, config.lora_k)),
                        config.lora_batching)
