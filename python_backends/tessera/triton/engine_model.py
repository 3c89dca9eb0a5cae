"""The `engine` model: decoupled Python backend hosting the step-level Engine and its loop thread.

`execute` validates each request, submits it and returns None; the loop answers through each request's
response sender: optional per-step progress (`step`, and `preview` when asked) and exactly one FINAL
response (the image, or an error). gRPC streaming clients call it directly; `txt2img` forwards plain
(HTTP or non-streaming) clients to it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..config import EngineConfig
from ..engine import DeadlineUnreachableError, Engine, FinishReason, RequestOutput, RequestState
from ..errors import InvalidInputError
from ..executors.factory import make_denoiser
from ..generation import Txt2Img
from ..inputs import parse_request
from ..loop import EngineLoop, OverloadedError, ShutdownError
from ..scheduler import make_policy
from ..spec import PipelineSpec
from ..wire import ENTRY_INPUT_NAMES, OUTPUT_IMAGE, OUTPUT_STEPS, STREAM_INPUTS
from .common import input_or_none, parameters, setup_logging

log = logging.getLogger("tessera.triton.engine")


def triton_error(exc: BaseException | None, reason: FinishReason | None, request_id: str = "") -> pb_utils.TritonError:
    """The error response for a request. gRPC streams carry only the message, so the client's request
    id is appended (`[request id: X]`) for streaming clients to match errors to requests."""
    tag = f" [request id: {request_id}]" if request_id else ""
    if reason == FinishReason.CANCELLED:
        return pb_utils.TritonError("request cancelled" + tag, pb_utils.TritonError.CANCELLED)
    if isinstance(exc, InvalidInputError):
        return pb_utils.TritonError(str(exc) + tag, pb_utils.TritonError.INVALID_ARG)
    if isinstance(exc, OverloadedError | ShutdownError | DeadlineUnreachableError):
        return pb_utils.TritonError(str(exc) + tag, pb_utils.TritonError.UNAVAILABLE)
    return pb_utils.TritonError(f"{type(exc).__name__}: {exc}{tag}", pb_utils.TritonError.INTERNAL)


@dataclass
class Ticket:
    """One Triton request: `size` engine requests (its batch items) answered together."""

    request: object
    sender: object
    size: int
    client_id: str
    progress: bool
    slo_ms: list[int | None]
    images: dict[int, np.ndarray] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)  # steps run per item
    failed: bool = False  # its one FINAL response (an error) is already sent
    finals: int = 0  # items that have left the engine


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        setup_logging()
        import torch
        from transformers import CLIPTokenizer

        self.name = args["model_name"]
        self.config = EngineConfig.from_parameters(parameters(args))
        torch.set_num_threads(self.config.intra_op_threads)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        repo = Path(args["model_repository"]).parent
        self.spec = PipelineSpec.load(version_dir / "manifest.json")
        if self.config.executor == "bls":
            from .bls import BlsComponents

            components = BlsComponents(self.spec)
        else:
            from ..executors.ort import LocalComponents

            components = LocalComponents(self.spec, repo, self.config.intra_op_threads)
        tokenizers = [CLIPTokenizer.from_pretrained(version_dir / d) for d in self.spec.tokenizers]
        self.pipeline = Txt2Img(self.spec, components, tokenizers)
        denoiser = make_denoiser(self.config, self.spec, repo, components)
        from ..predictor import LatencyPredictor
        from ..profile import default_sizes, profile_costs
        from ..scheduler import CostModel

        sizes = self.config.sizes() or default_sizes(self.spec.limits)
        # Filled in by the start-up profile on the loop thread, before the first request is admitted.
        self.cost = CostModel(LatencyPredictor(), self.spec.vae_scale_factor)
        prepare = lambda: profile_costs(self.pipeline, denoiser, sizes, self.spec.vae_scale_factor,  # noqa: E731
                                        into=self.cost, max_batch=self.config.max_batch)
        policy = make_policy(
            self.config.policy, max_batch=self.config.max_batch, cost=self.cost, on_hopeless=self.config.on_hopeless,
            min_steps=self.config.min_steps, round_steps=self.config.round_steps, margin=self.config.deadline_margin,
        )
        self.engine = Engine(self.pipeline, denoiser, policy, cost=self.cost, slo_scale=self.config.slo_scale,
                             exit_rule=self.config.exit_rule(), early_exit=self.config.early_exit == "on")
        self.tickets: dict[str, Ticket] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self._metrics()
        if self.config.executor == "local":  # no BLS involved: profile now, before serving
            prepare()
            prepare = None
        self.loop = EngineLoop(self.engine, self._sink, self._is_cancelled,
                               max_in_flight=self.config.max_in_flight, prepare=prepare).start()
        log.info("[tessera] loaded %s: family=%s %s", self.name, self.spec.family, self.config)

    # -- metrics ------------------------------------------------------------------------------------
    def _metrics(self) -> None:
        labels = {"model": self.name}
        self.families = {}

        def counter(name: str, desc: str, **extra):
            fam = self.families.get(name) or pb_utils.MetricFamily(name=name, description=desc,
                                                                    kind=pb_utils.MetricFamily.COUNTER)
            self.families[name] = fam  # families must outlive their metrics
            return fam.Metric(labels={**labels, **extra})

        self.m_calls = counter("tessera_denoiser_calls_total", "Denoiser calls")
        self.m_rows = counter("tessera_denoiser_rows_total", "Rows (latents, patches or tiles) over all denoiser calls")
        self.m_res = counter("tessera_denoiser_resolutions_total", "Distinct latent resolutions, summed over calls")
        self.m_reqs = counter("tessera_denoiser_requests_total", "Requests, summed over denoiser calls")
        self.m_steps = counter("tessera_steps_total", "Request-steps run (one request advancing one step)")
        self.m_engine_steps = counter("tessera_engine_steps_total", "Engine steps")
        self.m_mixed = counter("tessera_mixed_step_calls_total",
                               "Engine steps whose requests were at different step indices (continuous batching)")
        self.m_outcome = {
            k: counter("tessera_requests_total", "Engine requests by outcome", outcome=k)
            for k in ("completed", "degraded", "dropped", "cancelled", "error", "invalid", "rejected")
        }
        self.counter = counter
        self.m_deadline: dict[tuple[str, str], object] = {}  # (outcome, resolution) -> metric
        self.families["tessera_slack_at_join_mean"] = pb_utils.MetricFamily(
            name="tessera_slack_at_join_mean", kind=pb_utils.MetricFamily.GAUGE,
            description="Mean slack at admission, in isolated-latency units (negative: admitted late)")
        self.m_slack = self.families["tessera_slack_at_join_mean"].Metric(labels=labels)
        self._slack_sum, self._slack_n = 0.0, 0
        self.families["tessera_predictor_mape"] = pb_utils.MetricFamily(
            name="tessera_predictor_mape", description="Step-latency predictor: mean abs % error, out of sample",
            kind=pb_utils.MetricFamily.GAUGE)
        self.m_mape = self.families["tessera_predictor_mape"].Metric(labels=labels)
        self.m_gap_total = counter("tessera_step_gap_seconds_total", "Loop time between busy engine steps, summed")
        self.m_gaps = counter("tessera_step_gaps_total", "Gaps between busy engine steps measured")
        self._gaps_seen, self._gap_total_seen = 0, 0.0
        self.families["tessera_cost_model"] = pb_utils.MetricFamily(
            name="tessera_cost_model", kind=pb_utils.MetricFamily.GAUGE,
            description="The cost model the deadline policies plan with, by term (seconds; step_* are the "
                        "predictor's coefficients); the simulator can replay a served engine from these")
        self.m_cost = {t: self.families["tessera_cost_model"].Metric(labels={**labels, "term": t})
                       for t in self.cost.terms()}
        self.families["tessera_in_flight_requests"] = pb_utils.MetricFamily(
            name="tessera_in_flight_requests", description="Requests accepted and not yet answered",
            kind=pb_utils.MetricFamily.GAUGE)
        self.m_in_flight = self.families["tessera_in_flight_requests"].Metric(labels=labels)
        self._seen_records = 0
        self.families["tessera_steps_run"] = pb_utils.MetricFamily(
            name="tessera_steps_run", description="Denoising steps run per answered request (early exit, degrade)",
            kind=pb_utils.MetricFamily.HISTOGRAM)
        self.m_steps_run = self.families["tessera_steps_run"].Metric(
            labels=labels, buckets=[1, 2, 4, 8, 10, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200])
        self.m_saved = counter("tessera_steps_saved_total", "Steps asked for but not run, by cause",
                               cause="early_exit")
        self.m_saved_degrade = counter("tessera_steps_saved_total", "Steps asked for but not run, by cause",
                                       cause="degrade")
        self.m_exited = counter("tessera_early_exits_total", "Requests ended early by the entropy rule")

    def _record_metrics(self) -> None:
        fresh = []
        for r in reversed(self.engine.records):  # newest first: stop at the first record already seen
            if r.step_no < self._seen_records:
                break
            fresh.append(r)
        if not fresh:  # gauges move only with steps: one update per step, not per response (each is an IPC)
            return
        mape = self.cost.predictor.mape
        if mape is not None:
            self.m_mape.set(mape)
        for term, value in self.cost.terms().items():
            self.m_cost[term].set(value)
        if self.cost.gaps > self._gaps_seen:
            self.m_gaps.increment(self.cost.gaps - self._gaps_seen)
            self.m_gap_total.increment(self.cost.gap_total_s - self._gap_total_seen)
        self._gaps_seen, self._gap_total_seen = self.cost.gaps, self.cost.gap_total_s
        # One increment per counter for all the steps since the last update (each is an IPC on the loop
        # thread; per step, an image-fcfs request answered after 20 steps cost ~120 of them).
        totals = (
            (self.m_engine_steps, len(fresh)),
            (self.m_calls, sum(r.denoiser_calls for r in fresh)),
            (self.m_rows, sum(sum(r.batch_per_call) for r in fresh)),
            (self.m_res, sum(sum(r.resolutions_per_call) for r in fresh)),
            (self.m_reqs, sum(sum(r.requests_per_call) for r in fresh)),
            (self.m_steps, sum(len(r.request_ids) for r in fresh)),
            (self.m_mixed, sum(len(set(r.step_indices)) > 1 for r in fresh)),
        )
        for metric, n in totals:
            if n:
                metric.increment(n)
        self._seen_records = self.engine.step_no

    # -- requests -----------------------------------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            client_id = request.request_id() or ""
            try:
                tensors = {n: input_or_none(request, n) for n in ENTRY_INPUT_NAMES}
                items = parse_request(tensors, self.spec.limits, self.pipeline.count_tokens)
                flags = {n: input_or_none(request, n) for n in STREAM_INPUTS}
                progress = bool(flags["progress"] is not None and flags["progress"].any())
                preview = bool(flags["preview"] is not None and flags["preview"].any())
            except Exception as e:  # noqa: BLE001 - answered per request
                self.m_outcome["invalid"].increment(1)
                sender.send(pb_utils.InferenceResponse(error=triton_error(e, None, client_id)),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            base = f"r{next(self.ids)}"
            now = time.monotonic()
            with self.lock:
                self.tickets[base] = Ticket(request, sender, len(items), client_id, progress and len(items) == 1,
                                            [p.slo_ms for p in items])
            submitted = 0
            self.m_in_flight.set(self.loop.pending + len(items))
            try:
                for k, params in enumerate(items):
                    self.loop.submit(RequestState(f"{base}/{k}", params, now, progress, preview))
                    submitted += 1
            except (OverloadedError, ShutdownError) as e:
                # Answered once, now; items already submitted are cancelled and only counted.
                self.m_outcome["rejected"].increment(1)
                with self.lock:
                    ticket = self.tickets[base]
                    ticket.failed, ticket.size = True, submitted
                    if submitted == 0:
                        self.tickets.pop(base)
                for k in range(submitted):
                    self.loop.cancel(f"{base}/{k}")
                sender.send(pb_utils.InferenceResponse(error=triton_error(e, None, client_id)),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _is_cancelled(self, request_id: str) -> bool:
        ticket = self.tickets.get(request_id.split("/")[0])
        try:
            return ticket is not None and not ticket.failed and ticket.request.is_cancelled()
        except Exception:  # noqa: BLE001
            return False

    def _sink(self, out: RequestOutput) -> None:
        try:
            self._answer(out)
        finally:  # metrics never stand between a request and its response
            try:
                self._record_metrics()
                if out.final:
                    self.m_outcome[out.finish_reason.value if out.finish_reason else "error"].increment(1)
                    self._steps_metrics(out)
                    self.m_in_flight.set(self.loop.pending)
                    self._deadline_metrics(out)
            except Exception:  # noqa: BLE001
                log.exception("[tessera] metrics update failed for %s", out.request_id)

    def _answer(self, out: RequestOutput) -> None:
        base, k = out.request_id.split("/")
        with self.lock:
            ticket = self.tickets.get(base)
        if ticket is None:
            return
        if not out.final:
            if ticket.progress and not ticket.failed:
                tensors = [pb_utils.Tensor(OUTPUT_STEPS, np.array([[out.step_index]], np.int32))]
                if out.image is not None:
                    tensors.append(pb_utils.Tensor("preview", out.image[None]))
                ticket.sender.send(pb_utils.InferenceResponse(tensors))
            return
        ticket.finals += 1
        if not ticket.failed and out.finish_reason not in (FinishReason.COMPLETED, FinishReason.DEGRADED):
            ticket.failed = True
            ticket.sender.send(pb_utils.InferenceResponse(error=triton_error(out.error, out.finish_reason,
                                                                             ticket.client_id)),
                               flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            for other in range(ticket.size):  # the rest of this request's items are not needed
                if other != int(k) and other not in ticket.images:
                    self.loop.cancel(f"{base}/{other}")
        elif not ticket.failed:
            ticket.images[int(k)] = out.image
            ticket.steps[int(k)] = out.step_index
            if len(ticket.images) == ticket.size:
                images = np.stack([ticket.images[i] for i in range(ticket.size)])
                steps = np.array([[ticket.steps[i]] for i in range(ticket.size)], np.int32)
                ticket.sender.send(
                    pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT_IMAGE, images),
                                                pb_utils.Tensor(OUTPUT_STEPS, steps)]),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
        if ticket.finals >= ticket.size:
            with self.lock:
                self.tickets.pop(base, None)

    def _steps_metrics(self, out: RequestOutput) -> None:
        if out.image is None:
            return
        self.m_steps_run.observe(out.step_index)
        saved = max((out.asked_steps or out.step_index) - out.step_index, 0)
        if saved:
            (self.m_saved if out.exited else self.m_saved_degrade).increment(saved)
        if out.exited:
            self.m_exited.increment(1)

    def _deadline_metrics(self, out: RequestOutput) -> None:
        if out.finish_reason in (FinishReason.CANCELLED, FinishReason.ERROR) or out.deadline_s is None:
            return
        if out.deadline_s == float("inf"):
            return
        if out.finish_reason == FinishReason.DROPPED:
            outcome = "dropped"
        else:
            outcome = "met" if out.done_s is not None and out.done_s <= out.deadline_s else "missed"
        res = f"{out.size[0]}x{out.size[1]}" if out.size else "unknown"
        key = (outcome, res)
        if key not in self.m_deadline:
            self.m_deadline[key] = self.counter("tessera_deadline_total", "Requests by deadline outcome and size",
                                                outcome=outcome, resolution=res)
        self.m_deadline[key].increment(1)
        if out.slack_at_join is not None:
            self._slack_sum += out.slack_at_join
            self._slack_n += 1
            self.m_slack.set(self._slack_sum / self._slack_n)

    def finalize(self) -> None:
        log.info("[tessera] %s: shutting down (%d in flight)", self.name, self.loop.pending)
        self.loop.stop()
