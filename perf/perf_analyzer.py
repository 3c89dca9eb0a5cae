"""Triton's perf_analyzer against the served entry model `txt2img`, next to `tessera bench` on the same trace.

perf_analyzer comes from a tritonclient wheel (<= 2.60.0; later wheels carry no binary) fetched with
`pip download --no-deps` into .tessera_cache/perf_analyzer and unpacked there (never installed into the venv:
tritonclient 2.51 pins protobuf<5, which would break onnx). The tiny UNet pipeline (as perf.slo) is exported,
served, and measured over gRPC with two recipes: (a) a closed-loop concurrency sweep (count windows, stability
check); (b) a seeded Poisson trace below capacity replayed once with --request-intervals and --request-count
(one window of exactly the trace's requests), then the same trace through tessera.bench.loadgen against the
same server; rounds alternate which tool goes first. Latency percentiles of the two are compared, and Triton's
own per-model statistics for the trace are recorded next to the client-measured latency.

Writes perf/results/perf_analyzer.json (+ .png), perf_analyzer's CSV reports perf_analyzer.<recipe>.csv, and
the trace with its perf_analyzer inputs (perf_analyzer.trace.json, .input_data.json, .intervals.txt).
Run: python -m perf.perf_analyzer
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perf.common import RESULTS, parser, tiny_unet_repo, write_result

CACHE = Path(".tessera_cache") / "perf_analyzer"
PA_VERSION = "2.51.0"  # the server's own release (nvidia-pytriton 0.7.0 ships tritonserver 2.51)
LAST_WITH_BINARY = (2, 60, 0)  # tritonclient manylinux1 wheels after 2.60.0 carry no perf_analyzer
# Shared libraries the binary links but does not ship; nvidia-pytriton's wheel has them under hashed names.
PA_LIBS = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}
SIZES = ((128, 128), (128, 256), (256, 256))  # as perf.slo
COMPONENTS = ("text_encoder", "denoiser", "vae_decoder")
PROMPT = "a red circle at top left"


# ---------------------------------------------------------------------------------------------- the binary
@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    lib_dir: Path
    wheel: str
    version_text: str

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(self.lib_dir), env.get("LD_LIBRARY_PATH", "")) if p)
        return env

    def run(self, args: list[str], log: Path, timeout_s: float) -> subprocess.CompletedProcess:
        """Run perf_analyzer with `args`; its stdout and stderr go to `log` too. Raises on a non-zero exit with
        the last lines of its output."""
        cmd = [str(self.binary), *args]
        print(f"[tessera] {' '.join(cmd)}", flush=True)
        done = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout_s)
        log.write_text(f"$ {' '.join(cmd)}\n{done.stdout}\n--- stderr ---\n{done.stderr}")
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"perf_analyzer exited {done.returncode} (log {log}):\n{tail}")
        return done


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in version.split(".")[:3])


def ensure_perf_analyzer(cache: Path = CACHE, version: str = PA_VERSION) -> PerfAnalyzer:
    """perf_analyzer from tritonclient's manylinux1 x86_64 wheel, downloaded once (no dependencies) into
    `cache`, with the two shared libraries it needs linked from nvidia-pytriton's wheel; checked by running
    `perf_analyzer --version`."""
    if _version_tuple(version) > LAST_WITH_BINARY:
        raise SystemExit(f"--pa-version: allowed <= 2.60.0 (later tritonclient wheels carry no perf_analyzer), "
                         f"got {version}")
    cache = cache.resolve()
    binary = cache / version / "perf_analyzer"
    wheels = cache / "wheels"
    pattern = f"tritonclient-{version}-*manylinux1_x86_64.whl"
    wheel = next(iter(sorted(wheels.glob(pattern))), None)
    if wheel is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", f"tritonclient=={version}",
                        "--only-binary=:all:", "--platform", "manylinux1_x86_64", "--python-version", "3.11",
                        "-d", str(wheels)], check=True)
        wheel = next(iter(sorted(wheels.glob(pattern))))
    if not binary.exists():
        member = f"tritonclient-{version}.data/data/bin/perf_analyzer"
        binary.parent.mkdir(parents=True, exist_ok=True)
        tmp = binary.with_suffix(".tmp")
        with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.chmod(0o755)
        tmp.rename(binary)
    lib_dir = cache / version / "lib"
    lib_dir.mkdir(parents=True, exist_ok=True)
    from tessera.server import _site_packages

    shipped = _site_packages() / "nvidia_pytriton.libs"
    for name, glob in PA_LIBS.items():
        found = sorted(shipped.glob(glob))
        if not found:
            raise SystemExit(f"perf_analyzer needs {name}: no {glob} in {shipped} (nvidia-pytriton==0.7.0 ships it)")
        link = lib_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])
    pa = PerfAnalyzer(binary, lib_dir, wheel.name, "")
    done = subprocess.run([str(binary), "--version"], env=pa.env(), capture_output=True, text=True, timeout=60)
    text = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or "Perf Analyzer Version" not in text:
        raise SystemExit(f"perf_analyzer --version failed (exit {done.returncode}): {text[-500:]}")
    return PerfAnalyzer(binary, lib_dir, wheel.name, text)


# ------------------------------------------------------------------------------------- perf_analyzer inputs
from tessera.bench.traces import input_data, intervals_us  # noqa: E402 - one writer for perf_analyzer inputs


def write_intervals(trace, path: Path) -> Path:
    path.write_text("".join(f"{g}\n" for g in intervals_us([r.t for r in trace.requests])))
    return path


def write_input_data(requests, path: Path, slo_ms=None, guidance: float = 5.0) -> Path:
    path.write_text(json.dumps(input_data(requests, slo_ms, guidance)))
    return path


def read_csv(path: Path) -> list[dict]:
    """perf_analyzer's -f report: one row per load level, numbers as floats (latencies in microseconds)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            clean = {}
            for k, v in row.items():
                if k is None:
                    continue
                try:
                    clean[k.strip()] = float(v)
                except (TypeError, ValueError):
                    clean[k.strip()] = v
            rows.append(clean)
    return rows


def stdout_avg_latency_ms(text: str) -> float | None:
    """The client's "Avg latency: N usec" from perf_analyzer's report (its CSV leaves the mean out)."""
    import re

    m = re.search(r"Client:.*?Avg latency: (\d+) usec", text, re.S)
    return int(m.group(1)) / 1e3 if m else None


def export_latencies(path: Path) -> list[dict]:
    """Per-request records from perf_analyzer's --profile-export-file, in send order: start (s, epoch),
    latency (ms, send to last response) and the seed sent (to pair with the trace)."""
    doc = json.loads(path.read_text())
    out = []
    for exp in doc["experiments"]:
        for r in exp["requests"]:
            if not r.get("response_timestamps"):
                continue
            seed = r.get("request_inputs", {}).get("seed")
            if isinstance(seed, list):
                seed = seed[0] if seed else None
            out.append({"start_s": r["timestamp"] / 1e9,
                        "latency_ms": (r["response_timestamps"][-1] - r["timestamp"]) / 1e6,
                        "seed": int(seed) if seed not in (None, "") else None})
    return sorted(out, key=lambda r: r["start_s"])


def latency_summary(ms) -> dict:
    a = np.asarray([x for x in ms if x is not None], dtype=float)
    if not len(a):
        return {"n": 0}
    return {"n": int(len(a)), "mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)),
            "p90_ms": float(np.percentile(a, 90)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def window_stability(starts_s, latencies_ms, windows: int = 3, origin_s: float | None = None) -> dict:
    """What perf_analyzer's stability check (3 consecutive count windows within --stability-percentage in
    both throughput and mean latency) would see if one pass of the trace were cut into `windows` count
    windows of equal request counts (completions in order; a window runs from the previous one's end, the
    first from `origin_s`, the start of the schedule: default the first send)."""
    ends = np.sort(np.asarray(starts_s) + np.asarray(latencies_ms) / 1e3)
    lat = np.asarray(latencies_ms)[np.argsort(np.asarray(starts_s) + np.asarray(latencies_ms) / 1e3)]
    n = len(ends) // windows
    if n < 2:
        return {}
    tput, mean = [], []
    prev = float(np.min(starts_s)) if origin_s is None else origin_s
    for w in range(windows):
        sl = slice(w * n, (w + 1) * n)
        tput.append(n / (ends[sl][-1] - prev))
        mean.append(float(lat[sl].mean()))
        prev = ends[sl][-1]
    return {"requests_per_window": n, "throughput_rps": tput, "mean_latency_ms": mean,
            "throughput_max_over_min": max(tput) / min(tput), "latency_max_over_min": max(mean) / min(mean)}


# ----------------------------------------------------------------------------------------- Triton statistics
def model_stats(url: str, models) -> dict:
    """Triton's cumulative per-model statistics (tritonclient gRPC get_inference_statistics)."""
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(url)
    out = {}
    for m in models:
        s = c.get_inference_statistics(model_name=m, as_json=True)["model_stats"][0]
        inf = s["inference_stats"]
        out[m] = {k: {"count": int(inf.get(k, {}).get("count", 0)), "ns": int(inf.get(k, {}).get("ns", 0))}
                  for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")}
        out[m]["execution_count"] = int(s.get("execution_count", 0))
    c.close()
    return out


def stats_delta(after: dict, before: dict, requests: int) -> dict:
    """Per model: requests Triton counted, and mean ms per request of its request duration (success),
    queue and compute phases, over the interval between two snapshots; `per_client_request_ms`: the compute
    summed over the interval divided by the client's requests (components run several calls per request)."""
    out = {}
    for m in after:
        d = {k: {f: after[m][k][f] - before[m][k][f] for f in ("count", "ns")} for k in after[m] if k != "execution_count"}
        n = d["success"]["count"]
        compute_ns = sum(d[k]["ns"] for k in ("compute_input", "compute_infer", "compute_output"))
        out[m] = {"requests": n, "failed": d["fail"]["count"],
                  "executions": after[m]["execution_count"] - before[m]["execution_count"],
                  "request_duration_ms_mean": d["success"]["ns"] / max(n, 1) / 1e6,
                  "queue_ms_mean": d["queue"]["ns"] / max(n, 1) / 1e6,
                  "compute_ms_mean": compute_ns / max(n, 1) / 1e6,
                  "compute_ms_per_client_request": compute_ns / max(requests, 1) / 1e6}
    return out


# ------------------------------------------------------------------------------------------------------- run
def build_parser() -> argparse.ArgumentParser:
    ap = parser("perf_analyzer", __doc__)
    ap.add_argument("--pa-version", default=PA_VERSION, help="tritonclient wheel to take perf_analyzer from (<= 2.60.0)")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the wheel and the unpacked binary are kept")
    ap.add_argument("--check-only", action="store_true", help="fetch perf_analyzer, run --version and exit")
    ap.add_argument("--executor", default="bls", choices=("bls", "local"),
                    help="engine executor (bls: components are Triton models with their own statistics)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per request")
    ap.add_argument("--guidance", type=float, default=5.0, help="guidance scale of every request")
    ap.add_argument("--slo-ms", type=int, default=30000,
                    help="slo_ms sent with every request: far beyond the latencies here, so no request is refused "
                         "(perf_analyzer stops at the first failed request)")
    ap.add_argument("--concurrency", default="1,2,4", help="concurrency levels of the sweep (empty: no sweep)")
    ap.add_argument("--window-requests", type=int, default=24, help="sweep: requests per count window")
    ap.add_argument("--stability", type=float, default=20.0, help="sweep: --stability-percentage")
    ap.add_argument("--max-trials", type=int, default=6, help="sweep: --max-trials")
    ap.add_argument("--load", type=float, default=0.5, help="trace rate as a multiple of capacity (1000 / mean "
                    "isolated latency over the sizes, as perf.slo)")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals in the trace")
    ap.add_argument("--seed", type=int, default=7, help="trace seed")
    ap.add_argument("--rounds", type=int, default=2, help="trace replays per tool (alternating which goes first)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    pa = ensure_perf_analyzer(args.cache, args.pa_version)
    print(f"[tessera] {pa.version_text} ({pa.binary}, from {pa.wheel})", flush=True)
    if args.check_only:
        return 0
    t_start = time.monotonic()
    load_before = os.getloadavg()

    from perf.slo import isolated_ms
    from tessera.bench.loadgen import replay
    from tessera.bench.traces import TraceRequest, poisson
    from tessera.server import TritonServer
    from tessera.wire import ENGINE_MODEL, ENTRY_MODEL
    from tessera_export.repository import add_engine

    work, _, repo = tiny_unet_repo("perf-analyzer")
    add_engine(repo, ENGINE_MODEL, ENGINE_MODEL, entry=ENTRY_MODEL, executor=args.executor,
               profile_sizes=",".join(f"{h}x{w}" for h, w in SIZES))
    models = (ENTRY_MODEL, ENGINE_MODEL) + (COMPONENTS if args.executor == "bls" else ())
    slo = {s: float(args.slo_ms) for s in SIZES}
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    sweep_rows, rounds = [], []
    with TritonServer(repo, log_path=work / "server.log") as server:
        url = server.grpc_url
        iso = isolated_ms(server, ENTRY_MODEL, args.steps, 3, sizes=SIZES, guidance=args.guidance)
        capacity = 1000.0 / float(np.mean(list(iso.values())))
        print(f"[tessera] isolated ms {iso}; capacity ~{capacity:.2f} req/s", flush=True)
        common = ["-m", ENTRY_MODEL, "-u", url, "-i", "grpc", "-b", "1"]

        # (a) concurrency sweep: one request per size in a 3-entry cycle (every thread meets every size at
        # concurrency 1, 2 and 4), count windows, stability over 3 windows.
        sweep_data = write_input_data([TraceRequest(0.0, h, w, args.steps, 1000 + i) for i, (h, w) in enumerate(SIZES)],
                                      work / "sweep_input_data.json", slo, args.guidance)
        header = None
        sweep_csv_lines: list[str] = []
        for c in levels:
            out_csv = work / f"concurrency-{c}.csv"
            t0 = time.monotonic()
            pa.run([*common, "--input-data", str(sweep_data), "--concurrency-range", f"{c}:{c}:1",
                    "--measurement-mode", "count_windows", "--measurement-request-count", str(args.window_requests),
                    "--stability-percentage", str(args.stability), "--max-trials", str(args.max_trials),
                    "--percentile", "50", "-f", str(out_csv)], work / f"concurrency-{c}.log", timeout_s=600)
            lines = out_csv.read_text().splitlines()
            header = header or lines[0]
            sweep_csv_lines += [ln for ln in lines[1:] if ln.strip()]
            row = read_csv(out_csv)[0]
            row["wall_s"] = time.monotonic() - t0
            sweep_rows.append(row)
            print(f"[tessera] concurrency {c}: {row.get('Inferences/Second')} infer/s, p50 "
                  f"{row.get('p50 latency', 0) / 1e3:.0f} ms, p99 {row.get('p99 latency', 0) / 1e3:.0f} ms "
                  f"({row['wall_s']:.0f} s)", flush=True)
        if sweep_csv_lines:
            (RESULTS / "perf_analyzer.concurrency.csv").write_text("\n".join([header, *sweep_csv_lines]) + "\n")

        # (b) one Poisson trace below capacity, replayed by both tools against the same server.
        trace = poisson(args.load * capacity, args.duration, SIZES, (1, 1, 1), args.steps, args.seed)
        n = len(trace.requests)
        RESULTS.mkdir(parents=True, exist_ok=True)
        trace.save(RESULTS / "perf_analyzer.trace.json")
        data = write_input_data(trace.requests, RESULTS / "perf_analyzer.input_data.json", slo, args.guidance)
        intervals = write_intervals(trace, RESULTS / "perf_analyzer.intervals.txt")
        seeds = [r.seed for r in trace.requests]
        for k in range(1, args.rounds + 1):
            order = ("perf_analyzer", "tessera_bench") if k % 2 else ("tessera_bench", "perf_analyzer")
            for tool in order:
                before = model_stats(url, models)
                t0 = time.monotonic()
                if tool == "perf_analyzer":
                    out_csv = RESULTS / f"perf_analyzer.trace-{k}.csv"
                    export = work / f"trace-{k}.profile.json"
                    done = pa.run([*common, "--async", "--max-threads", "1", "--input-data", str(data),
                            "--request-intervals", str(intervals), "--request-count", str(n),
                            "--profile-export-file", str(export), "-f", str(out_csv)],
                           work / f"trace-{k}.log", timeout_s=args.duration + 300)
                    recs = export_latencies(export)
                    export.unlink()  # tens of MB: it holds every image too
                    lat = [r["latency_ms"] for r in recs]
                    got_seeds = [r["seed"] for r in recs]
                    t_first = recs[0]["start_s"] if recs else 0.0
                    starts = [r["start_s"] - t_first for r in recs]
                    reported = read_csv(out_csv)[0]
                    extra = {"csv": out_csv.name, "reported": reported,
                             "reported_ms": {p: reported.get(f"{p} latency", float("nan")) / 1e3
                                             for p in ("p50", "p90", "p95", "p99")}
                             | {"mean": stdout_avg_latency_ms(done.stdout)},
                             "seeds_in_trace_order": got_seeds == seeds,
                             "stability_emulation": window_stability(starts, lat,
                                                                     origin_s=-trace.requests[0].t)}
                    failed = n - len(recs)
                else:
                    got = replay(url, ENTRY_MODEL, trace, slo, guidance=args.guidance, progress=False)
                    lat = [r.latency_ms if r.status == "ok" else None for r in got]
                    starts = [r.arrival_s for r in got]
                    failed = sum(r.status != "ok" for r in got)
                    extra = {"statuses": sorted({r.status for r in got}),
                             "stability_emulation": window_stability(
                                 [s for s, x in zip(starts, lat, strict=True) if x is not None],
                                 [x for x in lat if x is not None], origin_s=0.0)}
                wall = time.monotonic() - t0
                after = model_stats(url, models)
                # send time vs the trace, both from the first request (perf_analyzer's clock starts at its own)
                send_lag = [(s - starts[0]) - (r.t - trace.requests[0].t)
                            for s, r in zip(starts, trace.requests, strict=False)]
                summary = latency_summary(lat)
                rounds.append({"round": k, "tool": tool, "wall_s": wall, "failed": failed, "latency": summary,
                               "send_offset_ms": {"median": 1e3 * float(np.median(send_lag)),
                                                  "max_abs": 1e3 * float(np.max(np.abs(send_lag)))},
                               "triton_stats": stats_delta(after, before, n), "latency_ms": lat, **extra})
                print(f"[tessera] round {k} {tool:14s} p50 {summary.get('p50_ms', 0):.0f} p90 "
                      f"{summary.get('p90_ms', 0):.0f} p99 {summary.get('p99_ms', 0):.0f} ms, failed {failed} "
                      f"({wall:.0f} s)", flush=True)

    comparison = _compare(rounds)
    stats_view = _stats_view(rounds)
    config = vars(args) | {"cache": str(args.cache), "model": "tiny UNet pipeline (tessera build-tiny --kind unet)",
                           "served": f"{ENTRY_MODEL} -> {ENGINE_MODEL} (executor {args.executor}, default policy)",
                           "sizes": SIZES, "isolated_ms": {f"{h}x{w}": v for (h, w), v in iso.items()},
                           "capacity_rps": capacity, "trace": trace.params | {"requests": n},
                           "perf_analyzer": {"version": pa.version_text, "wheel": pa.wheel},
                           "baseline": "tessera bench (tessera.bench.loadgen.replay) on the same trace"}
    path = write_result("perf_analyzer", config, {
        "recipes": {
            "concurrency": {"flags": f"--concurrency-range C:C:1 --measurement-mode count_windows "
                                     f"--measurement-request-count {args.window_requests} --stability-percentage "
                                     f"{args.stability} --max-trials {args.max_trials} --percentile 50",
                            "csv": "perf_analyzer.concurrency.csv",
                            "rows": [{"concurrency": r.get("Concurrency"), "infer_per_s": r.get("Inferences/Second"),
                                      **{f"{p}_ms": r.get(f"{p} latency", float("nan")) / 1e3
                                         for p in ("p50", "p90", "p95", "p99")},
                                      "server_queue_ms": r.get("Server Queue", float("nan")) / 1e3,
                                      "server_compute_infer_ms": r.get("Server Compute Infer", float("nan")) / 1e3,
                                      "wall_s": r["wall_s"]} for r in sweep_rows]},
            "trace": {"flags": f"--async --max-threads 1 --request-intervals perf_analyzer.intervals.txt "
                               f"--request-count {n} --input-data perf_analyzer.input_data.json",
                      "files": ["perf_analyzer.trace.json", "perf_analyzer.input_data.json",
                                "perf_analyzer.intervals.txt"],
                      "stability": "--request-count N (N = the trace's requests) makes perf_analyzer send the "
                                   "schedule once and measure one window from the first send to the last answer; "
                                   "it skips the 3-window stability test by design (2.51 ProfileHelper: "
                                   "request_count != 0 -> stable after one window). Without it, windows of a "
                                   "looped Poisson trace differ in throughput and mean latency far beyond "
                                   "--stability-percentage (see stability_emulation per round), so 'Failed to "
                                   "obtain stable measurement' is the expected outcome, not a server fault.",
                      "csv_request_rate_note": "perf_analyzer 2.51 writes the Request Rate of a --request-intervals "
                                               "run truncated to whole requests/s (integer division in "
                                               "GetCustomRequestRate): 0 below 1 request/s"},
        },
        "rounds": rounds, "comparison": comparison, "triton_statistics_vs_client": stats_view,
        "wall_s": time.monotonic() - t_start,
        "host_load_average_1_5_15": {"start": load_before, "end": os.getloadavg()},
    })
    _plot(rounds, sweep_rows, stats_view, RESULTS / "perf_analyzer.png", args, n)
    print(json.dumps({"comparison": comparison, "triton_statistics_vs_client": stats_view}, indent=1))
    print(f"wrote {path}")
    return 0


def _compare(rounds: list[dict]) -> dict:
    """perf_analyzer / tessera bench latency ratios: pooled over rounds, per round, and per request."""
    by = {t: [r for r in rounds if r["tool"] == t] for t in ("perf_analyzer", "tessera_bench")}
    pooled = {t: latency_summary([x for r in rs for x in r["latency_ms"]]) for t, rs in by.items()}
    keys = ("p50_ms", "p90_ms", "p99_ms", "mean_ms")
    out = {"pooled": pooled,
           "ratio_pa_over_bench": {k: pooled["perf_analyzer"][k] / pooled["tessera_bench"][k] for k in keys}}
    per_round = []
    for pa_r, tb_r in zip(by["perf_analyzer"], by["tessera_bench"], strict=False):
        paired = [a / b for a, b in zip(pa_r["latency_ms"], tb_r["latency_ms"], strict=False) if a and b]
        per_round.append({"round": pa_r["round"],
                          **{k: pa_r["latency"][k] / tb_r["latency"][k] for k in keys},
                          "paired_median_ratio": float(np.median(paired)) if paired else None})
    out["per_round"] = per_round
    # run-to-run spread of one tool against itself (rounds 1 vs 2), the yardstick for the ratios above
    out["self_ratio_round2_over_round1"] = {
        t: {k: rs[1]["latency"][k] / rs[0]["latency"][k] for k in keys} for t, rs in by.items() if len(rs) > 1}
    return out


def _stats_view(rounds: list[dict]) -> dict:
    """Client-measured latency vs what Triton's per-model statistics say for the same requests (per replay,
    means in ms)."""
    rows = []
    for r in rounds:
        s = r["triton_stats"]
        row = {"round": r["round"], "tool": r["tool"], "client_mean_ms": r["latency"].get("mean_ms"),
               "client_p50_ms": r["latency"].get("p50_ms")}
        for m, v in s.items():
            row[m] = {"requests": v["requests"], "request_duration_ms": v["request_duration_ms_mean"],
                      "queue_ms": v["queue_ms_mean"], "compute_ms": v["compute_ms_mean"]}
        comps = [m for m in COMPONENTS if m in s]
        if comps:
            row["components_compute_ms_per_client_request"] = sum(s[m]["compute_ms_per_client_request"] for m in comps)
        rows.append(row)
    return {"rows": rows, "note": "txt2img and engine return from execute at once (the request is answered later "
                                  "from another thread), so Triton's request duration and compute for them time "
                                  "only the hand-off; the client-measured latency (perf_analyzer's or tessera "
                                  "bench's) is the end-to-end figure. The component models' compute is real work "
                                  "(with executor bls)."}


def _plot(rounds, sweep_rows, stats_view, path: Path, args, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    styles = {"perf_analyzer": "-", "tessera_bench": "--"}
    for r in rounds:
        lat = np.sort([x for x in r["latency_ms"] if x is not None])
        ax.step(lat, np.arange(1, len(lat) + 1) / len(lat), styles[r["tool"]], where="post",
                label=f"{r['tool']} (round {r['round']})")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"Same Poisson trace ({n} requests, {args.load:g}x capacity)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    if sweep_rows:
        cs = [r["Concurrency"] for r in sweep_rows]
        for p in ("p50", "p90", "p99"):
            ax.plot(cs, [r[f"{p} latency"] / 1e3 for r in sweep_rows], marker="o", label=f"{p} latency")
        ax.set_xlabel("concurrency")
        ax.set_ylabel("latency (ms)")
        ax2 = ax.twinx()
        ax2.plot(cs, [r["Inferences/Second"] for r in sweep_rows], "k:", marker="s", label="infer/s")
        ax2.set_ylabel("inferences / s")
        ax2.set_ylim(0, 1.2 * max(r["Inferences/Second"] for r in sweep_rows))
        ax.set_xticks(cs)
        ax.legend(fontsize=7, loc="upper left")
        ax2.legend(fontsize=7, loc="lower right")
        ax.set_title("perf_analyzer concurrency sweep (3 sizes, count windows)", fontsize=9)
    ax = axes[2]
    row = next((r for r in stats_view["rows"] if r["tool"] == "perf_analyzer"), None)
    if row:
        names = ["client mean", "txt2img\n(Triton)", "engine\n(Triton)"]
        vals = [row["client_mean_ms"], row["txt2img"]["request_duration_ms"], row["engine"]["request_duration_ms"]]
        if "components_compute_ms_per_client_request" in row:
            names.append("components\ncompute (Triton)")
            vals.append(row["components_compute_ms_per_client_request"])
        bars = ax.bar(names, vals)
        for b, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms per request (log)")
        ax.set_title("Client latency vs Triton's per-model statistics", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
