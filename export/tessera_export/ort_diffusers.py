"""A real diffusers StableDiffusionPipeline whose components run the exported ONNX files in-process.

The pipeline keeps its own loop, noise, guidance and post-processing; only the three modules' forward
passes are swapped for ONNX Runtime calls on the repository's files. This is the in-process baseline
for the overhead figure: same components, same loop, no server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tessera.executors.ort import OrtModel

from .tiny import load_pipeline


def ort_backed_pipeline(pipeline_dir: str | Path, repo: str | Path, prefix: str = "", threads: int = 1):
    pipe = load_pipeline(pipeline_dir)
    if getattr(pipe, "unet", None) is None:
        raise ValueError(f"pipeline: the ORT-backed baseline supports UNet pipelines; got {type(pipe).__name__}")
    repo = Path(repo)
    te = OrtModel(repo / f"{prefix}text_encoder" / "1" / "model.onnx", threads)
    unet = OrtModel(repo / f"{prefix}denoiser" / "1" / "model.onnx", threads)
    vae = OrtModel(repo / f"{prefix}vae_decoder" / "1" / "model.onnx", threads)

    def text_forward(input_ids, attention_mask=None, **_):
        out = te.run({"input_ids": input_ids.numpy().astype(np.int64)})
        return (torch.from_numpy(out["last_hidden_state"]),)

    def unet_forward(sample, timestep, encoder_hidden_states, **_):
        t = torch.as_tensor(timestep, dtype=torch.float32).expand(sample.shape[0]).contiguous()
        out = unet.run(
            {"sample": sample.numpy(), "timestep": t.numpy(), "encoder_hidden_states": encoder_hidden_states.numpy()}
        )
        return (torch.from_numpy(out["noise_pred"]),)

    def vae_decode(latent, return_dict=False, generator=None, **_):
        return (torch.from_numpy(vae.run({"latent": latent.numpy().astype(np.float32)})["image"]),)

    pipe.text_encoder.forward = text_forward
    pipe.unet.forward = unet_forward
    pipe.vae.decode = vae_decode
    pipe.set_progress_bar_config(disable=True)
    return pipe
