"""Soak: 1,000 cancelled streams, then 20 minutes of mixed open-loop load with faults injected, against one
server. Every request must be answered (images, refusals, drops, injected failures: never silence), the
engine must end with nothing in flight, and the resident memory of tritonserver and its Python stubs must
stay bounded (sampled every few seconds; the last quarter's peak against the first quarter's).

Writes perf/results/soak.json + soak.png (memory over time). Run: python -m perf.soak
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from perf.common import RESULTS, parser, tiny_unet_repo, write_result
from perf.slo import SIZES, isolated_ms, scrape_all

FAULTS = ("sampler", "decode", "preview", "start", "step")  # [[fault:loop]] is tested alone (test_faults.py)


def rss_mb(pids: list[int]) -> dict[int, float]:
    """Resident set size (MiB) of each live process (VmRSS from /proc)."""
    out = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[pid] = int(line.split()[1]) / 1024.0
        except OSError:
            continue
    return out


class MemorySampler(threading.Thread):
    def __init__(self, server, every_s: float):
        super().__init__(daemon=True)
        self.server, self.every_s = server, every_s
        self.samples: list[tuple[float, float, dict[int, float]]] = []  # (t, total MiB, per pid)
        self.phase = "start"
        self.marks: list[tuple[float, str]] = []
        self._halt = threading.Event()
        self.t0 = time.perf_counter()

    def mark(self, phase: str) -> None:
        self.marks.append((time.perf_counter() - self.t0, phase))

    def run(self) -> None:
        while not self._halt.is_set():
            per = rss_mb(self.server.stub_pids())
            self.samples.append((time.perf_counter() - self.t0, sum(per.values()), per))
            self._halt.wait(self.every_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def cancelled_streams(server, model: str, n: int, rng) -> dict:
    """n gRPC streams, one request each, cancelled after 0-300 ms (before, during or after its denoising)."""
    from tessera.client import infer_inputs, make_client, request_arrays

    for i in range(n):
        client = make_client("grpc", server.grpc_url)
        got: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: got.put(error))
        h, w = SIZES[i % len(SIZES)]
        client.async_stream_infer(model, infer_inputs("grpc", request_arrays("a blue square", h, w, 20, 5.0, i),
                                                      declared_types=False), request_id=str(i))
        time.sleep(float(rng.uniform(0.0, 0.3)))
        client.stop_stream(cancel_requests=True)
        client.close()
        if (i + 1) % 100 == 0:
            print(f"\r[tessera] soak: {i + 1}/{n} streams cancelled", end="", flush=True)
    print(flush=True)
    return {"streams": n}


def counter(server, name: str, model: str, **labels) -> float:
    return sum(v for lab, v in scrape_all(server.metrics_url, name)
               if lab.get("model") == model and all(lab.get(k) == x for k, x in labels.items()))


def build_parser() -> argparse.ArgumentParser:
    ap = parser("soak", __doc__)
    ap.add_argument("--streams", type=int, default=1000, help="cancelled streams (phase 1)")
    ap.add_argument("--minutes", type=float, default=20.0, help="mixed open-loop load (phase 2)")
    ap.add_argument("--load", type=float, default=0.9, help="offered load, x capacity")
    ap.add_argument("--fault-share", type=float, default=0.1, help="share of requests with a fault marker")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per request")
    ap.add_argument("--sample-s", type=float, default=5.0, help="memory sampling period")
    ap.add_argument("--seed", type=int, default=7, help="seed of the trace and the fault markers")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from tessera.bench.loadgen import replay, summarize
    from tessera.bench.traces import poisson
    from tessera.faults import MARK
    from tessera.server import TritonServer
    from tessera_export.repository import add_engine

    rng = np.random.default_rng(args.seed)
    work, _, repo = tiny_unet_repo("soak")
    engine = dict(executor="local", max_batch=16, profile_sizes=",".join(f"{h}x{w}" for h, w in SIZES))
    add_engine(repo, "engine", "engine_soak", entry="txt2img_soak", fault_injection="on", **engine)
    model = "engine_soak"
    with TritonServer(repo, log_path=work / "server.log") as server:
        iso = isolated_ms(server, "txt2img_soak", args.steps, 2)
        slo = {k: 5.0 * v for k, v in iso.items()}
        capacity = 1000.0 / float(np.mean(list(iso.values())))
        mem = MemorySampler(server, args.sample_s)
        mem.start()
        mem.mark("cancelled streams")
        cancelled_before = counter(server, "tessera_requests_total", model, outcome="cancelled")
        phase1 = cancelled_streams(server, model, args.streams, rng)
        deadline = time.monotonic() + 120
        while counter(server, "tessera_in_flight_requests", model) > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        phase1 |= {"cancelled_counted": counter(server, "tessera_requests_total", model, outcome="cancelled")
                   - cancelled_before, "in_flight_after": counter(server, "tessera_in_flight_requests", model)}
        print(f"[tessera] soak: phase 1 {phase1}", flush=True)
        mem.mark("mixed load with faults")
        tr = poisson(args.load * capacity, args.minutes * 60.0, SIZES, (1, 1, 1), args.steps, args.seed)
        faulty = rng.random(len(tr.requests)) < args.fault_share
        kinds = rng.choice(FAULTS, size=len(tr.requests))
        tr = replace(tr, requests=tuple(
            replace(r, prompt=f"{r.prompt} {MARK.format(k)}") if f else r
            for r, f, k in zip(tr.requests, faulty, kinds, strict=True)))
        half = len(tr.requests) // 2  # the first half streamed to the engine, the second unary through txt2img
        first = replace(tr, requests=tr.requests[:half])
        t_half = tr.requests[half].t if half < len(tr.requests) else 0.0
        second = replace(tr, requests=tuple(replace(r, t=r.t - t_half) for r in tr.requests[half:]))
        recs = replay(server.grpc_url, model, first, slo, drain_s=300, stream=True)
        recs += replay(server.grpc_url, "txt2img_soak", second, slo, drain_s=300, stream=False)
        mem.mark("drained")
        time.sleep(3 * args.sample_s)
        mem.stop()
        in_flight_end = counter(server, "tessera_in_flight_requests", model)
        ready_after = server.is_ready()
    summary = summarize(recs, args.minutes * 60.0)
    raw = summary.pop("raw")
    by_status = {s: sum(r.status == s for r in recs) for s in ("ok", "refused", "dropped", "rejected", "error", "pending")}
    faulted = [r for r, f in zip(recs, faulty, strict=True) if f]
    t = np.array([s[0] for s in mem.samples])
    total = np.array([s[1] for s in mem.samples])
    load_start = next(tm for tm, p in mem.marks if p == "mixed load with faults")
    in_load = t >= load_start
    q = max(int(in_load.sum() // 4), 1)
    first_q, last_q = total[in_load][:q], total[in_load][-q:]
    memory = {"samples": len(t), "start_mib": float(total[0]), "peak_mib": float(total.max()),
              "end_mib": float(total[-1]), "load_first_quarter_peak_mib": float(first_q.max()),
              "load_last_quarter_peak_mib": float(last_q.max()),
              "growth_last_vs_first_quarter": float(last_q.max() / first_q.max()),
              "processes": len(mem.samples[-1][2])}
    answered = sum(r.status != "pending" for r in recs)
    bounded = memory["growth_last_vs_first_quarter"] <= 1.10
    verdict = (answered == len(recs) and by_status["pending"] == 0 and in_flight_end == 0 and ready_after
               and phase1["in_flight_after"] == 0 and bounded)
    config = vars(args) | {"sizes": SIZES, "engine": engine, "capacity_rps": capacity, "model": "tiny UNet",
                           "isolated_ms": {f"{h}x{w}": v for (h, w), v in iso.items()},
                           "faults": FAULTS, "bounded_means": "load last-quarter peak RSS <= 1.10 x first-quarter peak"}
    results = {"phase1_cancelled_streams": phase1,
               "phase2": {"requests": len(recs), "answered": answered, "by_status": by_status,
                          "faulted_requests": len(faulted), "faulted_answered_with_error": sum(r.status == "error" for r in faulted),
                          "slo_attainment": summary["slo_attainment"], "p50_latency_ms": summary["p50_latency_ms"],
                          "p99_latency_ms": summary["p99_latency_ms"], "raw": raw},
               "in_flight_at_end": in_flight_end, "server_ready_after": ready_after, "memory": memory,
               "memory_series": {"t_s": t.tolist(), "total_mib": total.tolist(), "marks": mem.marks},
               "verdict_all_answered_memory_bounded": verdict}
    path = write_result("soak", config, results)
    _plot(t, total, mem.marks, RESULTS / "soak.png")
    print(f"[tessera] soak: wrote {path}; {answered}/{len(recs)} answered {by_status}; memory {memory}; verdict {verdict}")
    return 0 if verdict else 1


def _plot(t, total, marks, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(t / 60.0, total, lw=1)
    for tm, phase in marks:
        ax.axvline(tm / 60.0, color="grey", ls="--", lw=0.8)
        ax.text(tm / 60.0, ax.get_ylim()[1], f" {phase}", fontsize=7, va="top")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS, tritonserver + stubs (MiB)")
    ax.set_title("Soak: resident memory over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
