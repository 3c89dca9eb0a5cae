"""Start-up profile: measure join, step and finish costs on this host, fit the latency predictor and
return the CostModel that deadlines (k x isolated latency) and the deadline policies use."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import statistics
import tempfile
import time
from pathlib import Path

from .request import RequestState
from .predictor import BatchShape, LatencyPredictor
from .request import GenerationParams
from .cost import CostModel, DegreeTable

log = logging.getLogger(__name__)


def default_sizes(limits) -> list[tuple[int, int]]:
    """A few served sizes spanning the range: min, 2x min, and (if allowed) 4x min squares plus one
    non-square size."""
    lo, hi = limits.min_size, limits.max_size
    sides = [s for s in (lo, 2 * lo, 4 * lo) if s <= hi]
    sizes = [(s, s) for s in sides]
    if 2 * lo <= hi:
        sizes.append((lo, 2 * lo))
    return sizes


@contextlib.contextmanager
def host_lock(path: Path | None = None):
    """One start-up profile at a time on this host: Triton loads models in parallel, and engines timing
    themselves side by side on shared cores measured each other (docs/architecture.md)."""
    path = path or Path(tempfile.gettempdir()) / "tessera-profile.lock"
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def profile_costs(pipeline, denoiser, sizes: list[tuple[int, int]], vae_factor: int, repeats: int = 3,
                  clock=time.perf_counter, into: CostModel | None = None, max_batch: int = 1, workers: int = 1) -> CostModel:
    """Profile and return the CostModel; with `into`, fill that (shared) one in place. `max_batch`: the
    most requests a served step may hold; one untimed step of that many of the largest size runs first.
    `workers` > 1: the denoiser places calls on that many workers (executors/workers.py); T(size, k) is
    profiled too (profile_degrees)."""
    with host_lock():
        cost = _profile(pipeline, denoiser, sizes, vae_factor, repeats, clock, into, max_batch)
        cost.degrees = profile_degrees(pipeline, denoiser, sizes, vae_factor, workers, max(repeats, 7), clock)
        return cost


def profile_degrees(pipeline, denoiser, sizes, vae_factor: int, workers: int, repeats: int = 7,
                    clock=time.perf_counter, times: dict | None = None) -> DegreeTable:
    """TetriServe's start-up cost table: one request alone per size at degree 1 and at every power of two up to
    `workers` (the first workers), after one untimed call each, in `repeats` interleaved rounds (one call per
    degree a round: a slow spell on the shared host hits every degree alike); kept as the median over rounds of
    T(k) / T(1) per size. `times`, if given, receives the median seconds: {(h, w): {k: T(k)}}."""
    table = DegreeTable(workers)
    ks = [1 << i for i in range(1, workers.bit_length()) if 1 << i <= workers]
    for i, (h, w) in enumerate(sizes if ks else []):
        run = pipeline.start(GenerationParams("profile-k", "", h, w, 50, 5.0, i))
        items = [pipeline.denoiser_inputs(run)]
        seconds: dict[int, list[float]] = {k: [] for k in (1, *ks)}
        for k in seconds:
            denoiser.run(items, places=[tuple(range(k))])
        for _ in range(repeats):
            for k in seconds:
                t0 = clock()
                denoiser.run(items, places=[tuple(range(k))])
                seconds[k].append(clock() - t0)
        rows = items[0]["sample"].shape[0]
        for k in ks:
            ratio = statistics.median(tk / t1 for tk, t1 in zip(seconds[k], seconds[1], strict=True))
            table.ratios.setdefault(k, []).append([(h // vae_factor) * (w // vae_factor) * rows, ratio])
        if times is not None:
            times[(h, w)] = {k: statistics.median(v) for k, v in seconds.items()}
    for points in table.ratios.values():
        points.sort()
    if ks:
        log.info("[tessera] profile: T(k)/T(1) over %d workers: %s", workers,
                 {k: [(c, round(r, 3)) for c, r in v] for k, v in table.ratios.items()})
    return table


def _profile(pipeline, denoiser, sizes, vae_factor, repeats, clock, into, max_batch=1) -> CostModel:
    params = [GenerationParams("profile", "", h, w, 50, 5.0, i) for i, (h, w) in enumerate(sizes)]
    starts, finishes, samples = [], [], []
    runs, run_params = [], []

    def add(p: GenerationParams) -> int:
        t0 = clock()
        runs.append(pipeline.start(p))
        starts.append(clock() - t0)
        run_params.append(p)
        return len(runs) - 1

    base = [add(p) for p in params]
    twins = [add(p) for p in params]
    groups = [[i] for i in base] + [base] + [[b, t] for b, t in zip(base, twins, strict=True)]
    largest = max(range(len(params)), key=lambda i: params[i].height * params[i].width)
    biggest = [base[largest], twins[largest]] + [add(params[largest]) for _ in range(max_batch - 2)]

    def timed_step(idx: list[int], keep: bool = True) -> None:
        items = [pipeline.denoiser_inputs(runs[i]) for i in idx]
        t0 = clock()
        preds, _ = denoiser.run(items)
        for i, pr in zip(idx, preds, strict=True):
            pipeline.apply(runs[i], pr)
        seconds = clock() - t0
        f = vae_factor
        shape = BatchShape(tuple((run_params[i].height // f, run_params[i].width // f, 2) for i in idx))
        if keep:
            samples.append((shape, seconds))

    # One untimed pass first: a runtime's first call at a new shape pays its allocations, which served
    # steady state never sees (it inflated the profiled decode cost). It starts with the biggest step the
    # engine may run, so the runtime's memory has grown before serving: served, the first step of two or
    # three 256x256 requests cost well over its later steps, once, inside a queue (docs/architecture.md).
    for g in ([biggest] if max_batch > 2 else []) + groups:
        timed_step(g, keep=False)
    for _ in range(repeats):
        for g in groups:
            timed_step(g)
    cells = []
    for i in range(len(sizes)):
        pipeline.finish(runs[i])  # warm-up (finish does not change the run)
        times = []
        for _ in range(max(min(repeats, 3), 1)):
            t0 = clock()
            pipeline.finish(runs[i])
            times.append(clock() - t0)
        finishes.append(statistics.median(times))
        h, w = sizes[i]
        cells.append((h // vae_factor) * (w // vae_factor))
    predictor = into.predictor if into is not None else LatencyPredictor()
    predictor.fit(samples)
    cost = into or CostModel(predictor, vae_factor)
    cost.start_s = statistics.median(starts)
    cost.observe_finishes(zip(cells, finishes, strict=True))
    base, per_cell = cost.finish_base_s, cost.finish_s_per_cell
    log.info("[tessera] profile: %d step samples, join %.1f ms, finish %.1f ms + %.3f ms/cell, sizes %s",
             len(samples), cost.start_s * 1e3, base * 1e3, per_cell * 1e3, sizes)
    return cost


def isolated_ms(cost: CostModel, height: int, width: int, steps: int, guidance: float = 5.0) -> float:
    s = RequestState("iso", GenerationParams("x", "", height, width, steps, guidance, 0), 0.0)
    return cost.isolated_s(s) * 1e3
