"""The entry model `txt2img`: validate, tokenize, run the pipeline, answer with a uint8 image.

Non-decoupled, so plain HTTP clients get one response. Bad input is answered with INVALID_ARG naming
the field; any other failure with INTERNAL; the model never raises from execute.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..errors import ConfigError
from ..generation import Txt2Img
from ..inputs import parse_request
from ..spec import PipelineSpec
from ..wire import ENTRY_INPUT_NAMES, OUTPUT_IMAGE
from .common import error_response, input_or_none, int_param, parameters, setup_logging

log = logging.getLogger("tessera.triton.txt2img")
EXECUTORS = ("bls", "local")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        setup_logging()
        import torch
        from transformers import CLIPTokenizer

        params = parameters(args)
        threads = int_param(params, "intra_op_threads", 1)
        torch.set_num_threads(threads)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.name = args["model_name"]
        self.spec = PipelineSpec.load(version_dir / "manifest.json")
        executor = params.get("executor", "bls")
        if executor == "bls":
            from .bls import BlsComponents

            components = BlsComponents(self.spec)
        elif executor == "local":
            from ..executors.ort import LocalComponents

            components = LocalComponents(self.spec, Path(args["model_repository"]).parent, threads)
        else:
            raise ConfigError(f"{self.name}: executor: unknown executor; allowed {', '.join(EXECUTORS)}, got {executor!r}")
        tokenizers = [CLIPTokenizer.from_pretrained(version_dir / d) for d in self.spec.tokenizers]
        self.runner = Txt2Img(self.spec, components, tokenizers)
        self._metrics()
        lim = self.spec.limits
        log.info(
            "[tessera] loaded %s: family=%s executor=%s sizes %d..%d step %d, steps 1..%d",
            self.name, self.spec.family, executor, lim.min_size, lim.max_size, lim.size_multiple, lim.max_steps,
        )

    def _metrics(self) -> None:
        labels = {"model": self.name}
        self.m_requests = pb_utils.MetricFamily(
            name="tessera_requests_total",
            description="Entry requests by outcome (ok, invalid, error)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.m_slo = pb_utils.MetricFamily(
            name="tessera_slo_total",
            description="Images with a client slo_ms, by whether they finished within it (met, missed)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        # Families must outlive their metrics: keep every family on self.
        self.m_steps_family = pb_utils.MetricFamily(
            name="tessera_steps_executed_total",
            description="Denoising steps executed",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        self.m_steps = self.m_steps_family.Metric(labels=labels)
        self.c_requests = {k: self.m_requests.Metric(labels={**labels, "outcome": k}) for k in ("ok", "invalid", "error")}
        self.c_slo = {k: self.m_slo.Metric(labels={**labels, "outcome": k}) for k in ("met", "missed")}

    def execute(self, requests):
        responses = []
        for request in requests:
            arrival_s = time.monotonic()
            try:
                tensors = {n: input_or_none(request, n) for n in ENTRY_INPUT_NAMES}
                items = parse_request(tensors, self.spec.limits, self.runner.count_tokens)
            except Exception as e:  # noqa: BLE001 - answered per request, never raised
                self.c_requests["invalid"].increment(1)
                responses.append(error_response(e))
                continue
            try:
                images = np.stack([self.runner.generate(p) for p in items])
                self.m_steps.increment(sum(p.num_steps for p in items))
                elapsed_ms = (time.monotonic() - arrival_s) * 1e3
                for p in items:
                    if p.slo_ms is not None:
                        self.c_slo["met" if elapsed_ms <= p.slo_ms else "missed"].increment(1)
                self.c_requests["ok"].increment(1)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT_IMAGE, images)]))
            except Exception as e:  # noqa: BLE001
                log.exception("[tessera] %s: request failed", self.name)
                self.c_requests["error"].increment(1)
                responses.append(error_response(e))
        return responses

    def finalize(self) -> None:
        log.info("[tessera] %s: shutting down", self.name)
