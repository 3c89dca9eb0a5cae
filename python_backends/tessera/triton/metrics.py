"""The engine's `tessera_*` metrics (Triton custom metrics, labelled by model), fed from the engine's step
records, its cost model and each final output. Counters advance once per update with the total since the
last one: every metric call is an IPC to the server on the loop thread."""

from __future__ import annotations

import math

import triton_python_backend_utils as pb_utils

from ..cost import CostModel
from ..engine import Engine
from ..plan import RequestOutput
from ..request import FinishReason

# invalid: bad input; rejected: admission full or not serving; refused: early refusal (deadline cannot be met)
OUTCOMES = ("completed", "degraded", "dropped", "cancelled", "error", "invalid", "rejected", "refused")
STEPS_BUCKETS = [1, 2, 4, 8, 10, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200]


class EngineMetrics:
    def __init__(self, model: str, engine: Engine, cost: CostModel):
        self.engine, self.cost = engine, cost
        self.labels = {"model": model}
        self.families: dict[str, pb_utils.MetricFamily] = {}  # families must outlive their metrics
        counter, gauge = self._counter, self._gauge
        self.calls = counter("tessera_denoiser_calls_total", "Denoiser calls")
        self.rows = counter("tessera_denoiser_rows_total", "Rows (latents, patches or tiles) over all denoiser calls")
        self.resolutions = counter("tessera_denoiser_resolutions_total", "Distinct latent resolutions, summed over calls")
        self.requests = counter("tessera_denoiser_requests_total", "Requests, summed over denoiser calls")
        self.steps = counter("tessera_steps_total", "Request-steps run (one request advancing one step)")
        self.engine_steps = counter("tessera_engine_steps_total", "Engine steps")
        self.mixed = counter("tessera_mixed_step_calls_total",
                             "Engine steps whose requests were at different step indices (continuous batching)")
        self.outcome = {k: counter("tessera_requests_total", "Engine requests by outcome", outcome=k) for k in OUTCOMES}
        self.deadline: dict[tuple[str, str], object] = {}  # (outcome, resolution) -> counter, made when first seen
        self.slack = gauge("tessera_slack_at_join_mean",
                           "Mean slack at admission, in isolated-latency units (negative: admitted late)")
        self._slack_sum, self._slack_n = 0.0, 0
        self.mape = gauge("tessera_predictor_mape", "Step-latency predictor: mean abs % error, out of sample")
        self.gap_total = counter("tessera_step_gap_seconds_total", "Loop time between busy engine steps, summed")
        self.gaps = counter("tessera_step_gaps_total", "Gaps between busy engine steps measured")
        self._gaps_seen, self._gap_total_seen = 0, 0.0
        self.cost_terms = {t: gauge("tessera_cost_model", "The cost model the deadline policies plan with, by term "
                                    "(seconds; step_* are the predictor's coefficients); the simulator can replay a "
                                    "served engine from these", term=t) for t in cost.terms()}
        self.in_flight = gauge("tessera_in_flight_requests", "Requests accepted and not yet answered")
        self.ready = gauge("tessera_engine_ready", "1 while the engine loop serves; 0 once it has stopped")
        self.ready.set(1)
        fam = self._family("tessera_steps_run", "Denoising steps run per answered request (early exit, degrade)",
                           pb_utils.MetricFamily.HISTOGRAM)
        self.steps_run = fam.Metric(labels=self.labels, buckets=STEPS_BUCKETS)
        self.saved = {c: counter("tessera_steps_saved_total", "Steps asked for but not run, by cause", cause=c)
                      for c in ("early_exit", "degrade")}
        self.exited = counter("tessera_early_exits_total", "Requests ended early by the entropy rule")
        self._seen_step = 0

    def _family(self, name: str, desc: str, kind) -> pb_utils.MetricFamily:
        if name not in self.families:
            self.families[name] = pb_utils.MetricFamily(name=name, description=desc, kind=kind)
        return self.families[name]

    def _counter(self, name: str, desc: str, **extra):
        return self._family(name, desc, pb_utils.MetricFamily.COUNTER).Metric(labels={**self.labels, **extra})

    def _gauge(self, name: str, desc: str, **extra):
        return self._family(name, desc, pb_utils.MetricFamily.GAUGE).Metric(labels={**self.labels, **extra})

    # -- updates --------------------------------------------------------------------------------------
    def count(self, outcome: str, n: int = 1) -> None:
        self.outcome[outcome].increment(n)

    def record_steps(self) -> None:
        """Counters for the engine steps since the last call; gauges once per call (not per response)."""
        fresh = []
        for r in reversed(self.engine.records):  # newest first: stop at the first record already seen
            if r.step_no < self._seen_step:
                break
            fresh.append(r)
        if not fresh:
            return
        if (mape := self.cost.predictor.mape) is not None:
            self.mape.set(mape)
        for term, value in self.cost.terms().items():
            self.cost_terms[term].set(value)
        if self.cost.gaps > self._gaps_seen:
            self.gaps.increment(self.cost.gaps - self._gaps_seen)
            self.gap_total.increment(self.cost.gap_total_s - self._gap_total_seen)
        self._gaps_seen, self._gap_total_seen = self.cost.gaps, self.cost.gap_total_s
        totals = (
            (self.engine_steps, len(fresh)),
            (self.calls, sum(r.denoiser_calls for r in fresh)),
            (self.rows, sum(sum(r.batch_per_call) for r in fresh)),
            (self.resolutions, sum(sum(r.resolutions_per_call) for r in fresh)),
            (self.requests, sum(sum(r.requests_per_call) for r in fresh)),
            (self.steps, sum(len(r.request_ids) for r in fresh)),
            (self.mixed, sum(len(set(r.step_indices)) > 1 for r in fresh)),
        )
        for metric, n in totals:
            if n:
                metric.increment(n)
        self._seen_step = fresh[0].step_no + 1

    def record_final(self, out: RequestOutput, in_flight: int) -> None:
        self.count(out.finish_reason.value if out.finish_reason else "error")
        self.in_flight.set(in_flight)
        if out.image is not None:
            self.steps_run.observe(out.step_index)
            if saved := max((out.asked_steps or out.step_index) - out.step_index, 0):
                self.saved["early_exit" if out.exited else "degrade"].increment(saved)
            if out.exited:
                self.exited.increment(1)
        self._deadline(out)

    def _deadline(self, out: RequestOutput) -> None:
        if out.finish_reason in (FinishReason.CANCELLED, FinishReason.ERROR) or out.deadline_s in (None, math.inf):
            return
        if out.finish_reason == FinishReason.DROPPED:
            outcome = "dropped"
        else:
            outcome = "met" if out.done_s is not None and out.done_s <= out.deadline_s else "missed"
        res = f"{out.size[0]}x{out.size[1]}" if out.size else "unknown"
        if (outcome, res) not in self.deadline:
            self.deadline[(outcome, res)] = self._counter("tessera_deadline_total", "Requests by deadline outcome and size",
                                                          outcome=outcome, resolution=res)
        self.deadline[(outcome, res)].increment(1)
        if out.slack_at_join is not None:
            self._slack_sum += out.slack_at_join
            self._slack_n += 1
            self.slack.set(self._slack_sum / self._slack_n)
