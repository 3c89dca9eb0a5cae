"""A component model (text encoder, denoiser, VAE decoder) running ONNX Runtime inside the Python backend.

Requests whose inputs have identical shapes are concatenated into one ORT call (the dynamic batcher
groups them); others run one by one. Each request gets its own response or error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..executors.ort import OrtModel
from .common import input_or_none, int_param, parameters, setup_logging
from .errors import error_response

log = logging.getLogger("tessera.triton.ort_model")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        setup_logging()
        threads = int_param(parameters(args), "intra_op_threads", 1)
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.name = args["model_name"]
        self.model = OrtModel(path, threads)
        log.info("[tessera] loaded %s: %s (%d intra-op threads)", self.name, path.name, threads)

    def execute(self, requests):
        feeds: list[dict[str, np.ndarray] | Exception] = []
        for request in requests:
            feed = {n: input_or_none(request, n) for n in self.model.input_ranks}
            missing = [n for n, v in feed.items() if v is None]
            feeds.append(ValueError(f"{missing[0]}: missing input") if missing else feed)
        results: list[dict | Exception | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, feed in enumerate(feeds):
            if isinstance(feed, Exception):
                results[i] = feed
            else:
                groups.setdefault(tuple((k, v.shape[1:]) for k, v in feed.items()), []).append(i)
        for idxs in groups.values():
            try:
                batch = {k: np.concatenate([feeds[i][k] for i in idxs]) for k in self.model.input_ranks}
                out = self.model.run(batch)
                start = 0
                for i in idxs:
                    n = next(iter(feeds[i].values())).shape[0]
                    results[i] = {k: v[start : start + n] for k, v in out.items()}
                    start += n
            except Exception as e:  # noqa: BLE001 - one failed group must not fail the others
                log.error("[tessera] %s: ORT call failed: %s", self.name, e)
                for i in idxs:
                    results[i] = e
        responses = []
        for res in results:
            if isinstance(res, Exception):
                responses.append(error_response(res))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in res.items()]))
        return responses
