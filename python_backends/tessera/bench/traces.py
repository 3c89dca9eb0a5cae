"""Seeded arrival traces saved as JSON: Poisson at a fixed rate, and a bursty trace built DiffServe's way
(an hourly invocation-rate shape, min-max rescaled to a QPS band, each hour compressed into one second,
Poisson arrivals inside each second)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# A diurnal hourly shape in the spirit of the Azure Functions invocation traces DiffServe uses (a
# hand-entered approximation: night trough, morning ramp, midday peak, evening shoulder). The real
# trace is not available offline; the rescaling and compression follow DiffServe's recipe.
AZURE_LIKE_HOURLY = (0.31, 0.27, 0.24, 0.22, 0.23, 0.28, 0.38, 0.52, 0.70, 0.84, 0.93, 0.98,
                     1.00, 0.97, 0.95, 0.92, 0.88, 0.83, 0.77, 0.70, 0.62, 0.52, 0.43, 0.36)


@dataclass(frozen=True, slots=True)
class TraceRequest:
    t: float  # arrival, seconds from the start
    height: int
    width: int
    steps: int
    seed: int
    prompt: str = "a red circle at top left"


@dataclass(frozen=True)
class Trace:
    kind: str
    params: dict
    requests: tuple[TraceRequest, ...]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": self.kind, "params": self.params,
                                    "requests": [asdict(r) for r in self.requests]}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        d = json.loads(Path(path).read_text())
        return cls(d["kind"], d["params"], tuple(TraceRequest(**r) for r in d["requests"]))


def _draw(rng, n, sizes, shares, steps, t):
    idx = rng.choice(len(sizes), size=n, p=np.asarray(shares) / np.sum(shares))
    return [TraceRequest(float(ti), int(sizes[i][0]), int(sizes[i][1]), int(steps), int(rng.integers(1 << 31)))
            for ti, i in zip(t, idx, strict=True)]


def poisson(rate: float, duration_s: float, sizes, shares, steps: int, seed: int) -> Trace:
    rng = np.random.default_rng(seed)
    t, out = 0.0, []
    while True:
        t += rng.exponential(1.0 / rate)
        if t >= duration_s:
            break
        out.append(t)
    reqs = _draw(rng, len(out), sizes, shares, steps, out)
    return Trace("poisson", {"rate": rate, "duration_s": duration_s, "sizes": [list(s) for s in sizes],
                             "shares": list(shares), "steps": steps, "seed": seed}, tuple(reqs))


def bursty(low: float, high: float, sizes, shares, steps: int, seed: int, shape=AZURE_LIKE_HOURLY,
           seconds_per_hour: float = 1.0) -> Trace:
    rng = np.random.default_rng(seed)
    s = np.asarray(shape, dtype=float)
    rates = low + (s - s.min()) / (s.max() - s.min()) * (high - low)
    times = []
    for h, rate in enumerate(rates):
        n = rng.poisson(rate * seconds_per_hour)
        times += sorted(h * seconds_per_hour + rng.uniform(0, seconds_per_hour, size=n))
    reqs = _draw(rng, len(times), sizes, shares, steps, times)
    return Trace("bursty", {"qps_band": [low, high], "hours": len(shape), "seconds_per_hour": seconds_per_hour,
                            "sizes": [list(x) for x in sizes], "shares": list(shares), "steps": steps, "seed": seed},
                 tuple(reqs))


def intervals_us(times_s) -> list[int]:
    """Gaps between successive arrivals in whole microseconds, the first from t = 0 (perf_analyzer's
    --request-intervals: its schedule is the running sum). Rounded on the running sum, so the gaps add up to
    the trace's last arrival exactly and no rounding error accumulates."""
    stamps = [int(round(t * 1e6)) for t in times_s]
    if any(b < a for a, b in zip(stamps, stamps[1:], strict=False)) or (stamps and stamps[0] < 0):
        raise ValueError("arrival times: allowed non-negative and sorted")
    return [b - a for a, b in zip([0, *stamps][: len(stamps)], stamps, strict=True)]


def input_data(requests, slo_ms=None, guidance: float = 5.0) -> dict:
    """perf_analyzer --input-data JSON: one entry per request, in order, every required entry input of
    tessera.wire.ENTRY_INPUTS (and slo_ms when given: a number or {(h, w): ms}). Shapes leave out the batch
    dimension: the entry model has max_batch_size, and perf_analyzer (-b 1) adds it."""
    from tessera.wire import ENTRY_INPUTS

    out = []
    for r in requests:
        slo = slo_ms.get((r.height, r.width)) if isinstance(slo_ms, dict) else slo_ms
        values = {"prompt": r.prompt, "height": r.height, "width": r.width, "steps": r.steps,
                  "guidance_scale": guidance, "seed": r.seed, "slo_ms": slo}
        entry = {}
        for spec in ENTRY_INPUTS:
            value = values.get(spec.name)
            if value is None:
                if not spec.optional:
                    raise ValueError(f"{spec.name}: required entry input has no value")
                continue
            if spec.dtype is np.object_:
                cast = str
            elif np.issubdtype(spec.dtype, np.floating):
                cast = float
            else:
                cast = int
            entry[spec.name] = {"content": [cast(value)], "shape": [1]}
        out.append(entry)
    return {"data": out}


def write_perf_analyzer_inputs(trace: Trace, out_dir: str | Path, slo_ms: dict | None = None,
                               guidance: float = 5.0) -> tuple[Path, Path]:
    """perf_analyzer files for the same trace: `input_data.json` (one entry per request, in order) and
    `intervals.txt` (inter-arrival gaps in microseconds, for --request-intervals)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "input_data.json").write_text(json.dumps(input_data(trace.requests, slo_ms, guidance)))
    (out / "intervals.txt").write_text("".join(f"{g}\n" for g in intervals_us([r.t for r in trace.requests])))
    return out / "input_data.json", out / "intervals.txt"
