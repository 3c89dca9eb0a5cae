"""Overload: 3x capacity for 60 s against one engine (policy rounds, the default admission bound), early
refusal on, strict and off on the same trace (and the simulator on that trace with each served engine's
cost model). Every request must get a response (an image, a refusal at admission,
a later "deadline cannot be met" drop, or an "overloaded" rejection); with early refusal, refusals must
come within 100 ms of arrival; the server must be ready afterwards. Both clients are measured: gRPC
streaming to the decoupled engine, and unary calls to the txt2img facade.

Writes perf/results/overload.json (+ .png). Run: python -m perf.overload
"""

from __future__ import annotations

import argparse

import numpy as np

from perf.common import RESULTS, parser, tiny_unet_repo, write_result
from perf.slo import SIZES, isolated_ms, scrape_all

SETTINGS = {"early-refusal": "on", "strict-refusal": "strict", "late-refusal": "off"}  # engine setting early_refusal
NO = ("refused", "dropped", "rejected")  # the UNAVAILABLE answers


def _latencies(recs, status: str) -> list[float]:
    return [r.latency_ms for r in recs if r.status == status]


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def build_parser() -> argparse.ArgumentParser:
    ap = parser("overload", __doc__)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of offered load per run")
    ap.add_argument("--load", type=float, default=3.0, help="offered load, x capacity")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per request")
    ap.add_argument("--policy", default="rounds", choices=("slack", "rounds"), help="policy of every engine")
    ap.add_argument("--max-in-flight", type=int, default=256, help="admission bound")
    ap.add_argument("--seed", type=int, default=99, help="trace seed")
    ap.add_argument("--name", default="overload", help="result file name")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from tessera.bench.loadgen import replay, summarize
    from tessera.bench.traces import poisson
    from tessera.server import TritonServer
    from tessera_export.repository import add_engine

    work, _, repo = tiny_unet_repo("overload")
    engine = dict(executor="local", policy=args.policy, max_batch=16, max_in_flight=args.max_in_flight,
                  profile_sizes=",".join(f"{h}x{w}" for h, w in SIZES))
    for name, switch in SETTINGS.items():
        add_engine(repo, "engine", f"engine_{name}", entry=f"txt2img_{name}", early_refusal=switch, **engine)
    out: dict[str, dict] = {}
    with TritonServer(repo, log_path=work / "server.log") as server:
        iso = isolated_ms(server, "txt2img_late-refusal", args.steps, 2)
        slo = {k: 5.0 * v for k, v in iso.items()}
        capacity = 1000.0 / float(np.mean(list(iso.values())))
        tr = poisson(args.load * capacity, args.duration, SIZES, (1, 1, 1), args.steps, args.seed)
        for name in SETTINGS:
            for client, model, stream in (("grpc-stream", f"engine_{name}", True), ("grpc-unary", f"txt2img_{name}", False)):
                recs = replay(server.grpc_url, model, tr, slo, drain_s=300, stream=stream)
                row = summarize(recs, args.duration)
                raw = row.pop("raw")
                no = [x for s in NO for x in _latencies(recs, s)]
                row |= {"model": model, "answered": sum(r.status != "pending" for r in recs),
                        "server_ready_after": server.is_ready(),
                        "no_answers": len(no), "no_within_100ms": sum(x <= 100.0 for x in no),
                        "no_latency_ms_p50": _pct(no, 50), "no_latency_ms_max": max(no) if no else None,
                        "errors": sorted({r.message[:120] for r in recs if r.status == "error"})[:5],
                        "raw": raw}
                for s in NO:
                    lat = _latencies(recs, s)
                    row[f"{s}_latency_ms_p50"], row[f"{s}_latency_ms_max"] = _pct(lat, 50), max(lat) if lat else None
                out.setdefault(name, {})[client] = row
                print(f"[tessera] overload {name} {client}: {row['requests']} sent, {row['answered']} answered, "
                      f"SAR {row['slo_attainment']:.3f}, refused {row['refused']} (max {row['refused_latency_ms_max']} ms), "
                      f"dropped {row['dropped']} (max {row['dropped_latency_ms_max']} ms), rejected {row['rejected']}, "
                      f"failed {row['failed']}, ready after: {row['server_ready_after']}", flush=True)
        terms = {name: {lab["term"]: v for lab, v in scrape_all(server.metrics_url, "tessera_cost_model")
                        if lab.get("model") == f"engine_{name}"} for name in SETTINGS}
    from tessera.bench.simulate import sar, simulate
    from tessera.cost import CostModel

    sim = {}
    for name, switch in SETTINGS.items():
        res = simulate(tr, args.policy, CostModel.from_terms(terms[name], 8), slo, early_refusal=switch)
        sim[name] = {"slo_attainment": sar(res), **{s: sum(r.status == s for r in res) for s in ("ok", "refused", "dropped")}}
    rows = [r for setting in out.values() for r in setting.values()]
    early = [*out["early-refusal"].values(), *out["strict-refusal"].values()]
    verdict = (all(r["answered"] == r["requests"] and r["failed"] == 0 and r["server_ready_after"] for r in rows)
               and all((r["refused_latency_ms_max"] or 0.0) <= 100.0 for r in early))
    ratios = {f"{name}/late-refusal {c}": out[name][c]["slo_attainment"] / max(out["late-refusal"][c]["slo_attainment"], 1e-9)
              for name in ("early-refusal", "strict-refusal") for c in out[name]}
    config = vars(args) | {"sizes": SIZES, "engine": engine, "settings": SETTINGS, "capacity_rps": capacity,
                           "isolated_ms": {f"{h}x{w}": v for (h, w), v in iso.items()}, "model": "tiny UNet",
                           "baseline": "late-refusal (early_refusal=off), same trace, same server"}
    path = write_result(args.name, config, {"settings": out, "sar_ratio_vs_late": ratios, "simulated_same_trace": sim,
                                            "all_answered_refusals_within_100ms": verdict})
    _plot(out, RESULTS / f"{args.name}.png")
    print(f"[tessera] overload: wrote {path}; SAR ratios {ratios}; simulated {sim}; verdict {verdict}")
    return 0 if verdict else 1


def _plot(out: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(out), figsize=(6 * len(out), 4), sharey=True)
    for ax, (name, clients) in zip(np.atleast_1d(axes), out.items(), strict=True):
        raw = clients["grpc-stream"]["raw"]
        for status, colour in (("ok", "tab:green"), ("refused", "tab:orange"), ("dropped", "tab:red"),
                               ("rejected", "tab:purple")):
            pts = [(a, lat) for a, lat, s in zip(raw["arrival_s"], raw["latency_ms"], raw["status"], strict=True)
                   if s == status and lat is not None]
            if pts:
                ax.scatter(*zip(*pts), s=6, c=colour, label=f"{status} ({len(pts)})")
        ax.set_yscale("log")
        ax.set_title(f"{name}: SAR {clients['grpc-stream']['slo_attainment']:.2f} (stream)")
        ax.set_xlabel("arrival (s)")
        ax.legend(fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("answer latency (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
