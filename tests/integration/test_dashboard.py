"""The Grafana dashboard (deploy/grafana/tessera-dashboard.json) against a running server: every metric its
PromQL reads is one the server exports (only GPU metrics may be missing, on a host without a GPU), and the
end-to-end latency histogram it graphs (`tessera_request_duration_seconds`) counts each request the engine
answers once, in seconds, with cumulative buckets."""

from __future__ import annotations

import json
import math
import queue
import re
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import PROMPT, wait_for
from tessera.client import infer, infer_inputs, make_client, request_arrays

pytestmark = pytest.mark.integration

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "tessera-dashboard.json"
DURATION = "tessera_request_duration_seconds"
GPU_ONLY = {"nv_gpu_utilization"}  # exported only where Triton sees an NVIDIA GPU (none on the CI machines)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}
ENGINE_OUTCOMES = ("completed", "degraded", "dropped", "cancelled", "error")  # answered by the engine loop


# -- the dashboard --------------------------------------------------------------------------------------
def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable (label_values(...) unwrapped)."""
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['id']} ({panel['title']}) target {target['refId']}", target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q)
        assert m, f"variable {var['name']}: expected label_values(SELECTOR, LABEL), got {q!r}"
        found.append((f"variable {var['name']}", m.group(1)))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: string literals, Grafana variables, label matchers,
    ranges and by/without/on/ignoring label lists removed; what is left are function names (followed by
    `(`), keywords, numbers and metric names."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\$\{\w+\}|\$\w+", " ", e)
    e = re.sub(r"\{[^{}]*\}", " ", e)
    e = re.sub(r"\[[^\[\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group().lower() in PROMQL_WORDS:
            continue
        names.add(m.group())
    return names


def test_metric_name_parser():
    expr = ('histogram_quantile(0.99, sum by (le, model) (rate(foo_seconds_bucket{model=~"$model", x="a{b}(c)"}'
            '[$__rate_interval]))) / on (model) group_left sum without (pod) (bar_total offset 5m) > bool 1e3')
    assert metric_names(expr) == {"foo_seconds_bucket", "bar_total"}
    assert metric_names("avg(nv_gpu_utilization)") == {"nv_gpu_utilization"}


def test_dashboard_is_well_formed():
    dashboard = load_dashboard()  # raises on invalid JSON
    panels = dashboard["panels"]
    assert len(panels) >= 10
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = [v for v in variables.values() if v["type"] == "datasource"]
    assert len(ds) == 1 and ds[0]["query"] == "prometheus", "one Prometheus datasource variable"
    ref = {"type": "prometheus", "uid": "${" + ds[0]["name"] + "}"}
    for p in panels:
        where = f"panel {p['id']} ({p['title']})"
        assert p.get("datasource") == ref, f"{where}: datasource {p.get('datasource')}, expected {ref}"
        assert p.get("targets"), f"{where}: no queries"
        for t in p["targets"]:
            assert t.get("datasource") == ref, f"{where} target {t.get('refId')}: datasource {t.get('datasource')}"
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{where}: wider than the grid"
    for v in variables.values():
        if v["type"] == "query":
            assert v.get("datasource") == ref, f"variable {v['name']}: datasource {v.get('datasource')}"
    for where, expr in queries(dashboard):
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        assert all(n.startswith(("tessera_", "nv_")) for n in names), f"{where}: {names} (parser or query wrong)"
    queried = {n for _, e in queries(dashboard) for n in metric_names(e)}
    must = {f"{DURATION}_bucket", "tessera_deadline_total", "tessera_requests_total", "tessera_in_flight_requests",
            "tessera_denoiser_rows_total", "tessera_denoiser_calls_total", "tessera_predictor_mape",
            "tessera_early_exits_total", "tessera_engine_ready", "nv_inference_queue_duration_us",
            "nv_inference_compute_infer_duration_us", "nv_gpu_utilization"}
    assert must <= queried, f"panels missing for {sorted(must - queried)}"
    assert GPU_ONLY <= queried, f"GPU-only allowlist names metrics no panel reads: {sorted(GPU_ONLY - queried)}"
    handoff = [p for p in panels if any("txt2img" in t["expr"] and "nv_inference_" in t["expr"] for t in p["targets"])]
    assert handoff and all("hand-off" in p["description"] and DURATION in p["description"] for p in handoff), \
        "a panel of txt2img's nv_inference_* latencies must say they measure the hand-off and point at the histogram"


# -- the running server ---------------------------------------------------------------------------------
def scrape(server) -> str:
    return urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], float]]]:
    """(family name -> type from `# TYPE`, samples as (name, labels, value))."""
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind.strip()
            continue
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?", line)
        assert m, f"unparsable metrics line {line!r}"
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        samples.append((m.group(1), labels, float(m.group(3))))
    return types, samples


def exported(types: dict[str, str], samples) -> set[str]:
    """Series names a PromQL query can read: counters and gauges by name, histograms only through
    _bucket/_sum/_count (never the bare family name)."""
    present = {name for name, _, _ in samples}
    names = set()
    for name in present:
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s) and
                     types.get(name[: -len(s)]) == "histogram"), None)
        if base is not None or types.get(name) in ("counter", "gauge"):
            names.add(name)
    return names


def value(samples, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def invalid_to_engine(server) -> str:
    """One request with a bad height straight to the decoupled engine (gRPC stream): answered at admission."""
    client = make_client("grpc", server.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error))
    try:
        client.async_stream_infer("engine", infer_inputs("grpc", request_arrays(PROMPT, 100, 64, steps=2)),
                                  request_id="bad-height")
        error = answers.get(timeout=60)
    finally:
        client.stop_stream()
        client.close()
    assert error is not None, "height 100 was accepted"
    return error.message()


@pytest.fixture(scope="module")
def traffic(server):
    """Two generations through txt2img (one with slo_ms) and one invalid request to the engine, with
    scrapes before and after (the metrics thread applies updates shortly after each answer)."""
    wait_for(lambda: value(parse(scrape(server))[1], "tessera_in_flight_requests", model="engine") == 0,
             what="engine idle before the baseline")
    _, before = parse(scrape(server))
    sent = [("http", request_arrays(PROMPT, 128, 128, steps=4, seed=5)),
            ("grpc", request_arrays(PROMPT, 64, 128, steps=3, seed=6, slo_ms=600_000))]
    t0 = time.monotonic()
    for protocol, arrays in sent:
        url = server.http_url if protocol == "http" else server.grpc_url
        image, steps = infer(make_client(protocol, url), protocol, arrays)
        assert image.shape[0] == 1 and steps.tolist() == [int(arrays["steps"][0, 0])]
    client_s = time.monotonic() - t0
    message = invalid_to_engine(server)
    assert "height" in message, message

    def counted(samples) -> float:
        return value(samples, f"{DURATION}_count", model="engine") - value(before, f"{DURATION}_count", model="engine")

    def settled() -> bool:
        now = parse(scrape(server))[1]
        return counted(now) >= len(sent) and value(now, "tessera_requests_total", model="engine", outcome="invalid") \
            > value(before, "tessera_requests_total", model="engine", outcome="invalid")

    wait_for(settled, what="the metrics thread to apply the answers")
    time.sleep(0.5)  # anything applied late (a double count) shows up in the scrape below
    types, after = parse(scrape(server))
    return {"before": before, "after": after, "types": types, "sent": len(sent), "client_s": client_s}


def test_every_queried_metric_is_exported(traffic):
    have = exported(traffic["types"], traffic["after"])
    gpu_host = any(n.startswith("nv_gpu_") for n in have)
    missing = {}
    for where, expr in queries(load_dashboard()):
        for name in metric_names(expr) - have:
            if name in GPU_ONLY and not gpu_host:
                continue  # allowed: no GPU here (on a GPU host it must be exported)
            missing.setdefault(name, []).append(where)
    assert not missing, f"the dashboard reads metrics the server does not export: {missing}"
    assert DURATION not in have and f"{DURATION}_bucket" in have, "the histogram is exported as a histogram"


def test_request_duration_histogram(traffic):
    before, after, n = traffic["before"], traffic["after"], traffic["sent"]
    assert traffic["types"].get(DURATION) == "histogram"

    def delta(name: str, **labels) -> float:
        return value(after, name, model="engine", **labels) - value(before, name, model="engine", **labels)

    assert delta(f"{DURATION}_count") == n, "one observation per request the engine answered"
    assert delta(f"{DURATION}_count", outcome="completed") == n
    answered = sum(delta("tessera_requests_total", outcome=o) for o in ENGINE_OUTCOMES)
    assert answered == n, f"tessera_requests_total counted {answered} engine answers, {n} sent"
    assert delta("tessera_requests_total", outcome="invalid") == 1, "the invalid request is counted ..."
    # ... and not observed: the _count delta above is exactly the two generations
    seconds = delta(f"{DURATION}_sum")
    assert 0 < seconds <= traffic["client_s"], \
        f"engine latency {seconds:.3f} s for {n} requests; the client waited {traffic['client_s']:.3f} s (units?)"
    assert delta("tessera_deadline_total", outcome="met") + delta("tessera_deadline_total", outcome="missed") == n
    assert delta("tessera_deadline_total", outcome="met", resolution="64x128") == 1, "slo_ms 600000 is met"

    for outcome in ("completed",) + tuple(o for o in ENGINE_OUTCOMES if o != "completed"):
        buckets = sorted((float(lab["le"]), v) for name, lab, v in after
                         if name == f"{DURATION}_bucket" and lab.get("model") == "engine" and lab["outcome"] == outcome)
        assert len(buckets) >= 5 and buckets[-1][0] == math.inf, f"{outcome}: buckets {buckets}"
        counts = [v for _, v in buckets]
        assert all(a <= b for a, b in zip(counts, counts[1:])), f"{outcome}: buckets not cumulative: {buckets}"
        assert counts[-1] == value(after, f"{DURATION}_count", model="engine", outcome=outcome), \
            f"{outcome}: +Inf bucket != _count"

    # why the dashboard graphs this histogram: txt2img's own Triton latency is the hand-off only
    def triton(name: str) -> float:
        return value(after, name, model="txt2img") - value(before, name, model="txt2img")

    handed = triton("nv_inference_request_success")
    assert handed == n, f"txt2img served {handed} requests, {n} sent"
    handoff_s = triton("nv_inference_request_duration_us") / 1e6 / n
    assert handoff_s < seconds / n / 5, (f"txt2img's nv_inference_request_duration_us {handoff_s * 1e3:.1f} "
                                         f"ms/request vs the engine's {seconds / n * 1e3:.0f} ms")

