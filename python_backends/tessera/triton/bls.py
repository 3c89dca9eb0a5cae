"""BlsComponents: the Components interface over BLS calls to the repository's component models."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from ..errors import ExecutorError
from ..executors.base import DENOISER_OUTPUT, TEXT_INPUT, TEXT_OUTPUTS, VAE_INPUT, VAE_OUTPUT
from ..executors.ort import from_triton_shape, to_triton_shape
from ..spec import PipelineSpec


class BlsComponents:
    def __init__(self, spec: PipelineSpec):
        self.spec = spec

    def _call(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """One BLS call per chunk of at most `component_max_batch` rows (the model's max_batch_size)."""
        n = next(iter(inputs.values())).shape[0]
        step = self.spec.component_max_batch
        if n <= step:
            return self._call_once(model, inputs, outputs)
        parts = [self._call_once(model, {k: v[i : i + step] for k, v in inputs.items()}, outputs)
                 for i in range(0, n, step)]
        return {k: np.concatenate([p[k] for p in parts]) for k in outputs}

    def _call_once(self, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        request = pb_utils.InferenceRequest(
            model_name=model,
            requested_output_names=list(outputs),
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(to_triton_shape(v))) for k, v in inputs.items()],
        )
        response = request.exec()
        if response.has_error():
            raise ExecutorError(f"{model}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in outputs}

    def encode_text(self, encoder: str, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        return self._call(encoder, {TEXT_INPUT: input_ids}, TEXT_OUTPUTS)

    def denoise(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._call(self.spec.denoiser, inputs, (DENOISER_OUTPUT,))[DENOISER_OUTPUT]

    def decode(self, latent: np.ndarray) -> np.ndarray:
        out = self._call(self.spec.vae_decoder, {VAE_INPUT: latent}, (VAE_OUTPUT,))[VAE_OUTPUT]
        return from_triton_shape(out, 4)

    def model(self, name: str, outputs: tuple[str, ...]) -> BlsModel:
        return BlsModel(self, name, outputs)


class BlsModel:
    """One repository model over BLS with the executors' `run(feeds) -> {output: array}` (the UNet's encoder
    and decoder parts and the shared ControlNet models, for an engine whose executor is bls)."""

    def __init__(self, components: BlsComponents, name: str, outputs: tuple[str, ...]):
        self.components, self.name, self.outputs = components, name, outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.components._call(self.name, feeds, self.outputs)
