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


def down_residuals(unet) -> int:
    """How many skip connections the UNet's encoder hands its decoder (= a ControlNet's down residuals)."""
    return 1 + sum(len(b.resnets) + len(b.downsamplers or ()) for b in unet.down_blocks)


class _UNetEncoder(torch.nn.Module):
    """The UNet's time embedding, conv_in, down and mid blocks (UNet2DConditionModel.forward up to where a
    ControlNet's residuals are added): -> emb, mid, down_0 .. down_{N-1}."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states):
        u = self.model
        emb = u.time_embedding(u.get_time_embed(sample=sample, timestep=timestep), None)
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        sample = u.conv_in(sample)
        res = (sample,)
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, skips = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                sample, skips = block(hidden_states=sample, temb=emb)
            res += skips
        if getattr(u.mid_block, "has_cross_attention", False):
            sample = u.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample = u.mid_block(sample, emb)
        return (emb, sample, *res)


class _UNetDecoder(torch.nn.Module):
    """The rest of UNet2DConditionModel.forward: up blocks over the (ControlNet-summed) skips, then the output
    convolution. Inputs: emb, mid, encoder_hidden_states, down_0 .. down_{N-1}."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, emb, mid, encoder_hidden_states, *down):
        u = self.model
        factor = 2 ** u.num_upsamplers
        forward_size = any(d % factor for d in mid.shape[-2:]) or any(d % factor for d in down[0].shape[-2:])
        sample, res = mid, tuple(down)
        for i, block in enumerate(u.up_blocks):
            skips, res = res[-len(block.resnets):], res[: -len(block.resnets)]
            size = res[-1].shape[2:] if forward_size and i < len(u.up_blocks) - 1 else None
            if getattr(block, "has_cross_attention", False):
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips,
                               encoder_hidden_states=encoder_hidden_states, upsample_size=size)
            else:
                sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips, upsample_size=size)
        if u.conv_norm_out:
            sample = u.conv_act(u.conv_norm_out(sample))
        return u.conv_out(sample)


class _ControlNet(torch.nn.Module):
    """A diffusers ControlNetModel at conditioning scale 1 (the engine scales per request): -> down_0 ..
    down_{N-1}, mid."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond):
        down, mid = self.model(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                               controlnet_cond=controlnet_cond, conditioning_scale=1.0, return_dict=False)
        return (*down, mid)


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


def split_unet_components(unet, seq: int, latent_hw: tuple[tuple[int, int], tuple[int, int]],
                          controlnets: dict[str, torch.nn.Module], vae_factor: int) -> list[ComponentExport]:
    """The UNet as an encoder part and a decoder part, and each ControlNet (issue 15), with example shapes at
    two latent sizes. Residual i has its own spatial axes (each level halves the latent)."""
    unsupported = {k: unet.config.get(k) for k in ("center_input_sample", "class_embed_type", "addition_embed_type",
                                                    "time_cond_proj_dim", "encoder_hid_dim_type")
                   if unet.config.get(k)}
    if unsupported:
        raise ExportError(f"controlnet: the UNet encoder/decoder split covers plain text-conditioned UNets; this one "
                          f"sets {unsupported}")
    n = down_residuals(unet)
    (h1, w1), (h2, w2) = latent_hw
    c, d = unet.config.in_channels, unet.config.cross_attention_dim
    base = [{"sample": ((b, c, h, w), np.float32, 1.0), "timestep": ((b,), np.float32, 500.0),
             "encoder_hidden_states": ((b, seq, d), np.float32, 1.0)} for b, h, w in ((2, h1, w1), (3, h2, w2))]
    spatial = {0: "batch", 2: "height", 3: "width"}
    axes = {"sample": spatial, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch", 1: "sequence"}}
    downs = tuple(f"down_{i}" for i in range(n))
    res_axes = {name: {0: "batch", 2: f"height_{i}", 3: f"width_{i}"} for i, name in enumerate(downs)}
    res_axes["mid"] = {0: "batch", 2: "height_mid", 3: "width_mid"}
    comps = [ComponentExport("denoiser_encoder", _UNetEncoder(unet), tuple(base[0]), ("emb", "mid", *downs),
                             axes | res_axes | {"emb": {0: "batch"}}, tuple(base))]
    _check_split(unet, base)
    # the decoder's examples: what the encoder gives for the two example inputs
    enc = _UNetEncoder(unet).eval()
    dec_ex = []
    for ex, seed in zip(base, (0, 1), strict=True):
        feed = _rand_inputs(ex, seed)
        with torch.no_grad():
            outs = enc(*(torch.from_numpy(feed[k]) for k in ("sample", "timestep", "encoder_hidden_states")))
        shapes = {"emb": (tuple(outs[0].shape), np.float32, 1.0), "mid": (tuple(outs[1].shape), np.float32, 1.0),
                  "encoder_hidden_states": ex["encoder_hidden_states"]}
        shapes |= {name: (tuple(o.shape), np.float32, 1.0) for name, o in zip(downs, outs[2:], strict=True)}
        dec_ex.append(shapes)
    comps.append(ComponentExport("denoiser_decoder", _UNetDecoder(unet), ("emb", "mid", "encoder_hidden_states", *downs),
                                 (DENOISER_OUTPUT,), {"emb": {0: "batch"}, "encoder_hidden_states": axes["encoder_hidden_states"],
                                                      DENOISER_OUTPUT: spatial} | res_axes, tuple(dec_ex)))
    for name, net in controlnets.items():
        ex = tuple(b | {"controlnet_cond": ((b["sample"][0][0], 3, b["sample"][0][2] * vae_factor,
                                              b["sample"][0][3] * vae_factor), np.float32, 1.0)} for b in base)
        comps.append(ComponentExport(f"controlnet_{name}", _ControlNet(net), (*base[0], "controlnet_cond"),
                                     (*downs, "mid"), axes | res_axes | {"controlnet_cond": {0: "batch", 2: "cond_height", 3: "cond_width"}}, ex))
    return comps


def _check_split(unet, examples: list[dict], tolerance: float = 1e-4) -> None:
    """decoder(encoder(x)) must be the whole UNet's forward (in torch, before any export)."""
    enc, dec = _UNetEncoder(unet).eval(), _UNetDecoder(unet).eval()
    for seed, ex in enumerate(examples):
        feed = {k: torch.from_numpy(v) for k, v in _rand_inputs(ex, seed).items()}
        args = (feed["sample"], feed["timestep"], feed["encoder_hidden_states"])
        with torch.no_grad():
            emb, mid, *down = enc(*args)
            got = dec(emb, mid, feed["encoder_hidden_states"], *down)
            want = unet(*args[:2], encoder_hidden_states=args[2], return_dict=False)[0]
        diff = float((got - want).abs().max())
        if not diff <= tolerance * max(1.0, float(want.abs().max())):
            raise ExportError(f"controlnet: the UNet's encoder + decoder parts differ from its forward by {diff:.3e}; "
                              f"allowed {tolerance:.0e} (relative)")


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
