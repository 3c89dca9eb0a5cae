"""perf.perf_analyzer's pure parts: the trace -> --request-intervals writer, the --input-data JSON builder and
the readers of perf_analyzer's reports (no binary, no server, no network)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]  # perf/ is a package at the repository root
sys.path.insert(0, str(ROOT))

from perf import perf_analyzer as pa  # noqa: E402
from tessera.bench.traces import TraceRequest, poisson  # noqa: E402
from tessera.wire import ENTRY_INPUTS  # noqa: E402

SIZES = ((128, 128), (128, 256), (256, 256))


def _trace(rate=1.3, duration=40.0, seed=3):
    return poisson(rate, duration, SIZES, (1, 1, 1), 20, seed)


def test_intervals_sum_to_the_trace_span_in_microseconds(tmp_path):
    trace = _trace()
    times = [r.t for r in trace.requests]
    gaps = pa.intervals_us(times)
    assert len(gaps) == len(times) > 10
    assert all(isinstance(g, int) and g >= 0 for g in gaps)
    assert sum(gaps) == round(times[-1] * 1e6)  # the first gap runs from t = 0: the span to the last arrival
    assert np.all(np.abs(np.cumsum(gaps) - np.asarray(times) * 1e6) <= 0.5)  # no rounding drift
    path = pa.write_intervals(trace, tmp_path / "intervals.txt")
    lines = path.read_text().splitlines()
    assert [int(x) for x in lines] == gaps  # one integer per line, as perf_analyzer reads them (std::stol)


def test_intervals_refuse_unsorted_or_negative_times():
    with pytest.raises(ValueError):
        pa.intervals_us([0.5, 0.2])
    with pytest.raises(ValueError):
        pa.intervals_us([-0.1, 0.2])
    assert pa.intervals_us([]) == []
    assert pa.intervals_us([0.0, 0.0, 1e-6]) == [0, 0, 1]


def test_input_data_has_every_required_entry_input_with_batchless_shape_and_dtype():
    trace = _trace()
    slo = {s: 1000.0 * (i + 1) for i, s in enumerate(SIZES)}
    doc = pa.input_data(trace.requests, slo, guidance=5.0)
    assert json.loads(json.dumps(doc)) == doc  # plain JSON
    assert len(doc["data"]) == len(trace.requests)
    required = {s.name for s in ENTRY_INPUTS if not s.optional}
    for entry, r in zip(doc["data"], trace.requests, strict=True):
        assert required <= set(entry) and set(entry) <= {s.name for s in ENTRY_INPUTS}
        assert "slo_ms" in entry
        for spec in ENTRY_INPUTS:
            if spec.name not in entry:
                continue
            item = entry[spec.name]
            assert item["shape"] == [1]  # [batch, 1] on the wire; perf_analyzer -b 1 adds the batch dimension
            (value,) = item["content"]
            if spec.dtype is np.object_:
                assert isinstance(value, str) and value
            elif np.issubdtype(spec.dtype, np.floating):
                assert isinstance(value, float)
            else:
                assert isinstance(value, int) and not isinstance(value, bool)
                assert np.asarray([value], dtype=spec.dtype)[0] == value  # fits the wire dtype
        assert (entry["height"]["content"][0], entry["width"]["content"][0]) == (r.height, r.width)
        assert entry["seed"]["content"][0] == r.seed and entry["steps"]["content"][0] == r.steps
        assert entry["prompt"]["content"][0] == r.prompt
        assert entry["guidance_scale"]["content"][0] == 5.0
        assert entry["slo_ms"]["content"][0] == int(slo[(r.height, r.width)])


def test_input_data_without_slo_leaves_the_optional_input_out(tmp_path):
    reqs = [TraceRequest(0.0, 128, 128, 4, 7)]
    doc = pa.input_data(reqs)
    assert set(doc["data"][0]) == {s.name for s in ENTRY_INPUTS if not s.optional}
    path = pa.write_input_data(reqs, tmp_path / "in.json", slo_ms=2500)
    assert json.loads(path.read_text())["data"][0]["slo_ms"] == {"content": [2500], "shape": [1]}


def test_readers_of_perf_analyzer_reports(tmp_path):
    csv_path = tmp_path / "r.csv"
    csv_path.write_text("Request Rate,Inferences/Second,Server Queue,p50 latency,p99 latency\n0,0.63,159,598698,1220763\n")
    (row,) = pa.read_csv(csv_path)
    assert row["p50 latency"] == 598698.0 and row["Inferences/Second"] == 0.63
    assert pa.stdout_avg_latency_ms("  Client: \n    Request count: 7\n    Avg latency: 714278 usec (std)\n") == 714.278
    export = tmp_path / "p.json"
    export.write_text(json.dumps({"experiments": [{"experiment": {"mode": "request_rate", "value": 0}, "requests": [
        {"timestamp": 2_000_000_000, "request_inputs": {"seed": 5}, "response_timestamps": [2_500_000_000]},
        {"timestamp": 1_000_000_000, "request_inputs": {"seed": 4}, "response_timestamps": [1_100_000_000]},
    ]}]}))
    recs = pa.export_latencies(export)
    assert [r["seed"] for r in recs] == [4, 5]
    assert [round(r["latency_ms"], 6) for r in recs] == [100.0, 500.0]


def test_latency_summary_and_window_stability():
    s = pa.latency_summary([100.0, 200.0, None, 300.0])
    assert s["n"] == 3 and s["p50_ms"] == 200.0 and s["max_ms"] == 300.0
    assert pa.latency_summary([]) == {"n": 0}
    # a steady stream: one request a second, 500 ms each: windows agree exactly
    w = pa.window_stability(np.arange(30.0), [500.0] * 30, origin_s=-0.5)
    assert w["requests_per_window"] == 10
    assert w["throughput_max_over_min"] == pytest.approx(1.0)
    # the documented failure: Poisson arrivals below capacity, windows of 10 requests differ far beyond 10%
    t = [r.t for r in _trace(duration=30.0, seed=1).requests][:30]
    w = pa.window_stability(t, [500.0] * len(t), origin_s=0.0)
    assert w["throughput_max_over_min"] > 1.1
    assert w["latency_max_over_min"] == 1.0


def test_version_guard_and_parser():
    assert pa._version_tuple("2.51.0") <= pa.LAST_WITH_BINARY < pa._version_tuple("2.61.0")
    with pytest.raises(SystemExit):
        pa.ensure_perf_analyzer(version="2.61.0")  # refused before any download
    args = pa.build_parser().parse_args([])
    assert args.pa_version == pa.PA_VERSION and args.rounds >= 1
