"""The engine's `tessera_*` metrics (Triton custom metrics, labelled by model), fed from the engine's step
records, its cost model and each final output. Every metric call is an IPC to the server, so the loop
thread only gathers what changed (no IPC) and a metrics thread applies it; counters advance once per
update with the total since the last one."""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import triton_python_backend_utils as pb_utils

from ..adapters import AdapterCounters
from ..controlnet import ControlCounters
from ..cost import CostModel
from ..engine import Engine
from ..plan import RequestOutput
from ..request import FinishReason

# invalid: bad input; rejected: admission full or not serving; refused: early refusal (deadline cannot be met)
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Update:
    """What changed since the last update, gathered on the loop thread."""

    totals: tuple[tuple[str, int], ...]  # (counter attribute, increment) over the fresh step records
    terms: dict[str, float] | None  # the cost model's terms (None: no new steps)
    mape: float | None
    gaps: tuple[int, float]  # gaps measured and their seconds since the last update
    final: RequestOutput | None
    outcome: str | None = None  # a request answered outside the engine (invalid, rejected, refused)
    adapters: tuple[tuple[str, float], ...] = ()  # (AdapterCounters field, increment) since the last update
    cache: tuple[int, int] | None = None  # the adapter cache's bytes and entries now
    controls: tuple[tuple[str, float], ...] = ()  # (ControlCounters field, increment) since the last update
    resident: tuple[int, int] | None = None  # resident ControlNets' count and bytes now
    served: tuple[tuple[str, float], ...] = ()  # (CostModel.served sum, increment) since the last update


ADAPTER_COUNTERS = {  # AdapterCounters field -> (counter, description)
    "loads": ("tessera_lora_loads_total", "LoRA adapter files read (cache misses that loaded)"),
    "load_failures": ("tessera_lora_load_failures_total", "LoRA adapter loads that failed"),
    "load_bytes": ("tessera_lora_load_bytes_total", "Bytes of LoRA adapters loaded"),
    "load_s": ("tessera_lora_load_seconds_total", "Seconds spent loading LoRA adapters (off the step loop), summed"),
    "cache_hits": ("tessera_lora_cache_hits_total", "Admitted requests' adapters found in memory"),
    "cache_misses": ("tessera_lora_cache_misses_total",
                     "Admitted requests' adapters not in memory (a load started or joined)"),
    "joins": ("tessera_lora_joins_total", "Requests whose adapters joined (bounded asynchronous loading)"),
    "steps_before_join": ("tessera_lora_steps_before_join_total",
                          "Steps run on the base model before a request's adapters joined, summed"),
    "wait_steps": ("tessera_lora_wait_steps_total", "Request-steps sat out at K waiting for adapters still loading"),
    "requests_waited": ("tessera_lora_requests_waited_total", "Requests that waited at K at least once"),
}
CONTROL_COUNTERS = {  # ControlCounters field -> (counter, description)
    "calls": ("tessera_controlnet_calls_total", "ControlNet calls (one per ControlNet per latent size per step)"),
    "loads": ("tessera_controlnet_loads_total", "ControlNets loaded into the service (on demand)"),
    "load_failures": ("tessera_controlnet_load_failures_total", "ControlNet loads that failed"),
    "load_s": ("tessera_controlnet_load_seconds_total", "Seconds spent loading ControlNets (off the step loop)"),
    "cache_hits": ("tessera_controlnet_cache_hits_total", "Admitted requests' ControlNets found resident"),
    "cache_misses": ("tessera_controlnet_cache_misses_total", "Admitted requests' ControlNets not resident"),
    "evictions": ("tessera_controlnet_evictions_total", "ControlNets evicted from the service (LRU)"),
    "wait_steps": ("tessera_controlnet_wait_steps_total", "Request-steps sat out waiting for a ControlNet load"),
    "decoder_wait_s": ("tessera_controlnet_decoder_wait_seconds_total",
                       "Seconds the UNet decoder waited for ControlNet residuals after its encoder finished"),
}
OUTCOMES = ("completed", "degraded", "dropped", "cancelled", "error", "invalid", "rejected", "refused")
STEPS_BUCKETS = [1, 2, 4, 8, 10, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200]
# seconds from arrival to answer: tiny CPU models answer in tens of ms, a drop can come at once, and a
# GPU generation of a large image takes seconds to a minute
DURATION_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300]


class SerialMetric:
    """A Triton custom metric that one thread at a time may update. The Python backend's stub keeps each metric's
    request in one shared-memory slot that every increment replaces, with the GIL released (r24.10 metric.cc,
    SendIncrementRequest): two threads incrementing one metric free the slot the server is still reading, and the
    server crashes (Signal 11 in libtriton_python.so, seen under the cascade's 8-client closed loop)."""

    __slots__ = ("_metric", "_lock")

    def __init__(self, metric, lock: threading.Lock):
        self._metric, self._lock = metric, lock

    def increment(self, value: float) -> None:
        with self._lock:
            self._metric.increment(value)

    def set(self, value: float) -> None:
        with self._lock:
            self._metric.set(value)

    def observe(self, value: float) -> None:
        with self._lock:
            self._metric.observe(value)


class MetricSet:
    """One model's metric families and metrics, labelled with its name (families must outlive their metrics).
    Every metric it makes is a SerialMetric under one lock, so any thread may update any of them."""

    def __init__(self, model: str):
        self.labels = {"model": model}
        self.families: dict[str, pb_utils.MetricFamily] = {}
        self._lock = threading.Lock()

    def family(self, name: str, desc: str, kind) -> pb_utils.MetricFamily:
        if name not in self.families:
            self.families[name] = pb_utils.MetricFamily(name=name, description=desc, kind=kind)
        return self.families[name]

    def metric(self, name: str, desc: str, kind, buckets: list[float] | None = None, **extra) -> SerialMetric:
        labels, family = {**self.labels, **extra}, self.family(name, desc, kind)
        metric = family.Metric(labels=labels) if buckets is None else family.Metric(labels=labels, buckets=buckets)
        return SerialMetric(metric, self._lock)

    def counter(self, name: str, desc: str, **extra) -> SerialMetric:
        return self.metric(name, desc, pb_utils.MetricFamily.COUNTER, **extra)

    def gauge(self, name: str, desc: str, **extra) -> SerialMetric:
        return self.metric(name, desc, pb_utils.MetricFamily.GAUGE, **extra)


class EngineMetrics(MetricSet):
    def __init__(self, model: str, engine: Engine, cost: CostModel, pending: Callable[[], int],
                 controls: Callable[[], ControlCounters] | None = None):
        """`controls`: the ControlNet service's counters (None: the engine serves no ControlNet)."""
        super().__init__(model)
        self.engine, self.cost, self.pending = engine, cost, pending  # pending: read when applied (never stale)
        self.controls = controls
        counter, gauge = self.counter, self.gauge
        self.calls = counter("tessera_denoiser_calls_total", "Denoiser calls")
        self.rows = counter("tessera_denoiser_rows_total", "Rows (latents, patches or tiles) over all denoiser calls")
        self.resolutions = counter("tessera_denoiser_resolutions_total", "Distinct latent resolutions, summed over calls")
        self.requests = counter("tessera_denoiser_requests_total", "Requests, summed over denoiser calls")
        self.steps = counter("tessera_steps_total", "Request-steps run (one request advancing one step)")
        self.engine_steps = counter("tessera_engine_steps_total", "Engine steps")
        self.parallel = counter("tessera_parallel_steps_total",
                                "Request-steps run at degree > 1 over several denoiser workers (denoiser_workers)")
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
        self.cost_terms: dict[str, object] = {}  # term -> gauge, made when first seen (the profile adds degree_*)
        for t in cost.terms():
            self._cost_term(t)
        self.served_sums: dict[str, object] = {}  # CostModel.served sum -> counter, made when first taught
        self._served_seen: dict[str, float] = {}
        self.in_flight = gauge("tessera_in_flight_requests", "Requests accepted and not yet answered")
        self.ready = gauge("tessera_engine_ready", "1 while the engine loop serves; 0 once it has stopped")
        self.ready.set(1)
        self.steps_run = self.metric("tessera_steps_run", "Denoising steps run per answered request (early exit, "
                                     "degrade)", pb_utils.MetricFamily.HISTOGRAM, buckets=STEPS_BUCKETS)
        duration = ("tessera_request_duration_seconds",
                    "End-to-end latency of requests the engine answered, arrival to answer (engine clock), by outcome; "
                    "requests answered at admission (invalid, rejected, refused) are only in tessera_requests_total")
        self.duration = {r.value: self.metric(*duration, pb_utils.MetricFamily.HISTOGRAM, buckets=DURATION_BUCKETS,
                                              outcome=r.value) for r in FinishReason}
        self.saved = {c: counter("tessera_steps_saved_total", "Steps asked for but not run, by cause", cause=c)
                      for c in ("early_exit", "degrade")}
        self.exited = counter("tessera_early_exits_total", "Requests ended early by the entropy rule")
        # LoRA adapters (issue 14): AdapterCounters field -> counter; the cache's size now as gauges
        self.adapter_counters = {f: counter(name, desc) for f, (name, desc) in ADAPTER_COUNTERS.items()}
        self.cache_bytes = gauge("tessera_lora_cache_bytes", "LoRA adapters held in memory, bytes")
        self.cache_entries = gauge("tessera_lora_cache_entries", "LoRA adapters held in memory")
        self._adapters_seen = AdapterCounters()
        # ControlNets (issue 15): ControlCounters field -> counter; the service's residents now as gauges
        self.control_counters = {f: counter(name, desc) for f, (name, desc) in CONTROL_COUNTERS.items()} \
            if controls is not None else {}
        if controls is not None:
            self.resident = gauge("tessera_controlnet_resident", "ControlNets resident in the service")
            self.resident_bytes = gauge("tessera_controlnet_resident_bytes", "Bytes of resident ControlNets")
        self._controls_seen = ControlCounters()
        self._seen_step = 0
        self._updates: queue.SimpleQueue[_Update | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._apply_updates, name="tessera-metrics", daemon=True)
        self._worker.start()

    def _cost_term(self, term: str):
        if term not in self.cost_terms:
            self.cost_terms[term] = self.gauge(
                "tessera_cost_model", "The cost model the deadline policies plan with, by term (seconds; step_* are the "
                "predictor's coefficients, degree_<k>_<cells> the T(size, k) / T(size, 1) table); the simulator can "
                "replay a served engine from these", term=term)
        return self.cost_terms[term]

    def _served_sum(self, name: str):
        if name not in self.served_sums:
            self.served_sums[name] = self.counter(
                "tessera_cost_served_seconds_total", "Seconds behind the cost model's moving averages, summed since "
                "start: <term>_measured_s and <term>_predicted_s (multi_set) or <term>_base_s (degree_<k>_<cells>); "
                "a window's mean term is the ratio of their increments (what the simulator replays)", sum=name)
        return self.served_sums[name]

    # -- updates --------------------------------------------------------------------------------------
    def count(self, outcome: str) -> None:
        """From the execute thread: one request answered outside the engine (applied on the metrics thread)."""
        self._updates.put(_Update((), None, None, (0, 0.0), None, outcome))

    def update(self, final: RequestOutput) -> None:
        """On the loop thread: gather the steps since the last update and `final` (no IPC: the metrics thread
        applies it)."""
        fresh = []
        for r in reversed(self.engine.records):  # newest first: stop at the first record already seen
            if r.step_no < self._seen_step:
                break
            fresh.append(r)
        if fresh:
            self._seen_step = fresh[0].step_no + 1
        gaps = (self.cost.gaps - self._gaps_seen, self.cost.gap_total_s - self._gap_total_seen)
        self._gaps_seen, self._gap_total_seen = self.cost.gaps, self.cost.gap_total_s
        totals = (
            ("engine_steps", len(fresh)),
            ("calls", sum(r.denoiser_calls for r in fresh)),
            ("rows", sum(sum(r.batch_per_call) for r in fresh)),
            ("resolutions", sum(sum(r.resolutions_per_call) for r in fresh)),
            ("requests", sum(sum(r.requests_per_call) for r in fresh)),
            ("steps", sum(len(r.request_ids) for r in fresh)),
            ("mixed", sum(len(set(r.step_indices)) > 1 for r in fresh)),
            ("parallel", sum(d > 1 for r in fresh for d in r.degrees)),
        )
        adapters = self.engine.adapters.counters()
        adapter_deltas = tuple((f, getattr(adapters, f) - getattr(self._adapters_seen, f)) for f in ADAPTER_COUNTERS)
        self._adapters_seen = adapters
        control_deltas, resident = (), None
        if self.controls is not None:
            controls = self.controls()
            control_deltas = tuple((f, getattr(controls, f) - getattr(self._controls_seen, f)) for f in CONTROL_COUNTERS)
            self._controls_seen, resident = controls, (controls.resident, controls.resident_bytes)
        terms = self.cost.terms() if fresh else None  # gauges move only with steps
        served = tuple((k, v - self._served_seen.get(k, 0.0)) for k, v in self.cost.served.items()
                       if v != self._served_seen.get(k))
        self._served_seen = dict(self.cost.served)
        self._updates.put(_Update(totals, terms, self.cost.predictor.mape if fresh else None, gaps, final,
                                  adapters=adapter_deltas, cache=(adapters.cache_bytes, adapters.cache_entries),
                                  controls=control_deltas, resident=resident, served=served))

    def in_flight_changed(self) -> None:
        """From the execute thread: only the in-flight gauge (the step records belong to the loop thread)."""
        self._updates.put(_Update((), None, None, (0, 0.0), None))

    def close(self) -> None:
        """Apply what is queued and stop the metrics thread (later updates are dropped)."""
        self._updates.put(None)
        self._worker.join(timeout=10)

    def _apply_updates(self) -> None:
        while (u := self._updates.get()) is not None:
            try:
                self._apply(u)
            except Exception:  # noqa: BLE001 - metrics never stop serving
                log.exception("[tessera] metrics update failed")

    def _apply(self, u: _Update) -> None:
        for name, n in u.totals:
            if n:
                getattr(self, name).increment(n)
        for field, n in u.adapters:
            if n:
                self.adapter_counters[field].increment(n)
        for field, n in u.controls:
            if n:
                self.control_counters[field].increment(n)
        if u.resident is not None:
            self.resident.set(u.resident[0])
            self.resident_bytes.set(u.resident[1])
        if u.cache is not None:
            self.cache_bytes.set(u.cache[0])
            self.cache_entries.set(u.cache[1])
        if u.terms is not None:
            for term, value in u.terms.items():
                self._cost_term(term).set(value)
        for name, n in u.served:
            self._served_sum(name).increment(n)
        if u.mape is not None:
            self.mape.set(u.mape)
        if u.gaps[0] > 0:
            self.gaps.increment(u.gaps[0])
            self.gap_total.increment(u.gaps[1])
        self.in_flight.set(self.pending())
        if u.outcome is not None:
            self.outcome[u.outcome].increment(1)
        if u.final is not None:
            self._record_final(u.final)

    def _record_final(self, out: RequestOutput) -> None:
        outcome = out.finish_reason.value if out.finish_reason else "error"
        self.outcome[outcome].increment(1)
        if out.arrival_s is not None and out.done_s is not None:  # both on the engine's clock (none: never admitted)
            self.duration[outcome].observe(max(out.done_s - out.arrival_s, 0.0))
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
            self.deadline[(outcome, res)] = self.counter("tessera_deadline_total", "Requests by deadline outcome and size",
                                                          outcome=outcome, resolution=res)
        self.deadline[(outcome, res)].increment(1)
        if out.slack_at_join is not None:
            self._slack_sum += out.slack_at_join
            self._slack_n += 1
            self.slack.set(self._slack_sum / self._slack_n)
