"""Export a local diffusers pipeline's components to ONNX and check each against torch.

Components: text encoder(s), denoiser (UNet2DConditionModel or SD3Transformer2DModel) and VAE decoder,
with dynamic batch and spatial axes (legacy exporter, opset 17: fast and measured exact here). Each file
is run in ONNX Runtime on two shapes and compared with torch; above `tolerance` the export fails.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tessera.errors import ExportError
from tessera.options import Family
from tessera.executors.base import DENOISER_OUTPUT, TEXT_INPUT, TEXT_OUTPUTS, VAE_INPUT, VAE_OUTPUT
from tessera.executors.ort import OrtModel

OPSET = 17


class _TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return out.last_hidden_state, out.hidden_states[-2], pooled


class _UNet(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _SD3Transformer(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
        return self.model(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
        )[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent):
        return self.vae.decode(latent, return_dict=False)[0]


@dataclass(frozen=True, slots=True)
class ComponentExport:
    name: str  # component kind: text_encoder, text_encoder_2, denoiser, vae_decoder
    module: torch.nn.Module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict
    example_shapes: tuple[dict, dict]  # two input sets: export uses the first, the check uses both


def _rand_inputs(shapes: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (shape, dtype, hi) in shapes.items():
        if np.dtype(dtype).kind == "i":
            out[name] = rng.integers(0, hi, size=shape).astype(dtype)
        else:
            out[name] = (rng.standard_normal(shape) * hi).astype(dtype)
    return out


def plan_components(pipe, family: str, latent_hw: tuple[tuple[int, int], tuple[int, int]]) -> list[ComponentExport]:
    """What to export for this pipeline, with example shapes at two latent sizes."""
    comps: list[ComponentExport] = []
    encoders = ["text_encoder"] + (["text_encoder_2"] if family is Family.SD3 else [])
    for name in encoders:
        te = getattr(pipe, name)
        vocab = te.config.vocab_size
        seq = pipe.tokenizer.model_max_length
        comps.append(
            ComponentExport(
                name,
                _TextEncoder(te),
                (TEXT_INPUT,),
                TEXT_OUTPUTS,
                {TEXT_INPUT: {0: "batch"}, **{o: {0: "batch"} for o in TEXT_OUTPUTS}},
                ({TEXT_INPUT: ((2, seq), np.int64, vocab)}, {TEXT_INPUT: ((1, seq), np.int64, vocab)}),
            )
        )
    (h1, w1), (h2, w2) = latent_hw
    if family is Family.SD:
        unet = pipe.unet
        c, d = unet.config.in_channels, unet.config.cross_attention_dim
        seq = pipe.tokenizer.model_max_length
        mod, names = _UNet(unet), ("sample", "timestep", "encoder_hidden_states")
        ex = [
            {"sample": ((b, c, h, w), np.float32, 1.0), "timestep": ((b,), np.float32, 500.0),
             "encoder_hidden_states": ((b, seq, d), np.float32, 1.0)}
            for b, h, w in ((2, h1, w1), (3, h2, w2))
        ]
        axes = {"encoder_hidden_states": {0: "batch", 1: "sequence"}}
    else:
        tr = pipe.transformer
        c, d, p = tr.config.in_channels, tr.config.joint_attention_dim, tr.config.pooled_projection_dim
        seq = pipe.tokenizer.model_max_length + 256
        mod, names = _SD3Transformer(tr), ("sample", "timestep", "encoder_hidden_states", "pooled_projections")
        ex = [
            {"sample": ((b, c, h, w), np.float32, 1.0), "timestep": ((b,), np.float32, 500.0),
             "encoder_hidden_states": ((b, seq, d), np.float32, 1.0), "pooled_projections": ((b, p), np.float32, 1.0)}
            for b, h, w in ((2, h1, w1), (3, h2, w2))
        ]
        axes = {"encoder_hidden_states": {0: "batch", 1: "sequence"}, "pooled_projections": {0: "batch"}}
    spatial = {0: "batch", 2: "height", 3: "width"}
    axes.update({"sample": spatial, "timestep": {0: "batch"}, DENOISER_OUTPUT: spatial})
    comps.append(ComponentExport("denoiser", mod, names, (DENOISER_OUTPUT,), axes, tuple(ex)))
    lc = pipe.vae.config.latent_channels
    comps.append(
        ComponentExport(
            "vae_decoder",
            _VaeDecoder(pipe.vae),
            (VAE_INPUT,),
            (VAE_OUTPUT,),
            {VAE_INPUT: spatial, VAE_OUTPUT: spatial},
            ({VAE_INPUT: ((1, lc, h1, w1), np.float32, 1.0)}, {VAE_INPUT: ((2, lc, h2, w2), np.float32, 1.0)}),
        )
    )
    return comps


def export_component(comp: ComponentExport, path: Path, tolerance: float = 1e-3, progress=print) -> float:
    """Export one component to `path` and return the max abs diff vs torch over the two example shapes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    feeds = [_rand_inputs(s, seed=i) for i, s in enumerate(comp.example_shapes)]
    args = tuple(torch.from_numpy(feeds[0][n]) for n in comp.input_names)
    comp.module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            torch.onnx.export(
                comp.module,
                args,
                str(path),
                input_names=list(comp.input_names),
                output_names=list(comp.output_names),
                dynamic_axes=comp.dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
            )
        finally:
            logging.disable(logging.NOTSET)
    model = OrtModel(path)
    worst = 0.0
    for feed in feeds:
        with torch.no_grad():
            ref = comp.module(*(torch.from_numpy(feed[n]) for n in comp.input_names))
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = model.run(feed)
        for name, r in zip(comp.output_names, ref, strict=True):
            diff = float(np.max(np.abs(got[name] - r.numpy())))
            worst = max(worst, diff)
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items())
        progress(f"[tessera] export {comp.name}: ORT vs torch on {shapes}: max abs diff {worst:.2e}")
    if not worst <= tolerance:
        raise ExportError(
            f"{comp.name}: ONNX output differs from torch by {worst:.3e}; allowed at most {tolerance:.0e} "
            f"(file kept at {path} for inspection)"
        )
    return worst
