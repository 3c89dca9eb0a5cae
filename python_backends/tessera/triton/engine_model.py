"""The `engine` model: decoupled Python backend hosting the step-level Engine and its loop thread.

`execute` validates each request, submits its items and returns None; the loop answers through each
request's response sender: optional per-step progress (`step`, and `preview` when asked) and exactly one
FINAL response (the images, or an error). gRPC streaming clients call it directly; `txt2img` forwards
plain (HTTP or non-streaming) clients to it. Before the model reports ready, every component is warmed
and the cost model profiled (in `initialize` for the local executor; for BLS, which Triton refuses until
`initialize` has returned, in the model_warmup request `tessera export` writes).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ..config import EngineConfig
from ..cost import CostModel, DegreeTable
from ..decode import make_decoder
from ..engine import Engine
from ..errors import CancelledError, ExecutorError, OverloadedError, RefusedError, ShutdownError
from ..executors.workers import PooledDenoiser
from ..executors.factory import make_addons, make_denoiser, serves_controlnets
from ..faults import inject
from ..fanin import Answer, FanIn
from ..generation import Txt2Img
from ..inputs import parse_request
from ..loop import EngineLoop
from ..options import Executor
from ..plan import RequestOutput
from ..predictor import LatencyPredictor
from ..profile import default_sizes, profile_costs
from ..request import RequestState
from ..placement import make_placer
from ..policies import make_policy
from ..spec import PipelineSpec
from ..wire import ENTRY_INPUT_NAMES, OUTPUT_IMAGE, OUTPUT_PREVIEW, OUTPUT_STEPS, SERVER_HTTP_ENV, STREAM_INPUTS
from .common import input_or_none, parameters, requested, response, setup_logging
from .errors import error_response, triton_error
from .metrics import EngineMetrics

log = logging.getLogger("tessera.triton.engine")
NOT_READY = "tessera_marked_not_ready"  # a backend that does not exist: the marker model fails to load


def _mark_not_ready(server: str, model: str, reason_b64: str) -> None:
    """Load the failing marker, then unload `model`, through the repository API of `server` (host:port)."""
    marker = {"parameters": {"config": json.dumps({"backend": NOT_READY}), "file:1/REASON": reason_b64}}
    for name, body in ((f"{model}_not_ready", marker), (model, {})):
        action = "load" if body else "unload"
        request = urllib.request.Request(f"http://{server}/v2/repository/models/{name}/{action}",
                                         data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=60).close()
        except urllib.error.HTTPError as e:  # the marker's load fails: that is its purpose
            if body is not marker:
                log.error("[tessera] %s: unloading itself failed: %s", model, e.read().decode(errors="replace"))
        except OSError as e:
            log.error("[tessera] %s: repository API unreachable (%s): not marked not ready", model, e)


@dataclass(frozen=True, slots=True)
class _Client:
    request: Any  # pb_utils.InferenceRequest (polled for cancellation)
    sender: Any  # its response sender
    client_id: str  # the client's request id (named in error messages)
    wanted: frozenset[str]  # the outputs it asked for (common.response)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        setup_logging()
        import torch
        from transformers import CLIPTokenizer

        self.name = args["model_name"]
        self.config = config = EngineConfig.from_parameters(parameters(args))
        torch.set_num_threads(config.intra_op_threads)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        repo = Path(args["model_repository"]).parent
        self.spec = PipelineSpec.load(version_dir / "manifest.json")
        if config.executor is Executor.BLS:
            from .bls import BlsComponents

            components = BlsComponents(self.spec)
        else:
            from ..executors.ort import LocalComponents

            components = LocalComponents(self.spec, repo, config.intra_op_threads)
        self.repo = repo
        self.tokenizers = [CLIPTokenizer.from_pretrained(version_dir / d) for d in self.spec.tokenizers]
        self.pipeline = Txt2Img(self.spec, components, self.tokenizers)
        pipeline, denoiser = self.pipeline, make_denoiser(config, self.spec, repo, components)
        self.denoiser = denoiser
        if config.fault_injection:
            pipeline, denoiser = inject(pipeline, denoiser)
            log.warning("[tessera] %s: fault injection is on (testing only)", self.name)
        self.cost = CostModel(LatencyPredictor(), self.spec.vae_scale_factor)  # filled in by the profile
        self.profile_sizes = config.sizes() or default_sizes(self.spec.limits)
        self.cost.degrees = DegreeTable(config.denoiser_workers)  # T(size, k): filled in by the profile
        policy = make_policy(config.policy, config.max_batch, self.cost, config.on_hopeless, config.min_steps,
                             config.round_steps, config.deadline_margin, config.early_refusal, config.denoiser_workers,
                             config.fixed_degree, config.degrees_per_size())
        self.engine = Engine(pipeline, denoiser, policy, cost=self.cost, slo_scale=config.slo_scale,
                             exit_rule=config.exit_rule(), early_exit=bool(config.early_exit),
                             adapters=make_addons(config, self.spec, repo, components),
                             placer=make_placer(config.denoiser_workers, config.placement, self.cost),
                             decoder=make_decoder(config.decode, pipeline, time.monotonic))
        self._controlnets = frozenset(self.spec.controlnets) if serves_controlnets(config, self.spec) else frozenset()
        self.metrics = EngineMetrics(self.name, self.engine, self.cost, pending=lambda: self.loop.pending,
                                     controls=self._control_counters if self._controlnets else None)
        self.fanin = FanIn()
        self.warm = False
        if config.executor is Executor.LOCAL:  # no BLS involved: warm up now, before the model is ready
            self._warm_up()
        self.loop = EngineLoop(self.engine, self._sink, self._is_cancelled, max_in_flight=config.max_in_flight,
                               early_refusal=bool(config.early_refusal), on_dead=self._on_dead).start()
        log.info("[tessera] loaded %s: family=%s %s", self.name, self.spec.family, config)

    def _control_counters(self):
        """The ControlNet service's counters with the executor's calls and decoder wait."""
        calls, wait_s = self.denoiser.counters()
        return replace(self.engine.adapters.controls.counters(), calls=calls, decoder_wait_s=wait_s)

    def _warm_up(self) -> None:
        """Warm every component and profile the cost model, once, before any request is admitted (its
        arrival is stamped after this: start-up is never charged to a request). Over BLS this needs the
        server ready, which it is when engines are loaded after the rest (`tessera serve` does); a plain
        `tritonserver` start loads everything at once and refuses BLS until then: the profile then runs
        in-process on the same ONNX files, and the served terms are learned from the first steps on."""
        if self.warm:
            return
        try:
            self._profile(self.pipeline, self.denoiser)
        except ExecutorError as e:
            if self.config.executor is not Executor.BLS:
                raise
            from ..executors.ort import LocalComponents

            log.warning("[tessera] %s: components unreachable over BLS during start-up (%s); profiling in-process "
                        "(load engines after the other models to warm the served path)", self.name, e)
            local = LocalComponents(self.spec, self.repo, self.config.intra_op_threads)
            pooled = self.config.denoiser_workers > 1  # the workers do not go through BLS: profiled as they are
            self._profile(Txt2Img(self.spec, local, self.tokenizers),
                          self.denoiser if pooled else make_denoiser(self.config, self.spec, self.repo, local))
        self.warm = True

    def _profile(self, pipeline: Txt2Img, denoiser) -> None:
        profile_costs(pipeline, denoiser, self.profile_sizes, self.spec.vae_scale_factor, into=self.cost,
                      max_batch=self.config.max_batch, workers=self.config.denoiser_workers)

    # -- requests -----------------------------------------------------------------------------------
    def execute(self, requests):
        self._warm_up()  # no-op after the first call (the model_warmup request, when configured)
        for request in requests:
            try:
                self._accept(request)
            except Exception:  # noqa: BLE001 - _accept answers every path; this is the last guard
                log.exception("[tessera] %s: accepting a request failed", self.name)
        return None

    def _accept(self, request) -> None:
        sender = request.get_response_sender()
        client = _Client(request, sender, request.request_id() or "", requested(request))
        try:
            tensors = {n: input_or_none(request, n) for n in ENTRY_INPUT_NAMES}
            items = parse_request(tensors, self.spec.limits, self.pipeline.count_tokens, self.engine.adapters.names(),
                                  self._controlnets)
            flags = {n: input_or_none(request, n) for n in STREAM_INPUTS}
            progress, preview = (bool(flags[n] is not None and flags[n].any()) for n in ("progress", "preview"))
        except Exception as e:  # noqa: BLE001 - answered per request
            self.metrics.count("invalid")
            sender.send(error_response(e, client.client_id), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        single = len(items) == 1  # progress and previews are relayed for single-item requests only
        key, ids = self.fanin.open(len(items), client, progress)
        now = time.monotonic()
        for k, (rid, params) in enumerate(zip(ids, items, strict=True)):
            if k and self.fanin.context(rid) is None:  # an earlier item failed: its error answered the request
                self.fanin.refused(key, ids, k)
                return
            try:
                self.loop.submit(RequestState(rid, params, now, progress and single, preview and single))
            except Exception as e:  # noqa: BLE001 - refused, overloaded, not serving, or a failure: answered now
                # Answered once, now; items already submitted are cancelled and only counted.
                self.metrics.count("refused" if isinstance(e, RefusedError) else
                                   "rejected" if isinstance(e, OverloadedError | ShutdownError) else "error")
                live, answer = self.fanin.refused(key, ids, k)
                for submitted in live:
                    self.loop.cancel(submitted)
                if answer:
                    sender.send(error_response(e, client.client_id), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                return
        self.metrics.in_flight_changed()

    def _is_cancelled(self, request_id: str) -> bool:
        client = self.fanin.context(request_id)
        try:
            return client is not None and client.request.is_cancelled()
        except Exception:  # noqa: BLE001
            return False

    def _sink(self, out: RequestOutput) -> None:
        try:
            if (answer := self.fanin.settle(out)) is not None:
                self._send(answer)
        finally:  # metrics never stand between a request and its response (applied on their own thread)
            if out.final:
                self.metrics.update(out)

    def _send(self, answer: Answer) -> None:
        client: _Client = answer.context
        try:
            self._respond(client, answer)
        except Exception as e:  # noqa: BLE001 - a FINAL that could not be built is still a FINAL: INTERNAL
            log.exception("[tessera] responding to %s failed", client.client_id)
            if answer.final:
                client.sender.send(pb_utils.InferenceResponse(error=triton_error(e, client.client_id)),
                                   flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        finally:
            for rid in answer.cancel:  # the rest of this request's items are not needed
                self.loop.cancel(rid)

    def _respond(self, client: _Client, answer: Answer) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if not answer.final:
            out = answer.output
            tensors = [pb_utils.Tensor(OUTPUT_STEPS, np.array([[out.step_index]], np.int32))]
            if out.image is not None:
                tensors.append(pb_utils.Tensor(OUTPUT_PREVIEW, out.image[None]))
            client.sender.send(response(tensors, client.wanted))
        elif answer.images is not None:
            tensors = [pb_utils.Tensor(OUTPUT_IMAGE, answer.images), pb_utils.Tensor(OUTPUT_STEPS, answer.steps)]
            client.sender.send(response(tensors, client.wanted), flags=final)
        else:
            error = answer.error or CancelledError("request cancelled")
            client.sender.send(pb_utils.InferenceResponse(error=triton_error(error, client.client_id)), flags=final)

    def _on_dead(self, error: BaseException) -> None:
        """The loop stopped (every accepted request has been answered): report not ready, for good. Through
        the server's repository API (over HTTP, on a thread of its own: the unload waits for this model's
        finalize) it loads a marker `<name>_not_ready` that cannot load (an unknown backend), then unloads
        this model: an unloaded model alone stops counting against /v2/health/ready within a second, a
        failed one does not, so the server stays not ready until restarted (a load balancer or Kubernetes
        sees it). The same two calls made from the stub (pb_utils.load_model / unload_model) left it hung
        in about one run in three. Needs explicit model control and the server's address (`tessera serve`
        provides both); otherwise only this model is unloaded, if Triton allows it, and
        `tessera_engine_ready` drops to 0."""
        self.metrics.close()  # no metric IPC from another thread from here on
        self.metrics.ready.set(0)
        server = os.environ.get(SERVER_HTTP_ENV)
        if server:
            reason = base64.b64encode(f"engine loop stopped: {type(error).__name__}".encode()).decode()
            threading.Thread(target=_mark_not_ready, args=(server, self.name, reason), daemon=True).start()
            return
        try:
            pb_utils.unload_model(self.name)
        except pb_utils.TritonModelException as e:
            log.error("[tessera] %s: cannot unload itself (%s); only tessera_engine_ready reports it", self.name, e)

    def finalize(self) -> None:
        log.info("[tessera] %s: shutting down (%d in flight)", self.name, self.loop.pending)
        self.loop.stop()
        self.metrics.close()
        self.engine.decoder.close()
        if isinstance(self.denoiser, PooledDenoiser):
            self.denoiser.pool.close()
