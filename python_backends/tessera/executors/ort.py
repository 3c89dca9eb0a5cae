"""ONNX Runtime on the CPU: one session per exported component, one thread each (feasibility §3.3)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import ExecutorError
from ..spec import PipelineSpec
from .base import DENOISER_OUTPUT, TEXT_INPUT, TEXT_OUTPUTS, VAE_INPUT, VAE_OUTPUT


class OrtModel:
    """One ONNX file in an ORT CPU session. `run` takes ONNX-shaped arrays and returns every output."""

    def __init__(self, path: str | Path, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_ranks = {i.name: len(i.shape) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.input_ranks) - set(feeds)
        if missing:
            raise ExecutorError(f"{self.path.parent.parent.name}: missing inputs {sorted(missing)}")
        fixed = {k: np.ascontiguousarray(from_triton_shape(feeds[k], r)) for k, r in self.input_ranks.items()}
        outs = self.session.run(self.output_names, fixed)
        return dict(zip(self.output_names, outs, strict=True))


def from_triton_shape(array: np.ndarray, rank: int) -> np.ndarray:
    """Triton carries a per-item scalar as [B, 1]; ONNX wants [B]. Drop that trailing 1."""
    if array.ndim == rank + 1 and array.shape[-1] == 1:
        return array.reshape(array.shape[:-1])
    return array


def to_triton_shape(array: np.ndarray) -> np.ndarray:
    """The inverse of from_triton_shape for rank-1 (per-item scalar) tensors."""
    return array.reshape(-1, 1) if array.ndim == 1 else array


class LocalComponents:
    """In-process executor: the same ONNX files the repository serves, without BLS hops."""

    def __init__(self, spec: PipelineSpec, repo: str | Path, threads: int = 1):
        """`repo` is the model repository: component `name` lives in `repo/name/1/model.onnx`."""
        names = (*spec.text_encoders, spec.denoiser, spec.vae_decoder)
        self.models = {n: OrtModel(Path(repo) / n / "1" / "model.onnx", threads) for n in names}
        self.repo, self.threads = Path(repo), threads
        self.denoiser_name = spec.denoiser
        self.vae_name = spec.vae_decoder

    def encode_text(self, encoder: str, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        out = self.models[encoder].run({TEXT_INPUT: input_ids})
        return {k: out[k] for k in TEXT_OUTPUTS}

    def denoise(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.models[self.denoiser_name].run(inputs)[DENOISER_OUTPUT]

    def decode(self, latent: np.ndarray) -> np.ndarray:
        return self.models[self.vae_name].run({VAE_INPUT: latent})[VAE_OUTPUT]

    def model(self, name: str, outputs: tuple[str, ...]) -> OrtModel:
        """Another model of the repository, in its own session (every output: `outputs` is for BLS)."""
        return OrtModel(self.repo / name / "1" / "model.onnx", self.threads)
