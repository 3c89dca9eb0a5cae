"""The component interface every executor implements. Arrays are numpy, batch first, ONNX shapes."""

from __future__ import annotations

from typing import Protocol

import numpy as np

# Tensor names of the exported components (ONNX and Triton alike).
TEXT_INPUT = "input_ids"  # INT64 [B, 77]
TEXT_OUTPUTS = ("last_hidden_state", "penultimate_hidden_state", "pooled")  # [B,77,D], [B,77,D], [B,P]
DENOISER_INPUTS_SD = ("sample", "timestep", "encoder_hidden_states")
DENOISER_INPUTS_SD3 = ("sample", "timestep", "encoder_hidden_states", "pooled_projections")
DENOISER_OUTPUT = "noise_pred"  # FP32 [B, C, h, w]
VAE_INPUT = "latent"  # FP32 [B, C, h, w]
VAE_OUTPUT = "image"  # FP32 [B, 3, H, W] in [-1, 1]


class Components(Protocol):
    def encode_text(self, encoder: str, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Run text encoder `encoder` on INT64 ids [B, 77]; returns TEXT_OUTPUTS."""

    def denoise(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One denoiser call on a batch; returns noise_pred [B, C, h, w]."""

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """VAE-decode scaled latents [B, C, h, w] into images [B, 3, H, W] in [-1, 1]."""

    def model(self, name: str, outputs: tuple[str, ...]):
        """Another model of the repository with `run(feeds) -> {output: array}` (the UNet's encoder/decoder
        parts and the ControlNets): in-process (local) or over BLS."""
