"""Triton model and tensor names, dtypes and default limits: one source for adapters, CLI, demo and tests."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ENTRY_MODEL = "txt2img"
ENGINE_MODEL = "engine"
TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
DENOISER = "denoiser"
VAE_DECODER = "vae_decoder"

OUTPUT_IMAGE = "image"  # UINT8 [batch, H, W, 3]
OUTPUT_STEPS = "step"  # INT32 [batch, 1]: steps run (final response) or done so far (progress)


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    dtype: type  # numpy dtype of the tensor
    triton_type: str  # Triton datatype string (config.pbtxt uses TYPE_<triton_type>)
    optional: bool = False
    dims: tuple[int, ...] = (1,)  # per item, after the batch dimension (-1: any size)


# Every entry input is [batch, *dims]: the batch dimension first; [batch, 1] (one value per item) but the
# ControlNet scales [batch, K] and condition maps [batch, H, W, C].
ENTRY_INPUTS: tuple[InputSpec, ...] = (
    InputSpec("prompt", np.object_, "STRING"),
    InputSpec("negative_prompt", np.object_, "STRING", optional=True),
    InputSpec("height", np.int32, "INT32"),
    InputSpec("width", np.int32, "INT32"),
    InputSpec("steps", np.int32, "INT32"),
    InputSpec("guidance_scale", np.float32, "FP32"),
    InputSpec("seed", np.int64, "INT64"),
    InputSpec("slo_ms", np.int32, "INT32", optional=True),
    InputSpec("early_exit", np.bool_, "BOOL", optional=True),  # absent: the server's default
    InputSpec("lora", np.object_, "STRING", optional=True),  # "name" or "name:scale", comma-separated, up to 4
    InputSpec("controlnet", np.object_, "STRING", optional=True),  # ControlNet names, comma-separated, up to 3
    InputSpec("control_scale", np.float32, "FP32", optional=True, dims=(-1,)),  # one, or one per ControlNet
    InputSpec("control_image", np.uint8, "UINT8", optional=True, dims=(-1, -1, -1)),  # [H, W, 1 | 3 | 3K]
)
ENTRY_INPUT_NAMES = tuple(s.name for s in ENTRY_INPUTS)
OUTPUT_MODEL = "model"  # cascade entry only: STRING [batch, 1], "light" or "heavy" (which pipeline made the image)
OUTPUT_CONFIDENCE = "confidence"  # cascade entry only: FP32 [batch, 1], the discriminator's P(real) of the light image (-1: not scored)
DISCRIMINATOR_IMAGE = "image"  # the cascade's discriminator model: UINT8 [batch, H, W, 3] in
DISCRIMINATOR_IDS = "input_ids"  # ... and, for one of inputs image+prompt, INT64 [batch, L] (the prompt's tokens)
DISCRIMINATOR_OUTPUT = "p_real"  # ... FP32 [batch, 1] out: its confidence
OUTPUT_PREVIEW = "preview"  # engine only: UINT8 [1, h, w, 3] latent-resolution preview with progress
STREAM_INPUTS = ("progress", "preview")  # engine only, optional BOOL [batch, 1]
SERVER_HTTP_ENV = "TESSERA_TRITON_HTTP"  # host:port of the server's HTTP endpoint, set by tessera serve
WARMUP_SAMPLE = "tessera_warmup"  # the engine's model_warmup sample (marks engine models in a repository)
ENTRY_MAX_BATCH = 4


def client_datatype(spec: InputSpec) -> str:
    """The datatype string tritonclient's InferInput expects (BYTES for strings)."""
    return "BYTES" if spec.triton_type == "STRING" else spec.triton_type
