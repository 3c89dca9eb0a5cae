"""Simulated scaling: N = 1, 2, 4, 8 engine instances at the same load *per instance*, every policy on
the same seeded traces, with the oracle reference. (perf.slo's 2/4/8-instance figures keep the
single-instance load, where more instances trivially serve everything.)

Costs: the cost model and loop gap a served engine ended a real run with, read from perf/results/slo.json
(the rounds engine at 1.0x, first trace), so no server runs here. Baseline: image-fcfs in the same run.
Writes perf/results/sim-scaling.json + sim-scaling.png. Run: python -m perf.sim_scaling
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from perf.common import RESULTS, parser, write_result
from perf.slo import SIZES, simulate_variant


def build_parser() -> argparse.ArgumentParser:
    ap = parser("sim_scaling", __doc__)
    ap.add_argument("--loads", default="0.9,1.0,1.1,1.3", help="offered load per instance, x one instance's capacity")
    ap.add_argument("--instances", default="1,2,4,8", help="engine instance counts, comma-separated")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per trace")
    ap.add_argument("--seeds", type=int, default=3, help="traces per load and instance count (>= 1)")
    ap.add_argument("--calibration", default="rounds@1", help="POLICY@LOAD of the slo.json run whose served costs are used")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds: allowed >= 1, got {args.seeds}")

    from tessera.bench.simulate import oracle, sar
    from tessera.bench.traces import poisson
    from tessera.cost import CostModel

    slo_doc = json.loads((RESULTS / "slo.json").read_text())
    cfg = slo_doc["config"]
    slo = {tuple(int(x) for x in k.split("x")): v for k, v in cfg["slo_ms"].items()}
    capacity, steps = cfg["capacity_rps"], cfg["steps"]
    policy, at = args.calibration.split("@")
    run = next(r for r in slo_doc["policies"][policy] if f"{r['load']:g}" == f"{float(at):g}")["traces"][0]
    cost, gap = CostModel.from_terms(run["served_cost_terms"], 8), run["served_gap_s"]
    variants = list(slo_doc["policies"])
    loads = [float(x) for x in args.loads.split(",")]
    ns = [int(x) for x in args.instances.split(",")]
    rows = []
    for n in ns:
        for load in loads:
            traces = [poisson(load * n * capacity, args.duration, SIZES, (1, 1, 1), steps, 7919 * k + int(load * 100) + n)
                      for k in range(args.seeds)]
            row = {"instances": n, "load_per_instance": load, "requests": sum(len(t.requests) for t in traces)}
            for v in variants:
                row[v] = sar([r for t in traces for r in simulate_variant(t, v, cost, slo, instances=n, gap_s=gap)])
            row["oracle"] = float(np.mean([m for t in traces for m in oracle(t, cost, slo, instances=n)]))
            rows.append(row)
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    config = vars(args) | {"sizes": SIZES, "slo_ms": cfg["slo_ms"], "capacity_rps": capacity, "steps": steps,
                           "calibration_terms": run["served_cost_terms"], "calibration_gap_s": gap,
                           "dispatch": "least predicted backlog (replicas; no per-step parallelism degree)",
                           "baseline": "image-fcfs"}
    write_result("sim-scaling", config, {"rows": rows})
    _plot(rows, ns, loads)
    return 0


def _plot(rows, ns, loads) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(loads), figsize=(3.2 * len(loads), 3.4), sharey=True)
    for ax, load in zip(np.atleast_1d(axes), loads, strict=True):
        sub = [r for r in rows if r["load_per_instance"] == load]
        for key, style in (("image-fcfs", "o-"), ("rounds", "s-"), ("rounds-degrade", "^-"), ("oracle", "k:")):
            ax.plot(ns, [r[key] for r in sub], style, label=key)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_title(f"{load:g}x per instance", fontsize=9)
        ax.set_xlabel("instances")
        ax.set_ylim(0, 1.05)
    np.atleast_1d(axes)[0].set_ylabel("simulated SLO attainment")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "sim-scaling.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
