"""SLO attainment of the four policies on the real server, one run, one server build, the same seeded
traces; then the simulator on the same traces (1 instance: validation; 1/2/4/8: scaling, with the
oracle reference), and an overload phase (3x capacity) checking every request is answered.

SLO per resolution = k x its isolated latency, measured through the server (lone requests) before the
runs; the client sends it as slo_ms so every policy is held to the same deadlines.
Writes perf/results/slo.json + slo.png and perf/results/sim.json + sim.png; traces in perf/results/traces/.
Run: python -m perf.slo
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.request
from pathlib import Path

import numpy as np

from perf.common import RESULTS, parser, tiny_unet_repo, write_result

POLICIES = ("image-fcfs", "step-fcfs", "slack", "rounds", "rounds-degrade")
# Engine settings per benchmarked variant: the policy, and what happens to hopeless requests.
VARIANTS = {p: {"policy": p, "on_hopeless": "drop"} for p in POLICIES[:4]} | {
    # fewer steps instead of a drop (never below half the steps asked): shortened at admission when the
    # plan would otherwise set a request aside, or once hopeless
    "rounds-degrade": {"policy": "rounds", "on_hopeless": "degrade", "min_steps": 10},
}
SIZES = ((128, 128), (128, 256), (256, 256))


def simulate_variant(trace, variant: str, cost, slo_ms: dict, **kw):
    """tessera.bench.simulate.simulate with a benchmarked variant's engine settings."""
    from tessera.bench.simulate import simulate

    settings = dict(VARIANTS[variant])
    return simulate(trace, settings.pop("policy"), cost, slo_ms, **settings, **kw)


def isolated_ms(server, model: str, steps: int, repeats: int, sizes=SIZES,
                guidance: float = 5.0) -> dict[tuple[int, int], float]:
    """Median latency of lone requests per size (after one warm-up each), through the server."""
    from tessera.client import infer_image, make_client, request_arrays

    c = make_client("grpc", server.grpc_url)
    out = {}
    for h, w in sizes:
        times = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            infer_image(c, "grpc", request_arrays("a red circle at top left", h, w, steps, guidance, i),
                        model=model)
            if i:
                times.append((time.perf_counter() - t0) * 1e3)
        if times:
            out[(h, w)] = statistics.median(times)
    c.close()
    return out


def scrape_all(url: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of one metric from Triton's Prometheus text: (labels, value)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            pairs = (kv.split("=", 1) for kv in labels.split(",") if kv)
            out.append(({k: v.strip('"') for k, v in pairs}, float(value)))
    return out


def scrape(url: str, name: str, model: str) -> float | None:
    return next((v for labels, v in scrape_all(url, name) if labels == {"model": model}), None)


def served_state(url: str, model: str) -> dict:
    """The cost model a served engine plans with now (metric tessera_cost_model), its loop-gap totals and the sums
    behind its moving averages (tessera_cost_served_seconds_total: CostModel.served_means of two readings)."""
    return {"terms": {labels["term"]: v for labels, v in scrape_all(url, "tessera_cost_model")
                      if labels.get("model") == model},
            "gap_total_s": scrape(url, "tessera_step_gap_seconds_total", model) or 0.0,
            "served": {labels["sum"]: v for labels, v in scrape_all(url, "tessera_cost_served_seconds_total")
                       if labels.get("model") == model},
            "gaps": scrape(url, "tessera_step_gaps_total", model) or 0.0}


def build_parser() -> argparse.ArgumentParser:
    ap = parser("slo", __doc__)
    ap.add_argument("--loads", default="0.6,0.9,1.0,1.05,1.1,1.3", help="offered load as multiples of capacity")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per run")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per request")
    ap.add_argument("--slo-scale", type=float, default=5.0, help="SLO per size = k x its isolated latency")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first trace")
    ap.add_argument("--seeds", type=int, default=3, help="traces per load (seeds seed+i, +1000, +2000, ...); "
                    "SAR is pooled over them: near capacity one 30 s trace decides too much")
    ap.add_argument("--overload-s", type=float, default=60.0,
                    help="seconds of the 3x overload phase (0: none)")
    ap.add_argument("--max-in-flight", type=int, default=48, help="engines' admission bound")
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="comma-separated subset of the benchmarked variants")
    ap.add_argument("--tag", default="", help="suffix of the result files (slo-TAG.json, sim-TAG.json)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds: allowed >= 1, got {args.seeds}")
    policies = tuple(p for p in POLICIES if p in args.policies.split(","))
    suffix = f"-{args.tag}" if args.tag else ""

    from tessera.bench.loadgen import replay, summarize
    from tessera.bench.simulate import oracle, sar
    from tessera.bench.traces import poisson
    from tessera.cost import CostModel
    from tessera.server import TritonServer
    from tessera_export.repository import add_engine

    work, _, repo = tiny_unet_repo("slo")
    common = dict(executor="local", max_batch=16, max_in_flight=args.max_in_flight, slo_scale=args.slo_scale,
                  profile_sizes=",".join(f"{h}x{w}" for h, w in SIZES))
    for p in policies:
        add_engine(repo, "engine", f"engine_{p}", entry=f"txt2img_{p}", **VARIANTS[p], **common)
    traces_dir = RESULTS / "traces"
    runs, loads = {p: [] for p in policies}, [float(x) for x in args.loads.split(",")]
    with TritonServer(repo, log_path=work / "server.log") as server:
        for p in policies:  # warm-up (each engine has profiled itself at load: executor local)
            try:
                isolated_ms(server, f"txt2img_{p}", 2, 0)
            except Exception as e:  # noqa: BLE001 - a dropped warm-up request is fine
                print(f"[tessera] warm-up {p}: {e}")
        iso = isolated_ms(server, f"txt2img_{policies[0]}", args.steps, 3)  # lone requests: any policy
        slo = {k: args.slo_scale * v for k, v in iso.items()}
        capacity = 1000.0 / float(np.mean(list(iso.values())))  # req/s, equal shares, one at a time
        print(f"[tessera] isolated ms {iso}; capacity ~{capacity:.2f} req/s", flush=True)
        traces = []  # per load: its traces
        for i, load in enumerate(loads):
            traces.append([])
            for k in range(args.seeds):
                tr = poisson(load * capacity, args.duration, SIZES, (1, 1, 1), args.steps, args.seed + i + 1000 * k)
                tr.save(traces_dir / f"slo{suffix}-load{load:g}-trace{k}.json")
                traces[i].append(tr)
            for p in policies:
                recs, per_trace = [], []
                for k, tr in enumerate(traces[i]):
                    before = served_state(server.metrics_url, f"engine_{p}")
                    got = replay(server.grpc_url, f"engine_{p}", tr, slo, stream=True)
                    after = served_state(server.metrics_url, f"engine_{p}")
                    # What the engine planned with at the end of this trace, and its mean loop gap during it:
                    # the simulator replays this trace with exactly these (its calibration from the served run).
                    per_trace.append({
                        "trace": k, "requests": len(got), "slo_attainment": summarize(got)["slo_attainment"],
                        "served_cost_terms": after["terms"],
                        "served_gap_s": (after["gap_total_s"] - before["gap_total_s"]) / max(after["gaps"] - before["gaps"], 1),
                    })
                    recs += got
                summary = summarize(recs, args.duration * len(traces[i]))  # pooled over the load's traces
                summary["traces"] = per_trace
                summary["load"] = load
                summary["rate_rps"] = load * capacity
                ran = [r.steps_run for r in recs if r.status == "ok" and r.steps_run is not None]
                summary["degraded"] = int(sum(n < args.steps for n in ran))  # served with fewer steps
                summary["steps_run_mean"] = float(np.mean(ran)) if ran else None
                runs[p].append(summary)
                each = " ".join(f"{t['slo_attainment']:.3f}" for t in per_trace)
                print(f"load {load:.2f} {p:14s} SAR {summary['slo_attainment']:.3f} (traces {each}) dropped {summary['dropped']} "
                      f"degraded {summary['degraded']} rejected {summary['rejected']} failed {summary['failed']} "
                      f"{next((r.message[:160] for r in recs if r.status == 'error'), '')}", flush=True)
        mape = scrape(server.metrics_url, "tessera_predictor_mape", "engine_slack")
        # Overload: 3x capacity, bounded admission: everyone answered, rejections at once (perf.overload
        # runs it with a tight admission bound, where rejections do happen). --overload-s 0 skips it.
        overload = None
        if args.overload_s > 0:
            over = poisson(3.0 * capacity, args.overload_s, SIZES, (1, 1, 1), args.steps, args.seed + 99)
            over.save(traces_dir / f"slo{suffix}-overload3x.json")
            recs = replay(server.grpc_url, "engine_slack", over, slo, drain_s=300, stream=True)
            rejected = [r.latency_ms for r in recs if r.status == "rejected"]
            overload = summarize(recs, args.overload_s) | {
                "load": 3.0, "answered": sum(r.status != "pending" for r in recs),
                "rejection_latency_ms_max": max(rejected) if rejected else None,
                "rejection_latency_ms_p99": float(np.percentile(rejected, 99)) if rejected else None,
                "server_ready_after": server.is_ready(),
            }
            print(f"overload 3x: {overload['requests']} sent, {overload['answered']} answered, "
                  f"{len(rejected)} rejected (max {overload['rejection_latency_ms_max']} ms), "
                  f"ready after: {overload['server_ready_after']}", flush=True)

    # The simulator on the same traces. Costs: for each (load, policy) run, the served engine's own cost
    # model at the end of that run (start-up profile + online refits, metric tessera_cost_model) and its
    # mean loop gap during it; for comparison, also a cost model profiled in-process after the runs.
    cost = _profile_in_process(repo)
    sim_rows = []
    for i, load in enumerate(loads):
        def served(p, k):
            t = runs[p][i]["traces"][k]
            return (CostModel.from_terms(t["served_cost_terms"], cost.vae_factor) if t["served_cost_terms"] else cost,
                    t["served_gap_s"])

        def sim(p, n=1, in_process=False):
            """Simulated SAR pooled over the load's traces, each replayed with its served calibration."""
            out = []
            for k, tr in enumerate(traces[i]):
                c, gap = served(p, k)
                out += simulate_variant(tr, p, cost if in_process else c, slo, instances=n, gap_s=gap)
            return sar(out)

        row = {"load": load, "real": {p: runs[p][i]["slo_attainment"] for p in policies}}
        row["sim"] = {n: {p: sim(p, n) for p in policies} for n in (1, 2, 4, 8)}
        row["sim_in_process_profile"] = {p: sim(p, in_process=True) for p in policies}
        ref = [served("rounds", k)[0] if "rounds" in runs else cost for k in range(len(traces[i]))]
        row["oracle"] = {n: float(np.mean([m for k, tr in enumerate(traces[i]) for m in oracle(tr, ref[k], slo, instances=n)]))
                         for n in (1, 2, 4, 8)}
        sim_rows.append(row)
    gaps = [abs(r["sim"][1][p] - r["real"][p]) for r in sim_rows for p in policies]

    best = {}
    for i, load in enumerate(loads):
        if "image-fcfs" not in runs:
            break
        base = runs["image-fcfs"][i]["slo_attainment"]
        ours = [p for p in policies if p not in ("image-fcfs", "step-fcfs")] or ["step-fcfs"]
        top = max(ours, key=lambda p: runs[p][i]["slo_attainment"])
        full = max([p for p in ours if VARIANTS[p]["on_hopeless"] == "drop"] or ours,
                   key=lambda p: runs[p][i]["slo_attainment"])  # every image all its steps
        best[f"{load:g}"] = {"image_fcfs": base, "best_policy": top, "best": runs[top][i]["slo_attainment"],
                             "gain_points": 100 * (runs[top][i]["slo_attainment"] - base),
                             "best_full_steps_policy": full,
                             "gain_points_full_steps": 100 * (runs[full][i]["slo_attainment"] - base)}
    config = vars(args) | {"sizes": SIZES, "shares": [1, 1, 1], "policies": policies, "model": "tiny UNet",
                           "engine": common, "isolated_ms": {f"{h}x{w}": v for (h, w), v in iso.items()},
                           "slo_ms": {f"{h}x{w}": v for (h, w), v in slo.items()}, "capacity_rps": capacity,
                           "baseline": "image-fcfs"}
    write_result(f"slo{suffix}", config, {"policies": runs, "comparison": best,
                                          "predictor_mape_out_of_sample": mape, "overload": overload})
    write_result(f"sim{suffix}", config, {"rows": sim_rows, "in_process_cost_terms": cost.terms(),
                                          "sim_in_process_profile_vs_real_mean_abs_gap": float(np.mean(
                                              [abs(r["sim_in_process_profile"][p] - r["real"][p])
                                               for r in sim_rows for p in policies])),
                                          "sim_vs_real_max_abs_gap": max(gaps),
                                          "sim_vs_real_mean_abs_gap": float(np.mean(gaps))})
    _plots(runs, loads, sim_rows, suffix)
    print(f"predictor MAPE (served, out of sample): {mape}; sim vs real max gap {max(gaps):.3f}")
    return 0


def _profile_in_process(repo: Path):
    from transformers import CLIPTokenizer

    from tessera.executors.denoise import ConcatDenoiser
    from tessera.executors.ort import LocalComponents
    from tessera.generation import Txt2Img
    from tessera.profile import profile_costs
    from tessera.spec import PipelineSpec

    spec = PipelineSpec.load(repo / "engine" / "1" / "manifest.json")
    toks = [CLIPTokenizer.from_pretrained(repo / "engine" / "1" / d) for d in spec.tokenizers]
    comps = LocalComponents(spec, repo)
    return profile_costs(Txt2Img(spec, comps, toks), ConcatDenoiser(comps.denoise), list(SIZES),
                         spec.vae_scale_factor, repeats=5, max_batch=16)


def _plots(runs, loads, sim_rows, suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for p in runs:
        ax.plot(loads, [r["slo_attainment"] for r in runs[p]], marker="o", label=p)
    ax.set_xlabel("offered load (x capacity)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("Real server, 3 resolutions, SLO = 5x isolated, SAR pooled over each load's traces (CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"slo{suffix}.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for n in (1, 2, 4, 8):
        ax.plot(loads, [r["sim"][n]["rounds"] for r in sim_rows], marker="o", label=f"rounds, {n} inst.")
        ax.plot(loads, [r["oracle"][n] for r in sim_rows], ls=":", color=ax.lines[-1].get_color())
    ax.plot(loads, [r["real"]["rounds"] for r in sim_rows], "k*", label="real server (rounds), 1 inst.")
    ax.set_xlabel("offered load (x single-instance capacity)")
    ax.set_ylabel("SLO attainment")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7)
    ax.set_title("Simulator (dotted: oracle reference)")
    fig.tight_layout()
    fig.savefig(RESULTS / f"sim{suffix}.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
