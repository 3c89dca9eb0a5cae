"""The cascade entry (DiffServe, issue 17): one request in, one image out, from the light or the heavy pipeline.

Per request, on a forwarding thread: (1) the light engine runs it at `light_steps` steps (BLS, decoupled, like the
txt2img facade); (2) the discriminator model scores the light image, P(real) (an image+prompt discriminator
with the prompt's tokens too); (3) the router keeps the light image
when the confidence clears the threshold, else (4) the heavy engine runs the request with what is left of its SLO
(a deadline covers light + discriminator + heavy). The response carries `image`, `step`, `model` ("light" or
"heavy") and `confidence`. With routing `controlled`, the Controller re-chooses the threshold and the heavy
pipeline's in-flight cap from demand every `control_s` seconds (cascade_control.py), exported as metrics; a
deferral that finds the heavy pipeline at its cap, out of time, or refused by the heavy engine for its deadline is
answered with the light image (quality falls before deadlines do). Other routings: static, random, light, heavy.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from ..cascade import ENTRY_PARAMETERS, CascadeSettings, DeferralProfile, Route, Router
from ..cascade_control import Controller, ServiceCosts
from ..errors import (ConfigError, DeadlineUnreachableError, InvalidInputError, OverloadedError, RequestFailedError,
                      ShutdownError, from_message)
from ..inputs import parse_request
from ..options import DiscriminatorInput, Routing
from ..tokenizer import padded_ids
from ..spec import PipelineSpec
from ..wire import (DISCRIMINATOR_IDS, DISCRIMINATOR_IMAGE, DISCRIMINATOR_OUTPUT, ENTRY_INPUT_NAMES, OUTPUT_CONFIDENCE,
                    OUTPUT_IMAGE, OUTPUT_MODEL, OUTPUT_STEPS)
from .common import (InFlight, Relayed, engine_final, input_or_none, int_param, parameters, requested, response,
                     setup_logging)
from .errors import error_response, relayed_error
from .metrics import MetricSet

log = logging.getLogger("tessera.triton.cascade")
FALLBACK = (DeadlineUnreachableError, OverloadedError)  # heavy engine answers after which the light image serves


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        setup_logging()
        params = parameters(args)
        self.name = args["model_name"]
        missing = [k for k in ("light", "heavy", "discriminator") if k not in params]
        if missing:
            raise ConfigError(f"{missing[0]}: required parameter of the cascade entry (a model name)")
        self.light, self.heavy, self.discriminator = params["light"], params["heavy"], params["discriminator"]
        self.settings = CascadeSettings.from_parameters(params, ENTRY_PARAMETERS)
        self.router = Router(self.settings)
        repo = Path(args["model_repository"]).parent
        light_dir = repo / self.light / "1"
        spec = PipelineSpec.load(light_dir / "manifest.json")
        from transformers import CLIPTokenizer

        self.limits = spec.limits
        self.tokenizers = [CLIPTokenizer.from_pretrained(light_dir / d) for d in spec.tokenizers]
        self.controller, self.disc_inputs = None, DiscriminatorInput.IMAGE
        if self.router.scores:
            path = repo / self.discriminator / "1" / "discriminator.json"
            if not path.exists():
                raise ConfigError(f"discriminator: {path} is missing (its training record and deferral profile; add "
                                  "the model with tessera cascade)")
            record = json.loads(path.read_text())
            self.disc_inputs = DiscriminatorInput.parse("discriminator inputs", record.get("inputs", "image"))
            if self.disc_inputs is DiscriminatorInput.IMAGE_PROMPT:
                self._check_tokenizer(record)
        if self.settings.routing is Routing.CONTROLLED:
            try:
                costs = ServiceCosts(float(params["light_s"]), float(params["heavy_s"]))
                cores = float(params.get("cores", os.cpu_count() or 1))
                light_max, heavy_max = (float(params[k]) if k in params else None
                                        for k in ("light_max_cores", "heavy_max_cores"))
            except (KeyError, ValueError) as e:
                raise ConfigError(f"light_s, heavy_s, cores, light_max_cores, heavy_max_cores: numbers (seconds per "
                                  f"request alone; cores); light_s and heavy_s required for routing controlled, got "
                                  f"{params.get('light_s')!r}, {params.get('heavy_s')!r}, {params.get('cores')!r}, "
                                  f"{params.get('light_max_cores')!r}, {params.get('heavy_max_cores')!r}") from e
            self.controller = Controller(DeferralProfile.from_json(record["profile"]), costs, cores,
                                         self.settings.control_s, start_threshold=self.settings.threshold,
                                         light_max=light_max, heavy_max=heavy_max)
        self._published = -1  # the controller decisions the gauges show
        limit = int_param(params, "max_in_flight", 256)
        self.in_flight = InFlight(self.name, limit)
        self.heavy_in_flight = 0
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="tessera-cascade")
        self._metrics()
        log.info("[tessera] loaded %s: cascade %s -> %s by %s (routing %s)", self.name, self.light, self.heavy,
                 self.discriminator, self.settings.routing)

    def _check_tokenizer(self, record: dict) -> None:
        """An image+prompt discriminator reads token ids: the light pipeline's tokenizer must be the one it was
        trained with (vocabulary size and padding id, recorded by the trainer)."""
        tok = self.tokenizers[0]
        want = record.get("tokenizer") or {}
        if "vocab" not in want or "pad_id" not in want:
            raise ConfigError("discriminator: its record (discriminator.json) has no tokenizer.vocab / tokenizer.pad_id; "
                              "allowed: a record written by tessera train-discriminator --inputs image+prompt")
        if (len(tok), tok.pad_token_id) != (want["vocab"], want["pad_id"]):
            raise ConfigError(f"discriminator: trained on a {want['vocab']}-token vocabulary padded with id "
                              f"{want['pad_id']}, the light pipeline {self.light} tokenizes with {len(tok)} tokens "
                              f"padded with id {tok.pad_token_id}; allowed: a discriminator trained with this light "
                              "pipeline's tokenizer")

    def _metrics(self) -> None:
        self.metrics = MetricSet(self.name)
        gauge = self.metrics.gauge
        self.answers = {(m, r): self.metrics.counter("tessera_cascade_answers_total", "Cascade answers by the pipeline "
                                                     "that made the image and why", pipeline=m, reason=r.replace(" ", "_"))
                        for m, r in (("light", "confident"), ("light", "light only"), ("light", "random"),
                                     ("light", "heavy at its cap"), ("light", "heavy out of time"), ("light", "heavy refused"),
                                     ("heavy", "below threshold"), ("heavy", "random"), ("heavy", "heavy only"))}
        self.g_threshold = gauge("tessera_cascade_threshold", "The threshold on P(real) in force")
        self.g_demand = gauge("tessera_cascade_demand_rps", "The controller's demand estimate (moving average)")
        self.g_deferral = gauge("tessera_cascade_expected_deferral", "f(threshold): the profile's deferred share")
        self.g_heavy_cap = gauge("tessera_cascade_heavy_cap", "Deferred requests allowed in flight (Little's law)")
        self.g_light_cores = gauge("tessera_cascade_light_cores", "Cores the controller's plan gives the light pipeline")
        self.g_heavy_cores = gauge("tessera_cascade_heavy_cores", "Cores the controller's plan gives the heavy pipeline")
        self.g_solve = gauge("tessera_cascade_solve_ms", "The last MILP's solve time, ms")
        self.g_feasible = gauge("tessera_cascade_feasible", "1 when the last plan met the demand, 0 when overloaded")
        self.g_light_cap = gauge("tessera_cascade_light_cap", "Light requests in flight at the plan's latency (Little's "
                                 "law; reported, not enforced: the light engine's max_batch bounds it)")
        self.g_threshold.set(self.settings.threshold)
        if self.controller is not None:
            self._publish()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                tensors = {n: input_or_none(request, n) for n in ENTRY_INPUT_NAMES}
                items = parse_request(tensors, self.limits, self._count_tokens, adapters=None, controlnets=None)
                if len(items) != 1:
                    raise InvalidInputError("prompt", "batch size", "one image per cascade request", len(items))
            except Exception as e:  # noqa: BLE001 - answered per request
                sender.send(error_response(e), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            slo_ms, t0 = items[0].slo_ms, time.monotonic()
            plan = self.controller.arrive(slo_ms / 1e3 if slo_ms else None) if self.controller is not None else None
            if not self.in_flight.enter():  # demand counted above all the same: the controller must see overload
                sender.send(self.in_flight.overloaded(), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            try:
                arrays = {t.name(): np.array(t.as_numpy(), copy=True) for t in request.inputs()}
                # the prompt's tokens for a discriminator that reads them, made here on the execute thread (a fast
                # tokenizer keeps state: the forwarding threads must not share it)
                ids = (padded_ids(self.tokenizers[0], [items[0].prompt])
                       if self.disc_inputs is DiscriminatorInput.IMAGE_PROMPT else None)
                self.pool.submit(self._serve, arrays, ids, requested(request), slo_ms, plan, sender, t0)
            except Exception as e:  # noqa: BLE001 - (shutting down) answered here, never left without a response
                self.in_flight.leave()
                sender.send(error_response(e), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _serve(self, arrays: dict[str, np.ndarray], ids: np.ndarray | None, wanted: frozenset[str], slo_ms: int | None, plan,
               sender, t0: float) -> None:
        """One request, arrived at t0 (monotonic) under `plan` (None: not controlled): every exit sends its one
        response."""
        try:
            answer = response(self._cascade(arrays, ids, slo_ms, plan, t0), wanted)
        except Relayed as e:
            answer = pb_utils.InferenceResponse(error=relayed_error(str(e)))
        except Exception as e:  # noqa: BLE001 - every request gets its one response
            log.warning("[tessera] %s: %s", self.name, e)
            answer = error_response(e)
        self.in_flight.leave()
        sender.send(answer, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _cascade(self, arrays, ids, slo_ms, plan, t0):
        threshold, heavy_cap = self.settings.threshold, None
        if plan is not None:
            threshold, heavy_cap = plan.threshold, plan.heavy_cap
            self._publish()
        light = confidence = None
        if self.router.runs_light:
            light = self._engine(self.light, {**arrays, "steps": np.full_like(arrays["steps"], self.settings.light_steps)})
            if self.router.scores:
                confidence = self._score(light[0], ids)
        route = self.router.route(confidence, threshold)
        if route.defer and light is not None:
            route = self._admit_heavy(route, heavy_cap)
        if not route.defer:
            return self._answer(light, "light", route, confidence)
        try:
            return self._defer(arrays, slo_ms, t0, light, route, confidence)
        finally:
            if light is not None:  # the slot _admit_heavy took
                with self.lock:
                    self.heavy_in_flight -= 1

    def _defer(self, arrays, slo_ms, t0, light, route: Route, confidence):
        """(4) The heavy engine, with what is left of the SLO; the light image if it is out of time or refused."""
        feeds = dict(arrays)
        if slo_ms:
            left = int(slo_ms - 1e3 * (time.monotonic() - t0))
            if left <= 0 and light is not None:
                return self._answer(light, "light", Route(False, "heavy out of time"), confidence)
            feeds["slo_ms"] = np.full_like(arrays["slo_ms"], max(left, 1))
        try:
            heavy = self._engine(self.heavy, feeds)
        except Relayed as e:
            cls = from_message(str(e)) or Exception
            if light is None or not issubclass(cls, FALLBACK):
                raise
            reason = "heavy refused" if issubclass(cls, OverloadedError) else "heavy out of time"
            return self._answer(light, "light", Route(False, reason), confidence)
        return self._answer(heavy, "heavy", route, confidence)

    def _admit_heavy(self, route: Route, cap: int | None) -> Route:
        """A deferral takes a heavy slot, unless the controller's cap is reached (then the light image serves)."""
        with self.lock:
            if cap is not None and self.heavy_in_flight >= cap:
                return Route(False, "heavy at its cap")
            self.heavy_in_flight += 1
        return route

    def _publish(self) -> None:
        """The controller's latest plan to the gauges, once per decision (never an older plan over a newer one)."""
        with self.controller.lock:
            decided = len(self.controller.history)
            plan = self.controller.plan
        with self.lock:
            if decided == self._published:
                return
            self._published = decided
            self.g_threshold.set(plan.threshold)
            self.g_demand.set(plan.demand_rps)
            self.g_deferral.set(plan.deferral)
            self.g_heavy_cap.set(plan.heavy_cap)
            self.g_light_cap.set(plan.light_cap)
            self.g_light_cores.set(plan.light_cores)
            self.g_heavy_cores.set(plan.heavy_cores)
            self.g_solve.set(plan.solve_ms)
            self.g_feasible.set(1 if plan.feasible else 0)

    def _answer(self, result, model: str, route: Route, confidence: float | None):
        image, steps = result
        self.answers[(model, route.reason)].increment(1)
        return [
            pb_utils.Tensor(OUTPUT_IMAGE, image), pb_utils.Tensor(OUTPUT_STEPS, steps),
            pb_utils.Tensor(OUTPUT_MODEL, np.array([[model.encode()]], dtype=np.object_)),
            pb_utils.Tensor(OUTPUT_CONFIDENCE, np.array([[-1.0 if confidence is None else confidence]], dtype=np.float32)),
        ]

    def _engine(self, engine: str, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The final image and steps of one request on a decoupled engine; Relayed on its error answer."""
        try:
            final = engine_final(engine, [pb_utils.Tensor(k, v) for k, v in arrays.items()], (OUTPUT_IMAGE, OUTPUT_STEPS))
        except Relayed:
            raise
        except Exception as e:  # noqa: BLE001 - BLS itself failed (not loaded, not ready, stub gone), as txt2img
            raise ShutdownError(f"{engine}: not reachable ({e}); allowed: retry on another instance") from e
        if final is None:
            raise RequestFailedError(f"{engine}: finished without an image")
        steps = final[OUTPUT_STEPS]
        return final[OUTPUT_IMAGE].as_numpy().copy(), (steps.as_numpy().copy() if steps is not None
                                                       else np.zeros((1, 1), np.int32))

    def _score(self, image: np.ndarray, ids: np.ndarray | None) -> float:
        """The discriminator's confidence in the light image (with the prompt's tokens `ids` when it reads them)."""
        inputs = [pb_utils.Tensor(DISCRIMINATOR_IMAGE, np.ascontiguousarray(image))]
        if ids is not None:
            inputs.append(pb_utils.Tensor(DISCRIMINATOR_IDS, ids))
        response = pb_utils.InferenceRequest(model_name=self.discriminator, requested_output_names=[DISCRIMINATOR_OUTPUT],
                                             inputs=inputs).exec()
        if response.has_error():
            raise Relayed(f"{self.discriminator}: {response.error().message()}")
        return float(pb_utils.get_output_tensor_by_name(response, DISCRIMINATOR_OUTPUT).as_numpy().reshape(-1)[0])

    def _count_tokens(self, text: str) -> int:
        return max(len(tok(text).input_ids) for tok in self.tokenizers)

    def finalize(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
