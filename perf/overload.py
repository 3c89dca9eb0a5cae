"""Overload: 3x capacity for 60 s against one engine with bounded admission. Every request must get a
response (an image, a "deadline cannot be met" drop, or an "overloaded" rejection); rejections must come
within 100 ms of arrival; the server must be ready afterwards. Both clients are measured: gRPC streaming
to the decoupled engine, and unary calls to the txt2img facade (its own in-flight bound).

Writes perf/results/overload.json. Run: python -m perf.overload
"""

from __future__ import annotations

import argparse

import numpy as np

from perf.common import tiny_unet_repo, write_result
from perf.slo import SIZES, isolated_ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--load", type=float, default=3.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--policy", default="slack")
    ap.add_argument("--max-in-flight", type=int, default=8)
    ap.add_argument("--seed", type=int, default=99)
    args = ap.parse_args(argv)

    from tessera.bench.loadgen import replay, summarize
    from tessera.bench.traces import poisson
    from tessera.server import TritonServer
    from tessera_export.repository import add_engine

    work, _, repo = tiny_unet_repo("overload")
    engine = dict(executor="local", policy=args.policy, max_batch=16, max_in_flight=args.max_in_flight,
                  profile_sizes=",".join(f"{h}x{w}" for h, w in SIZES))
    add_engine(repo, "engine", "engine_bounded", entry="txt2img_bounded", **engine)
    out = {}
    with TritonServer(repo, log_path=work / "server.log") as server:
        iso = isolated_ms(server, "txt2img_bounded", args.steps, 2)
        slo = {k: 5.0 * v for k, v in iso.items()}
        capacity = 1000.0 / float(np.mean(list(iso.values())))
        for client, model, stream in (("grpc-stream", "engine_bounded", True), ("grpc-unary", "txt2img_bounded", False)):
            tr = poisson(args.load * capacity, args.duration, SIZES, (1, 1, 1), args.steps, args.seed)
            recs = replay(server.grpc_url, model, tr, slo, drain_s=300, stream=stream)
            rejected = [r.latency_ms for r in recs if r.status == "rejected"]
            row = summarize(recs, args.duration)
            row.pop("raw", None)
            row |= {"model": model, "answered": sum(r.status != "pending" for r in recs),
                    "rejection_latency_ms_max": max(rejected) if rejected else None,
                    "rejection_latency_ms_p99": float(np.percentile(rejected, 99)) if rejected else None,
                    "rejections_within_100ms": sum(x <= 100.0 for x in rejected),
                    "server_ready_after": server.is_ready(),
                    "errors": sorted({r.message[:120] for r in recs if r.status == "error"})[:5]}
            out[client] = row
            print(f"[tessera] overload {client}: {row['requests']} sent, {row['answered']} answered, "
                  f"{len(rejected)} rejected (max {row['rejection_latency_ms_max']} ms), dropped {row['dropped']}, "
                  f"failed {row['failed']}, ready after: {row['server_ready_after']}", flush=True)
    verdict = all(r["answered"] == r["requests"] and r["failed"] == 0 and r["server_ready_after"]
                  and (r["rejection_latency_ms_max"] or 0) <= 100.0 and r["rejected"] > 0 for r in out.values())
    config = vars(args) | {"sizes": SIZES, "engine": engine, "isolated_ms": {f"{h}x{w}": v for (h, w), v in iso.items()},
                           "capacity_rps": capacity, "model": "tiny UNet"}
    path = write_result("overload", config, {"clients": out, "all_answered_rejections_within_100ms": verdict})
    print(f"[tessera] overload: wrote {path}; verdict {verdict}")
    return 0 if verdict else 1


if __name__ == "__main__":
    raise SystemExit(main())
