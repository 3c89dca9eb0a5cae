"""The entry model `txt2img`: one request in, one response out, for plain HTTP and gRPC clients.

It validates each request (the same parse_request as the engine: bad input is answered here with
INVALID_ARG), forwards it unchanged to the decoupled `engine` model over BLS and relays the engine's
final response through the request's response sender. `execute` returns at once, so many requests are
in flight together. BLS in 2.51 does not carry a decoupled response's error code, so engine errors
get their codes back from the error class tag in their message (triton/errors.relayed_error).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from pathlib import Path

from ..inputs import parse_request
from ..spec import PipelineSpec
from ..wire import ENTRY_INPUT_NAMES, OUTPUT_IMAGE, OUTPUT_STEPS
from ..errors import ShutdownError
from .common import (InFlight, Relayed, engine_final, input_or_none, int_param, parameters, requested, response,
                     setup_logging)
from .errors import error_response, relayed_error

log = logging.getLogger("tessera.triton.txt2img")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        setup_logging()
        params = parameters(args)
        self.name = args["model_name"]
        self.engine = params.get("engine", "engine")
        engine_dir = Path(args["model_repository"]).parent / self.engine / "1"
        spec = PipelineSpec.load(engine_dir / "manifest.json")
        from transformers import CLIPTokenizer

        self.limits = spec.limits
        self.tokenizers = [CLIPTokenizer.from_pretrained(engine_dir / d) for d in spec.tokenizers]
        workers = int_param(params, "max_in_flight", 256)
        self.in_flight = InFlight("engine", workers)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tessera-forward")
        log.info("[tessera] loaded %s: forwards to %s (up to %d in flight)", self.name, self.engine, workers)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                tensors = {n: input_or_none(request, n) for n in ENTRY_INPUT_NAMES}
                parse_request(tensors, self.limits, self._count_tokens, adapters=None,
                              controlnets=None)  # names: the engine's
            except Exception as e:  # noqa: BLE001 - answered per request
                sender.send(error_response(e), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            if not self.in_flight.enter():  # overload: answered at once, never queued to time out late
                sender.send(self.in_flight.overloaded(), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            try:  # copy the inputs now: the request object is not used after execute returns
                inputs = [pb_utils.Tensor(t.name(), np.array(t.as_numpy(), copy=True)) for t in request.inputs()]
                self.pool.submit(self._forward, inputs, requested(request), sender)
            except Exception as e:  # noqa: BLE001 - (shutting down) answered here, never left without a response
                self.in_flight.leave()
                sender.send(error_response(e), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _forward(self, inputs, wanted: frozenset[str], sender) -> None:
        try:
            final = engine_final(self.engine, inputs, (OUTPUT_IMAGE, OUTPUT_STEPS))
            if final is None:
                answer = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{self.engine}: finished without an image", pb_utils.TritonError.INTERNAL)
                )
            else:
                answer = response([t for t in final.values() if t is not None], wanted)
        except Relayed as e:
            answer = pb_utils.InferenceResponse(error=relayed_error(str(e)))
        except Exception as e:  # noqa: BLE001 - every request gets its one response
            # BLS itself failed (the engine is not loaded, not ready, or its stub is gone): retry elsewhere
            log.warning("[tessera] %s: forwarding to %s failed: %s", self.name, self.engine, e)
            answer = error_response(ShutdownError(f"{self.engine}: not reachable ({e}); allowed: retry on another "
                                                  "instance"))
        self.in_flight.leave()
        sender.send(answer, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _count_tokens(self, text: str) -> int:
        return max(len(tok(text).input_ids) for tok in self.tokenizers)

    def finalize(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
