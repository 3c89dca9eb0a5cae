"""Tiny random-weight diffusers pipelines, built offline from configs with fixed seeds.

`build_tiny(dir, kind="unet")` writes a StableDiffusionPipeline (UNet2DConditionModel, CLIPTextModel with
the real CLIP BPE tokenizer, AutoencoderKL with the real 8x factor, DDIM); `kind="dit"` writes an
SD3-style StableDiffusion3Pipeline (SD3Transformer2DModel, two small CLIP encoders, no T5, flow matching).
Both are saved with `save_pretrained`, so they load like any diffusers pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tessera.tokenizer import build_clip_tokenizer

TINY_VOCAB = 4096  # the first 3,582 CLIP merges: real CLIP ids, small embedding table
TEXT_HIDDEN = 32


def _text_config(tokenizer, projection_dim: int = TEXT_HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(seed: int, sd3: bool):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw = dict(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609) if sd3 else {}
    # Four blocks: the real 8x VAE factor (a 256x256 image has a 32x32 latent).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=256,
        **kw,
    )


DIT_TINY = (2, 4, 8)  # (layers, attention heads, head dim) of the tiny DiT the tests use


def build_tiny(out_dir: str | Path, kind: str = "unet", seed: int = 0, progress=print,
               dit: tuple[int, int, int] = DIT_TINY) -> Path:
    """Build and save a tiny pipeline; returns its directory. Deterministic for a given seed. `dit`: the
    transformer's (layers, heads, head dim) for kind="dit" (larger for benchmarks where the step must outweigh
    the workers' communication, perf/instances.py)."""
    from diffusers import (
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in ("unet", "dit"):
        raise ValueError(f"kind: unknown pipeline kind; allowed unet, dit, got {kind!r}")
    out = Path(out_dir)
    tokenizer = build_clip_tokenizer(TINY_VOCAB)
    progress(f"[tessera] build-tiny {kind}: tokenizer with {len(tokenizer)} CLIP BPE tokens")
    if kind == "unet":
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN,
            norm_num_groups=32,
        )
        torch.manual_seed(seed + 1)
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        sampler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            vae=_vae(seed + 2, sd3=False),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=sampler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=dit[0],
            attention_head_dim=dit[2],
            num_attention_heads=dit[1],
            caption_projection_dim=dit[1] * dit[2],
            joint_attention_dim=2 * TEXT_HIDDEN,
            pooled_projection_dim=2 * TEXT_HIDDEN,
        )
        torch.manual_seed(seed + 1)
        te1 = CLIPTextModelWithProjection(_text_config(tokenizer))
        torch.manual_seed(seed + 3)
        te2 = CLIPTextModelWithProjection(_text_config(tokenizer))
        pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(seed + 2, sd3=True),
            text_encoder=te1,
            tokenizer=tokenizer,
            text_encoder_2=te2,
            tokenizer_2=tokenizer,
            text_encoder_3=None,
            tokenizer_3=None,
        )
    pipe.save_pretrained(out)
    progress(f"[tessera] build-tiny {kind}: saved {type(pipe).__name__} to {out}")
    return out


def load_pipeline(pipeline_dir: str | Path):
    """Load any local diffusers pipeline offline, in fp32 (weights saved in fp16 are upcast);
    components saved as null (SD3 without T5) stay None."""
    import json

    from diffusers import DiffusionPipeline

    index = json.loads((Path(pipeline_dir) / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    return DiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True, torch_dtype=torch.float32, **absent)


def write_random_lora(unet, out_dir: str | Path, seed: int, metadata: bool = True, std: float = 0.05,
                      **config) -> Path:
    """A random LoRA for `unet` (diffusers UNet2DConditionModel) in the format `save_lora_weights` writes
    (PEFT's state dict keys, the PEFT config in the header when `metadata`): A and B random with `std`
    (B is random too, so it changes the output). `config`: LoraConfig arguments (r, lora_alpha, target_modules, ...)."""
    import copy

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = {"r": 4, "lora_alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]} | config
    model = copy.deepcopy(unet)
    cfg = LoraConfig(init_lora_weights=False, **config)
    model.add_adapter(cfg, adapter_name="a")
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(model, adapter_name="a").items()}
    state = {k: torch.randn(shape, generator=g) * std for k, shape in shapes.items()}
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=state, unet_lora_adapter_metadata=cfg.to_dict() if metadata else None)
    return Path(out_dir)
