"""Several denoiser workers under one engine (issue 16): TetriServe's per-request degree against fixed degrees,
on the real server with 2 worker processes, then the simulator on the same traces (N = 2: validation) and the
same comparison simulated at N = 8.

1. T(size, k) measured first, in-process, on a benchmark DiT larger than the test model (4 layers, 8 heads of
   32; sequence parallelism over 2 gloo worker processes, one thread each). RSSP's degree per resolution is
   chosen from it: the widest degree whose parallel efficiency T(1) / (k T(k)) is >= 0.65.
2. One server, one engine per variant (each with its own 2 workers), the same seeded Poisson traces, mixed
   resolutions with a large one, SLO per size = 5 x its isolated latency at degree 1 (through the server):
   fixed-1, fixed-2 (xDiT-style fixed degree, FCFS), rssp, edf-mh (least-work placement), edf-mh-rr
   (round-robin placement: the load-balancing baseline), tetris.
3. The simulator replays every trace with the served engine's cost terms and its loop gap, the multi-set slowdown
   and the degree table as the run's means (tessera_cost_served_seconds_total before and after: the moving
   averages at a run's end follow its last steps); then at N = 8 workers, loads scaled to 8 workers, with T(size, k) for k = 4, 8
   ASSUMED from the measured k = 2 by Amdahl's law per size (serial fraction s = 2 T(2)/T(1) - 1).
4. The group-knapsack round's decision time, 64 requests over 8 workers (median of repeats).

Pipelined decode is measured by perf/pipelined.py. Writes perf/results/instances.json (+ .png)
and perf/results/instances-sim.json (+ .png). Run: python -m perf.instances
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from perf.common import RESULTS, parser, write_result
from perf.slo import isolated_ms, scrape, served_state

SIZES = ((128, 128), (256, 256), (512, 512))
SHARES = (2, 1, 1)
DIT = (4, 8, 32)  # layers, heads, head dim: degree 2 gains at 512 px here (1.5x), little at 128 px
# Engine settings per benchmarked variant (rssp's degrees are filled in from the measured table)
VARIANTS = {
    "fixed-1": {"policy": "fixed", "fixed_degree": 1},
    "fixed-2": {"policy": "fixed", "fixed_degree": 2},
    "rssp": {"policy": "rssp"},
    "edf-mh": {"policy": "edf-mh", "placement": "least-work"},
    "edf-mh-rr": {"policy": "edf-mh", "placement": "round-robin"},
    "tetris": {"policy": "tetris"},
}
FIXED = ("fixed-1", "fixed-2", "rssp")  # the fixed-degree baselines


def rssp_for(times: dict, efficiency: float = 0.65) -> str:
    """RSSP's degrees: per size the widest degree k with T(1) / (k T(k)) >= efficiency (k = 1 otherwise)."""
    out = []
    for (h, w), t in sorted(times.items()):
        k = max(k for k, tk in t.items() if k == 1 or t[1] / (k * tk) >= efficiency)
        if k > 1:
            out.append(f"{h}x{w}:{k}")
    return ",".join(out)


def amdahl(table, workers: int):
    """The degree table extended to `workers` by Amdahl's law per measured size (an assumption, not a
    measurement): ratio(k) = s + (1 - s) / k with s from the measured ratio(2)."""
    from tessera.cost import DegreeTable

    out = DegreeTable(workers, {k: [list(p) for p in v] for k, v in table.ratios.items()})
    k = 4
    while k <= workers:
        out.ratios[k] = [[cells, min(1.0, max(0.0, 2 * r2 - 1)) + (1 - min(1.0, max(0.0, 2 * r2 - 1))) / k]
                         for cells, r2 in table.ratios[2]]
        k *= 2
    return out


def sim_settings(settings: dict) -> dict:
    """A variant's engine settings as simulate() keywords, parsed and defaulted by EngineConfig as the server does."""
    from tessera.config import EngineConfig

    c = EngineConfig(**settings)
    return {"policy": c.policy, "placement": c.placement, "fixed_degree": c.fixed_degree, "rssp": c.degrees_per_size()}


def measure_table(repo: Path, workers: int, repeats: int):
    """The start-up profile, in-process, over `workers` pooled DiT workers: the cost model (predictor + T(size,
    k) ratios) and the raw seconds per size and degree."""
    from transformers import CLIPTokenizer

    from tessera.config import EngineConfig
    from tessera.executors.factory import make_pooled_denoiser
    from tessera.executors.ort import LocalComponents
    from tessera.generation import Txt2Img
    from tessera.profile import profile_costs, profile_degrees
    from tessera.spec import PipelineSpec

    spec = PipelineSpec.load(repo / "engine" / "1" / "manifest.json")
    toks = [CLIPTokenizer.from_pretrained(repo / "engine" / "1" / d) for d in spec.tokenizers]
    pipeline = Txt2Img(spec, LocalComponents(spec, repo), toks)
    denoiser = make_pooled_denoiser(EngineConfig(denoiser_runtime="torch", denoiser_workers=workers), spec, repo)
    try:
        cost = profile_costs(pipeline, denoiser, list(SIZES), spec.vae_scale_factor, repeats=repeats, max_batch=1)
        times: dict = {}
        cost.degrees = profile_degrees(pipeline, denoiser, list(SIZES), spec.vae_scale_factor, workers, 3 * repeats,
                                       times=times)
    finally:
        denoiser.pool.close()
    return cost, times


def dp_decision_time(requests: int = 64, workers: int = 8, repeats: int = 200) -> dict:
    """Median wall time of tetris's round decision (allocation per request, the group-knapsack DP over
    `workers`, placement, scale-up) and of the DP alone, `requests` waiting requests of mixed sizes."""
    from tessera.cost import CostModel, DegreeTable
    from tessera.degrees import TetrisPolicy, knapsack
    from tessera.plan import EngineView
    from tessera.predictor import LatencyPredictor
    from tessera.request import GenerationParams, RequestState

    p = LatencyPredictor()
    p.coef = np.array([0.002, 2e-6, 0.0, 0.0, 0.0, 0.0, 0.0])
    table = DegreeTable(workers, {k: [[512.0, 0.95 ** math.log2(k)], [8192.0, 0.6 ** math.log2(k)]]
                                  for k in (2, 4, 8) if k <= workers})
    cost = CostModel(p, vae_factor=8, degrees=table)
    rng = np.random.default_rng(0)
    states = []
    for i in range(requests):
        h, w = SIZES[int(rng.integers(len(SIZES)))]
        s = RequestState(f"r{i}", GenerationParams("x", "", h, w, 20, 5.0, i), 0.0)
        s.deadline_s = float(rng.uniform(0.5, 5.0))
        states.append(s)
    pol = TetrisPolicy(cost, round_steps=5)
    view = EngineView(tuple(states), ())
    round_s, dp_s = [], []
    options = [[(0, 0)] + [(k, int(rng.integers(1000))) for k in (1, 2, 4, 8)] for _ in range(requests)]
    for _ in range(repeats):
        t0 = time.perf_counter()
        pol.schedule(view, 0.0)
        round_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        knapsack(options, workers)
        dp_s.append(time.perf_counter() - t0)
    return {"requests": requests, "workers": workers, "repeats": repeats,
            "dp_ms_median": 1e3 * statistics.median(dp_s), "dp_ms_p99": 1e3 * float(np.percentile(dp_s, 99)),
            "round_ms_median": 1e3 * statistics.median(round_s), "round_ms_p99": 1e3 * float(np.percentile(round_s, 99))}


def build_parser():
    ap = parser("instances", __doc__)
    ap.add_argument("--loads", default="0.6,0.9,1.2,1.5", help="offered load as multiples of 2-worker capacity")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of arrivals per run")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per request")
    ap.add_argument("--slo-scale", type=float, default=5.0, help="SLO per size = k x its isolated latency")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first trace")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    ap.add_argument("--max-batch", type=int, default=4, help="engines' max_batch (edf-mh batches; the others do not)")
    ap.add_argument("--sim-workers", type=int, default=8, help="workers of the simulated comparison")
    ap.add_argument("--tag", default="", help="suffix of the result files (instances-TAG.json, instances-sim-TAG.json)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    suffix = f"-{args.tag}" if args.tag else ""
    import torch

    torch.set_num_threads(1)
    from tessera.bench.loadgen import replay, summarize
    from tessera.bench.simulate import sar, simulate
    from tessera.bench.traces import poisson
    from tessera.config import EngineConfig
    from tessera.cost import CostModel
    from tessera.server import TritonServer
    from tessera_export.repository import add_engine, export_pipeline
    from tessera_export.tiny import build_tiny

    work = Path(tempfile.mkdtemp(prefix="tessera-instances-"))
    pipeline = build_tiny(work / "dit", kind="dit", dit=DIT, progress=lambda *_: None)
    repo = work / "repo"
    export_pipeline(pipeline, repo, engine_config=EngineConfig(policy="step-fcfs", profile_sizes="128x128"),
                    progress=lambda *_: None)

    # 1. T(size, k), in-process
    cost, times = measure_table(repo, 2, repeats=5)
    table = {f"{h}x{w}": {"T_ms": {str(k): 1e3 * v for k, v in t.items()}, "speedup_2": t[1] / t[2],
                          "efficiency_2": t[1] / (2 * t[2])} for (h, w), t in times.items()}
    print(f"[tessera] T(size, k): {table}", flush=True)
    rssp = rssp_for(times)
    settings = {v: dict(VARIANTS[v]) for v in variants}
    if "rssp" in settings:
        settings["rssp"]["rssp"] = rssp
        if not rssp:
            print("[tessera] no size gains enough from degree 2 for RSSP: it equals fixed-1 here", flush=True)

    # 2. the real server
    common = dict(executor="local", denoiser_runtime="torch", denoiser_workers=2, max_batch=args.max_batch,
                  max_in_flight=64, slo_scale=args.slo_scale, profile_sizes=",".join(f"{h}x{w}" for h, w in SIZES))
    for v in variants:
        add_engine(repo, "engine", f"engine_{v}", entry=f"txt2img_{v}", **settings[v], **common)
    loads = [float(x) for x in args.loads.split(",")]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    traces, served = [], {}
    with TritonServer(repo, log_path=work / "server.log") as server:
        for v in variants:
            isolated_ms(server, f"txt2img_{v}", 2, 0, sizes=SIZES[:1])  # warm-up
        base = "fixed-1" if "fixed-1" in variants else variants[0]
        iso = isolated_ms(server, f"txt2img_{base}", args.steps, 3, sizes=SIZES)  # degree 1, alone
        slo = {k: args.slo_scale * v for k, v in iso.items()}
        mean_ms = sum(s * iso[k] for k, s in zip(SIZES, SHARES, strict=True)) / sum(SHARES)
        capacity = 2 * 1000.0 / mean_ms  # req/s: both workers busy at degree 1, one request each
        print(f"[tessera] isolated ms {iso}; 2-worker capacity ~{capacity:.3f} req/s", flush=True)
        for i, load in enumerate(loads):
            tr = poisson(load * capacity, args.duration, SIZES, SHARES, args.steps, args.seed + i)
            tr.save(RESULTS / "traces" / f"instances{suffix}-load{load:g}.json")
            traces.append(tr)
            for v in variants:
                before = served_state(server.metrics_url, f"engine_{v}")
                recs = replay(server.grpc_url, f"engine_{v}", tr, slo, stream=True, drain_s=300)
                after = served_state(server.metrics_url, f"engine_{v}")
                summary = summarize(recs, args.duration) | {"load": load, "rate_rps": load * capacity}
                summary["served_cost_terms"] = after["terms"]
                summary["served_sums"] = {"before": before["served"], "after": after["served"]}
                summary["served_gap_s"] = ((after["gap_total_s"] - before["gap_total_s"])
                                           / max(after["gaps"] - before["gaps"], 1))
                runs[v].append(summary)
                print(f"load {load:.2f} {v:10s} SAR {summary['slo_attainment']:.3f} p99 {summary['p99_latency_ms']} "
                      f"dropped {summary['dropped']} refused {summary['refused']} failed {summary['failed']}", flush=True)
        served["parallel_steps"] = {v: scrape(server.metrics_url, "tessera_parallel_steps_total", f"engine_{v}")
                                    for v in variants}

    # 3. the simulator: the same traces at N = 2 (served calibration), then N = args.sim_workers
    def served_cost(v: str, i: int) -> tuple[CostModel, float]:
        r = runs[v][i]
        c = CostModel.from_terms(r["served_cost_terms"], cost.vae_factor) if r["served_cost_terms"] else copy.deepcopy(cost)
        if not c.degrees.ratios:  # the served table when the engine exported it (its refit), else the profile's
            c.degrees = copy.deepcopy(cost.degrees)
        if "served_sums" in r:  # the run's mean multi_set and degree ratios, not the moving averages at its end
            c = c.served_means(r["served_sums"]["before"], r["served_sums"]["after"])
        return c, r["served_gap_s"]

    sim2 = []
    for i, load in enumerate(loads):
        row = {"load": load, "real": {}, "sim": {}}
        for v in variants:
            c, gap = served_cost(v, i)
            row["real"][v] = runs[v][i]["slo_attainment"]
            row["sim"][v] = sar(simulate(traces[i], cost=c, slo_ms=slo, workers=2, gap_s=gap, max_batch=args.max_batch,
                                         **sim_settings(settings[v])))
        sim2.append(row)
    gaps = [abs(r["sim"][v] - r["real"][v]) for r in sim2 for v in variants]

    n = args.sim_workers
    cost_n = copy.deepcopy(cost)
    cost_n.degrees = amdahl(cost.degrees, n)
    ratio_n = {f"{h}x{w}": {k: cost_n.degrees.ratio(k, (h // cost.vae_factor) * (w // cost.vae_factor) * 2) for k in cost_n.degrees.degrees()}
               for h, w in SIZES}
    times_n = {(h, w): {k: times[(h, w)][1] * r for k, r in ratio_n[f"{h}x{w}"].items()} for h, w in SIZES}
    rssp_n = rssp_for(times_n)
    variants_n = {f"fixed-{k}": {"policy": "fixed", "fixed_degree": k} for k in cost_n.degrees.degrees()}
    variants_n |= {"rssp": {"policy": "rssp", "rssp": rssp_n}, "edf-mh": {"policy": "edf-mh"},
                   "edf-mh-rr": {"policy": "edf-mh", "placement": "round-robin"}, "tetris": {"policy": "tetris"}}
    simn = []
    for i, load in enumerate(loads):
        tr = poisson(load * capacity * n / 2, args.duration, SIZES, SHARES, args.steps, args.seed + i)
        res = {}
        for v, s in variants_n.items():
            out = simulate(tr, cost=cost_n, slo_ms=slo, workers=n, max_batch=4 * n, **sim_settings(s))
            lat = [r.latency_ms for r in out if r.status == "ok"]
            res[v] = {"slo_attainment": sar(out), "p99_latency_ms": float(np.percentile(lat, 99)) if lat else None}
        simn.append({"load": load, "rate_rps": load * capacity * n / 2, "sim": res})

    # 4. the DP's decision time
    dp = dp_decision_time(64, 8)
    print(f"[tessera] DP decision time: {dp}", flush=True)

    comparison = []
    for i, load in enumerate(loads):
        fixed = [v for v in FIXED if v in runs]
        if not fixed or "tetris" not in runs:
            break
        best = max(fixed, key=lambda v: runs[v][i]["slo_attainment"])
        comparison.append({"load": load, "best_fixed": best, "best_fixed_sar": runs[best][i]["slo_attainment"],
                           "tetris_sar": runs["tetris"][i]["slo_attainment"],
                           "gain_points": 100 * (runs["tetris"][i]["slo_attainment"] - runs[best][i]["slo_attainment"])})
    placement = [{"load": load, **{v: {k: runs[v][i][k] for k in ("slo_attainment", "p99_latency_ms", "p50_latency_ms")}
                                   for v in ("edf-mh", "edf-mh-rr") if v in runs}} for i, load in enumerate(loads)]
    config = vars(args) | {"sizes": SIZES, "shares": SHARES, "dit": {"layers": DIT[0], "heads": DIT[1], "head_dim": DIT[2]},
                           "variants": settings, "engine": common, "workers": 2,
                           "isolated_ms": {f"{h}x{w}": v for (h, w), v in iso.items()},
                           "slo_ms": {f"{h}x{w}": v for (h, w), v in slo.items()}, "capacity_rps": capacity}
    write_result(f"instances{suffix}", config, {
        "degree_table_measured": table, "rssp": rssp, "policies": runs, "tetris_vs_best_fixed": comparison,
        "placement_least_work_vs_round_robin": placement, "served_parallel_steps": served["parallel_steps"],
        "dp_decision_time": dp, "degree_table_ratios": cost.degrees.to_json(), "profile_cost_terms": cost.terms(),
        "pipelined_decode": "measured by perf/pipelined.py (perf/results/pipelined.json)"})
    write_result(f"instances-sim{suffix}", config, {
        "n2": sim2, "sim_vs_real_max_abs_gap": max(gaps), "sim_vs_real_mean_abs_gap": float(np.mean(gaps)),
        f"n{n}": simn, f"n{n}_ratios_assumed_amdahl": ratio_n, f"n{n}_rssp": rssp_n,
        "calibration": "N = 2: each run's served cost terms and loop gap, the in-process T(size, k) table; "
                       f"N = {n}: the in-process profile, T(size, k) for k > 2 assumed (Amdahl from k = 2)"})
    _plots(runs, loads, sim2, simn, n, list(variants_n), suffix)
    print(f"[tessera] sim vs real at N=2: max gap {max(gaps):.3f}, mean {np.mean(gaps):.3f}; tetris vs best fixed: "
          f"{[(c['load'], round(c['gain_points'], 1)) for c in comparison]}", flush=True)
    return 0


def _plots(runs, loads, sim2, simn, n, variants_n, suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in runs:
        line, = axes[0].plot(loads, [r["slo_attainment"] for r in runs[v]], marker="o", label=v)
        axes[0].plot(loads, [r["sim"][v] for r in sim2], ls=":", color=line.get_color())
        axes[1].plot(loads, [r["p99_latency_ms"] or np.nan for r in runs[v]], marker="o", label=v)
    axes[0].set_title("Real server, 2 workers (dotted: simulator, same traces)", fontsize=9)
    axes[0].set_ylabel("SLO attainment")
    axes[0].set_ylim(0, 1.05)
    axes[1].set_title("p99 latency of completed requests", fontsize=9)
    axes[1].set_ylabel("ms")
    for ax in axes:
        ax.set_xlabel("offered load (x 2-worker degree-1 capacity)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"instances{suffix}.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in variants_n:
        ax.plot(loads, [r["sim"][v]["slo_attainment"] for r in simn], marker="o", label=v)
    ax.set_title(f"Simulator, {n} workers, T(size, k>2) assumed (Amdahl from measured k=2)", fontsize=9)
    ax.set_xlabel(f"offered load (x {n}-worker degree-1 capacity)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"instances-sim{suffix}.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
