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


def write_perf_analyzer_inputs(trace: Trace, out_dir: str | Path, slo_ms: dict | None = None,
                               guidance: float = 5.0) -> tuple[Path, Path]:
    """perf_analyzer files for the same trace: `input_data.json` (one entry per request, in order) and
    `intervals.txt` (inter-arrival gaps in microseconds, for --request-intervals)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = []
    for r in trace.requests:
        entry = {
            "prompt": {"content": [r.prompt], "shape": [1]},
            "height": {"content": [r.height], "shape": [1]},
            "width": {"content": [r.width], "shape": [1]},
            "steps": {"content": [r.steps], "shape": [1]},
            "guidance_scale": {"content": [guidance], "shape": [1]},
            "seed": {"content": [r.seed], "shape": [1]},
        }
        if slo_ms:
            entry["slo_ms"] = {"content": [int(slo_ms[(r.height, r.width)])], "shape": [1]}
        data.append(entry)
    (out / "input_data.json").write_text(json.dumps({"data": data}))
    times = [r.t for r in trace.requests]
    gaps = [times[0]] + [b - a for a, b in zip(times, times[1:], strict=False)]
    (out / "intervals.txt").write_text("\n".join(str(int(g * 1e6)) for g in gaps) + "\n")
    return out / "input_data.json", out / "intervals.txt"
