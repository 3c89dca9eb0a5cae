"""DiffServe's cascade on the real server (issue 17): light-only, heavy-only, random routing at the cascade's
deferral fraction, a static threshold at that same fraction, and the controlled cascade, on one bursty trace.

1. One repository: the heavy reference pipeline (quality_models/heavy) exported once; the heavy engine runs the
   request's 50 steps, the light engine runs --light (a few-step student
   distilled from the heavy pipeline, `tessera train-student`, exported beside it as light_*) at --light-steps,
   or without --light the heavy weights themselves at --light-steps. The discriminator (quality_models/discriminator,
   `tessera train-discriminator`) is its own model; one cascade entry per routing.
2. Service costs measured first through the server: closed-loop throughput of each pipeline alone at concurrency 8
   (its batching included) gives core-seconds per request (each engine is one process), light + discriminator
   for the light one; the isolated heavy latency sets the SLO (--slo-scale x). The controlled cascade plans with
   these (light_s, heavy_s, 2 cores, at most one per engine: each is one single-threaded process).
3. The trace, DiffServe's way: an hourly Azure-like shape min-max rescaled to a band of rates (multiples of the
   heavy pipeline's measured capacity), each hour compressed to --seconds-per-hour, Poisson inside; prompts cycle
   the 48 shapes captions. Every variant replays the same trace.
4. Per variant: SLO violation ratio (answers after the deadline, and refusals and drops, over all requests), FD in
   evaluator features against real rendered images (on a random subset of the same size for every variant: FD is
   biased by N) and adherence, over the run and per window; the controlled cascade's threshold and demand over
   time (scraped from its metrics). The seed floor: FD between two in-process heavy sets of the same prompts and
   size, seeds apart. The static and random variants are loaded after the controlled run, at its measured
   deferral fraction (static: the profile's threshold for that fraction; random: the share static's routing
   deferred, heavy fallbacks included, so the discriminator and chance are compared at equal deferral).
5. The MILP's solve time: the controller's decisions re-solved in-process on the demands it saw (median, p99).

Writes perf/results/cascade.json (+ .png). Run: python -m perf.cascade (after tessera train-discriminator).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from perf.common import RESULTS, parser, write_result

SIZE = (64, 64)
GUIDANCE = 4.0  # the reference pipelines' guidance (quality harness)


def build_parser():
    ap = parser("cascade", __doc__)
    ap.add_argument("--models", default="quality_models", help="holds heavy/, evaluator.pt, discriminator/")
    ap.add_argument("--discriminator", default="", help="what train-discriminator wrote (default: MODELS/discriminator)")
    ap.add_argument("--tag", default="", help="suffix of the result files (cascade-TAG.json)")
    ap.add_argument("--steps", type=int, default=50, help="the heavy pipeline's steps (its default)")
    ap.add_argument("--light-steps", type=int, default=2, help="the light pipeline's steps")
    ap.add_argument("--light", default=None, help="the light pipeline's own weights (diffusers directory: a student "
                    "from `tessera train-student`; default MODELS/student); '': the heavy weights at --light-steps")
    ap.add_argument("--slo-scale", type=float, default=4.0, help="SLO = k x the heavy pipeline's isolated latency")
    ap.add_argument("--band", default="0.3,2.5", help="the trace's rate band, as multiples of heavy capacity")
    ap.add_argument("--seconds-per-hour", type=float, default=5.0, help="each trace hour compressed to this")
    ap.add_argument("--control-s", type=float, default=2.0, help="the controller's period")
    ap.add_argument("--fd-n", type=int, default=0, help="images per FD (0: the fewest any variant returned)")
    ap.add_argument("--windows", type=int, default=4, help="time windows of the per-window accounting")
    ap.add_argument("--seed", type=int, default=0, help="the trace's seed")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the results file")
    return ap


def closed_loop_rps(url: str, model: str, seconds: float, concurrency: int = 8, steps: int = 50) -> float:
    """Requests per second of `model` with `concurrency` requests always in flight, for `seconds`."""
    from tessera.client import infer_image, make_client, request_arrays

    done, stop = [0], time.perf_counter() + seconds
    lock = threading.Lock()

    def worker(k: int) -> None:
        c = make_client("grpc", url)
        i = 0
        while time.perf_counter() < stop:
            infer_image(c, "grpc", request_arrays("a red circle at top left", *SIZE, steps, GUIDANCE, 1000 * k + i,
                                                  slo_ms=600_000), model=model)  # capacity: no deadline binds
            i += 1
            with lock:
                done[0] += 1
        c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0] / (time.perf_counter() - t0)


def discriminator_s(url: str, record: dict, repeats: int = 50) -> float:
    """The served discriminator's median latency on one image (with 77 prompt tokens when it reads them)."""
    from tritonclient.grpc import InferenceServerClient, InferInput

    c = InferenceServerClient(url)
    x = np.random.default_rng(0).integers(0, 256, (1, *SIZE, 3), dtype=np.uint8)
    inputs = [InferInput("image", list(x.shape), "UINT8")]
    inputs[0].set_data_from_numpy(x)
    from tessera.options import DiscriminatorInput

    if DiscriminatorInput.parse("inputs", record.get("inputs", "image")) is DiscriminatorInput.IMAGE_PROMPT:
        inputs.append(InferInput("input_ids", [1, 77], "INT64"))
        inputs[1].set_data_from_numpy(np.full((1, 77), record["tokenizer"]["pad_id"], np.int64))
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        c.infer("discriminator", inputs)
        times.append(time.perf_counter() - t0)
    c.close()
    return statistics.median(times[1:])


FALLBACKS = ("heavy_at_its_cap", "heavy_out_of_time", "heavy_refused")  # deferred, then answered by the light image


def decided_deferral(url: str, model: str) -> float:
    """The share of a cascade entry's answers whose routing deferred them (tessera_cascade_answers_total): those
    the heavy pipeline answered, and those it could not take in time (answered by the light image: FALLBACKS)."""
    from perf.slo import scrape_all

    counts = [(lb.get("reason"), lb.get("pipeline"), v) for lb, v in scrape_all(url, "tessera_cascade_answers_total")
              if lb.get("model") == model]
    total = sum(v for *_, v in counts)
    return sum(v for r, p, v in counts if p == "heavy" or r in FALLBACKS) / total if total else 0.0


def sample_metrics(url: str, model: str, stop: threading.Event, out: list, t0: float, every_s: float = 0.5) -> None:
    from perf.slo import scrape

    while not stop.is_set():
        try:
            out.append({"t_s": time.perf_counter() - t0,
                        "threshold": scrape(url, "tessera_cascade_threshold", model),
                        "demand_rps": scrape(url, "tessera_cascade_demand_rps", model),
                        "expected_deferral": scrape(url, "tessera_cascade_expected_deferral", model),
                        "heavy_cap": scrape(url, "tessera_cascade_heavy_cap", model),
                        "solve_ms": scrape(url, "tessera_cascade_solve_ms", model)})
        except OSError:
            pass
        stop.wait(every_s)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        replot(args.tag)
        return 0
    import torch

    torch.set_num_threads(1)
    from tessera.bench.loadgen import replay
    from tessera.bench.traces import bursty
    from tessera.cascade import DeferralProfile
    from tessera.cascade_control import ServiceCosts, solve
    from tessera.config import EngineConfig
    from tessera.quality.accounting import by_window, real_features, served_quality
    from tessera.quality.discriminator import generate
    from tessera.quality.features import evaluator_features, load_evaluator
    from tessera.quality.metrics import frechet_distance
    from tessera.quality.shapes import all_labels, parse_caption
    from tessera.server import TritonServer
    from tessera_export.repository import add_cascade, add_discriminator, add_engine, export_pipeline

    models = Path(args.models)
    if args.light is None:
        args.light = str(models / "student")
    disc_dir = Path(args.discriminator) if args.discriminator else models / "discriminator"
    record = json.loads((disc_dir / "discriminator.json").read_text())
    profile = DeferralProfile.from_json(record["profile"])
    work = Path(tempfile.mkdtemp(prefix="tessera-cascade-"))
    repo = work / "repo"
    engine = dict(executor="local", policy="edf-mh", max_batch=8, max_in_flight=128, profile_sizes="64x64")
    export_pipeline(models / "heavy", repo, engine_config=EngineConfig(**engine), progress=lambda *_: None)
    if args.light:  # its own components and engine (light_engine), beside the heavy pipeline's
        export_pipeline(args.light, repo, prefix="light_", engine_config=EngineConfig(**engine), progress=lambda *_: None)
    else:
        add_engine(repo, "engine", "light_engine", **engine)
    add_discriminator(repo, disc_dir)
    common = dict(light_steps=args.light_steps, control_s=args.control_s)
    add_cascade(repo, "cascade_heavy", "light_engine", "engine", routing="heavy", **common)
    add_cascade(repo, "cascade_light", "light_engine", "engine", routing="light", **common)
    ev = load_evaluator(models / "evaluator.pt")
    runs, series = {}, []
    with TritonServer(repo, log_path=work / "server.log") as server:
        from perf.slo import isolated_ms

        for m in ("cascade_heavy", "cascade_light"):
            isolated_ms(server, m, args.steps, 0, sizes=(SIZE,), guidance=GUIDANCE)  # warm-up
        iso_heavy = isolated_ms(server, "cascade_heavy", args.steps, 5, sizes=(SIZE,), guidance=GUIDANCE)[SIZE]
        iso_light = isolated_ms(server, "cascade_light", args.steps, 5, sizes=(SIZE,), guidance=GUIDANCE)[SIZE]
        disc_s = discriminator_s(server.grpc_url, record)
        rps_heavy = closed_loop_rps(server.grpc_url, "cascade_heavy", 15.0, steps=args.steps)
        rps_light = closed_loop_rps(server.grpc_url, "cascade_light", 10.0, steps=args.steps)
        costs = ServiceCosts(light_s=1.0 / rps_light + disc_s, heavy_s=1.0 / rps_heavy)
        slo_ms = args.slo_scale * iso_heavy
        print(f"[tessera] isolated ms heavy {iso_heavy:.0f} light {iso_light:.0f} (x{iso_heavy / iso_light:.1f}), "
              f"discriminator {1e3 * disc_s:.1f} ms; closed-loop rps heavy {rps_heavy:.2f} light {rps_light:.2f}; "
              f"SLO {slo_ms:.0f} ms", flush=True)
        # each engine is one process with one thread: at most one core each, whatever the split (the core-seconds
        # above are per request on that one core)
        add_cascade(repo, "cascade_controlled", "light_engine", "engine", routing="controlled", cores=2,
                    light_max_cores=1, heavy_max_cores=1, light_s=round(costs.light_s, 5),
                    heavy_s=round(costs.heavy_s, 5), **common)
        server.load("cascade_controlled")

        lo, hi = (float(x) * rps_heavy for x in args.band.split(","))
        trace = bursty(lo, hi, (SIZE,), (1,), args.steps, args.seed, seconds_per_hour=args.seconds_per_hour)
        captions = [lb.caption for lb in all_labels()]
        trace = dataclasses.replace(trace, requests=tuple(dataclasses.replace(r, prompt=captions[i % len(captions)])
                                                          for i, r in enumerate(trace.requests)))
        trace.save(RESULTS / "traces" / f"cascade{'-' + args.tag if args.tag else ''}.json")
        duration = trace.params["hours"] * args.seconds_per_hour
        slo = {SIZE: slo_ms}

        def run(variant: str) -> list:
            model = f"cascade_{variant}"
            stop, samples, t0 = threading.Event(), [], time.perf_counter()
            sampler = threading.Thread(target=sample_metrics, args=(server.metrics_url, model, stop, samples, t0))
            if variant == "controlled":
                sampler.start()
            recs = replay(server.grpc_url, model, trace, slo, guidance=GUIDANCE, drain_s=120, keep_images=True)
            stop.set()
            if variant == "controlled":
                sampler.join()
                series.extend(samples)
            ok = [r for r in recs if r.status == "ok"]
            light = sum(r.served_by == "light" for r in ok)
            print(f"[tessera] {variant:10s} met {sum(r.met for r in recs)}/{len(recs)}, light {light}/{len(ok)}, "
                  f"statuses {sorted({r.status for r in recs})}", flush=True)
            return recs

        for v in ("heavy", "light", "controlled"):
            runs[v] = run(v)
        # static: the profile's threshold for the share the controlled run's routing deferred; random: the share
        # static's deferred (equal deferral: the discriminator's routing against chance)
        static_t = profile.threshold_for(decided_deferral(server.metrics_url, "cascade_controlled"))
        add_cascade(repo, "cascade_static", "light_engine", "engine", routing="static", threshold=static_t, **common)
        server.load("cascade_static")
        runs["static"] = run("static")
        # the share static's routing deferred (served deferral is lower: at bursts the heavy engine refuses or
        # runs out of time and the light image serves, more often than not for either routing), so that random
        # routing defers as often by decision and then meets the same fallbacks
        deferral = decided_deferral(server.metrics_url, "cascade_static")
        add_cascade(repo, "cascade_random", "light_engine", "engine", routing="random",
                    defer_fraction=round(deferral, 4), **common)
        server.load("cascade_random")
        runs["random"] = run("random")
        # shares of each entry's answers: the trace's alone, except heavy and light (their warm-up and closed loops)
        decided = {v: decided_deferral(server.metrics_url, f"cascade_{v}") for v in runs}

    # quality accounting on what was returned
    real = real_features(ev, 1000)
    returned = {v: [r for r in recs if r.status == "ok" and r.image is not None] for v, recs in runs.items()}
    from tessera.quality.accounting import MIN_FD_IMAGES

    n_fd = args.fd_n or max(min(len(x) for x in returned.values()), MIN_FD_IMAGES)  # fewer: that variant has no FD
    # seed floor: two in-process heavy sets, the trace's first n_fd prompts, seeds apart
    prompts = [r.prompt for r in trace.requests[:n_fd]]
    jobs_a = [(parse_caption(p), 10_000 + i) for i, p in enumerate(prompts)]
    jobs_b = [(parse_caption(p), 20_000 + i) for i, p in enumerate(prompts)]
    set_a = generate(models / "heavy", jobs_a, args.steps, GUIDANCE)
    set_b = generate(models / "heavy", jobs_b, args.steps, GUIDANCE)
    fa, fb = evaluator_features(ev, set_a)[0], evaluator_features(ev, set_b)[0]
    seed_floor = frechet_distance(fa, fb)
    window_s = duration / args.windows
    variants = {}
    for v, recs in runs.items():
        ok = returned[v]
        q = served_quality(ev, [r.image for r in ok], [r.prompt for r in ok], real, n_fd=n_fd)
        variants[v] = {
            "requests": len(recs), "answered": len(ok), "met": sum(r.met for r in recs),
            "violation_ratio": 1 - sum(r.met for r in recs) / len(recs),
            "statuses": {s: sum(r.status == s for r in recs) for s in sorted({r.status for r in recs})},
            "served_by": {m: sum(r.served_by == m for r in ok) for m in ("light", "heavy")},
            "deferral": sum(r.served_by == "heavy" for r in ok) / max(len(ok), 1),
            "decided_deferral": decided[v],
            "p99_latency_ms": float(np.percentile([r.latency_ms for r in ok], 99)) if ok else None,
            **{k: q[k] for k in ("adherence", "colour", "shape", "position", "fd", "fd_n")},
            "windows": by_window(ev, recs, real, window_s),
        }
    # the MILP's solve time, re-solved in-process on the demands the controller saw
    demands = [s["demand_rps"] for s in series if s.get("demand_rps")] or [lo, hi]
    solve_ms = []
    for d in demands:
        t0 = time.perf_counter()
        solve(d, profile, costs, slo_ms / 1e3, 2.0)
        solve_ms.append(1e3 * (time.perf_counter() - t0))
    heavy_v, ctl = variants["heavy"], variants["controlled"]
    goals = {
        "violation_reduction_vs_heavy": (1 - ctl["violation_ratio"] / heavy_v["violation_ratio"])
        if heavy_v["violation_ratio"] > 0 else None,
        "violation_goal_19pct_met": heavy_v["violation_ratio"] > 0
        and ctl["violation_ratio"] <= 0.81 * heavy_v["violation_ratio"],
        "fd_controlled_minus_heavy": ctl["fd"] - heavy_v["fd"] if ctl["fd"] is not None and heavy_v["fd"] is not None else None,
        "fd_goal_met": ctl["fd"] is not None and heavy_v["fd"] is not None and ctl["fd"] <= heavy_v["fd"] + seed_floor,
        "discriminator_vs_random_adherence": variants["static"]["adherence"] - variants["random"]["adherence"]
        if variants["static"]["adherence"] is not None and variants["random"]["adherence"] is not None else None,
        "discriminator_vs_random_fd": variants["static"]["fd"] - variants["random"]["fd"]
        if variants["static"]["fd"] is not None and variants["random"]["fd"] is not None else None,
    }
    config = vars(args) | {"size": SIZE, "guidance": GUIDANCE, "engine": engine, "slo_ms": slo_ms,
                           "iso_heavy_ms": iso_heavy, "iso_light_ms": iso_light, "discriminator_ms": 1e3 * disc_s,
                           "light_cost_ratio_isolated": iso_heavy / iso_light,
                           "closed_loop_rps": {"heavy": rps_heavy, "light": rps_light},
                           "service_costs": dataclasses.asdict(costs), "rate_band_rps": [lo, hi],
                           "trace_requests": len(trace.requests), "trace_duration_s": duration,
                           "discriminator": {"dir": str(disc_dir), "inputs": record.get("inputs", "image"),
                                             **{k: record[k] for k in ("held_out", "train", "light", "heavy")}},
                           "light_training": json.loads((Path(args.light) / "training.json").read_text())
                           if args.light and (Path(args.light) / "training.json").exists() else None}
    suffix = f"-{args.tag}" if args.tag else ""
    write_result(f"cascade{suffix}", config, {
        "variants": variants, "seed_floor_fd": seed_floor, "fd_n": n_fd, "static_threshold": static_t,
        "random_defer_fraction": deferral, "controller_series": series,
        "milp_solve_ms": {"median": statistics.median(solve_ms), "p99": float(np.percentile(solve_ms, 99)),
                          "decisions": len(solve_ms)},
        "goals": goals})
    _plot(variants, series, trace, args.seconds_per_hour, seed_floor, suffix)
    print(f"[tessera] cascade: {json.dumps(goals)}", flush=True)
    return 0


def _plot(variants, series, trace, sph, floor, suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    t = [s["t_s"] for s in series]
    ax = axes[0]
    ax.plot(t, [s["expected_deferral"] for s in series], label="f(threshold): expected share deferred")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("s")
    ax2 = ax.twinx()
    arr = np.array([r.t for r in trace.requests])
    edges = np.arange(0, arr.max() + sph, sph)
    ax2.plot(edges[:-1], np.histogram(arr, edges)[0] / sph, color="grey", alpha=0.6, label="offered rps")
    ax2.plot(t, [s["demand_rps"] for s in series], color="black", ls="--", label="demand estimate")
    ax2.set_ylabel("requests / s")
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    ax.set_title("Controlled cascade over the bursty trace", fontsize=9)
    axes[1].plot(t, [max(s["threshold"] or 0.0, 1e-6) for s in series])
    axes[1].set_yscale("log")
    axes[1].set_xlabel("s")
    axes[1].set_title("Threshold on P(real) in force (log; 1 = defer all)", fontsize=9)
    names = list(variants)
    axes[2].bar(names, [variants[v]["violation_ratio"] for v in names])
    axes[2].set_title("SLO violation ratio (late, refused or dropped)", fontsize=9)
    axes[3].bar(names, [variants[v]["fd"] or 0 for v in names])
    axes[3].axhline((variants["heavy"]["fd"] or 0) + floor, color="red", ls=":", label="heavy-only + seed floor")
    axes[3].set_title("FD (evaluator features) vs real images, same N", fontsize=9)
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"cascade{suffix}.png", dpi=120)


def replot(tag: str = "") -> None:
    """Redraw the PNG from the results file and its trace (no server)."""
    from tessera.bench.traces import Trace

    suffix = f"-{tag}" if tag else ""
    d = json.loads((RESULTS / f"cascade{suffix}.json").read_text())
    trace = Trace.load(RESULTS / "traces" / f"cascade{suffix}.json")
    _plot(d["variants"], d["controller_series"], trace, d["config"]["seconds_per_hour"], d["seed_floor_fd"], suffix)


if __name__ == "__main__":
    raise SystemExit(main())
