"""Closed-loop throughput on a mixed 3-resolution workload, one server build, one run.

Variants (each an engine in the same repository, behind its own txt2img facade):
  image-fcfs      one request's whole loop at a time, same-resolution batching (the Triton tutorial)
  step-concat     step-level continuous batching, one denoiser call per resolution (ORT)
  step-concat-pt  the same with the torch denoiser (the runtime exact patches use)
  step-patches    step-level, exact patches: one torch call for all resolutions
  step-tiled      step-level, fixed 8x8-cell tiles with 4-cell overlap, one ORT call (approximate)
C clients each send requests back to back (sizes drawn from a seeded list) until N per variant are
done; throughput = images / wall time. Writes perf/results/batching.json and batching.png.
Run: python -m perf.batching
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import urllib.request
from pathlib import Path

from perf.common import RESULTS, parser, tiny_unet_repo, write_result

SIZES = ((64, 64), (64, 128), (128, 128))  # pixels: latents 8x8, 8x16, 16x16 (GCD 8)
VARIANTS = {
    "image-fcfs": dict(policy="image-fcfs"),
    "step-concat": dict(policy="step-fcfs"),
    "step-concat-pt": dict(policy="step-fcfs", denoiser_runtime="torch"),
    "step-patches": dict(policy="step-fcfs", denoiser_runtime="torch", denoise_mode="patches"),
    "step-tiled": dict(policy="step-fcfs", denoise_mode="tiled", tile_size=8, tile_overlap=4),
}
COUNTERS = ("tessera_denoiser_calls_total", "tessera_denoiser_rows_total", "tessera_denoiser_resolutions_total",
            "tessera_denoiser_requests_total", "tessera_engine_steps_total", "tessera_steps_total")


def metrics(url: str, model: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    out = {}
    for name in COUNTERS:
        prefix = f'{name}{{model="{model}"}}'
        out[name] = next((float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(prefix)), 0.0)
    return out


def closed_loop(server, model: str, jobs: list[tuple[int, int, int]], clients: int, steps: int) -> dict:
    from tessera.client import infer_image, make_client, request_arrays

    lock = threading.Lock()
    todo = list(jobs)
    latencies: list[float] = []
    errors: list[str] = []

    def worker() -> None:
        client = make_client("grpc", server.grpc_url)
        while True:
            with lock:
                if not todo:
                    break
                h, w, seed = todo.pop(0)
            t0 = time.perf_counter()
            try:
                infer_image(client, "grpc", request_arrays("a red circle at top left", h, w, steps, 5.0, seed),
                            model=model)
                with lock:
                    latencies.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(str(e)[:200])
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "completed": len(latencies), "errors": errors,
            "throughput_img_s": len(latencies) / wall, "latency_s": latencies}


def build_parser() -> argparse.ArgumentParser:
    ap = parser("batching", __doc__)
    ap.add_argument("--requests", type=int, default=24, help="requests per variant")
    ap.add_argument("--clients", type=int, default=6, help="closed-loop clients, each sending back to back")
    ap.add_argument("--steps", type=int, default=10, help="denoising steps per request")
    ap.add_argument("--seed", type=int, default=0, help="seed of the requests' size sequence")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from tessera.server import TritonServer
    from tessera_export.repository import add_engine

    work, _, repo = tiny_unet_repo("batching")
    for name, kw in VARIANTS.items():
        add_engine(repo, "engine", f"engine_{name}", entry=f"txt2img_{name}", max_batch=16, **kw)
    rng = random.Random(args.seed)
    jobs = [(*rng.choice(SIZES), rng.randrange(1 << 30)) for _ in range(args.requests)]
    results = {}
    with TritonServer(repo, log_path=work / "server.log") as server:
        closed_loop(server, "txt2img_step-concat", jobs[:4], 2, 2)  # warm-up
        for name in VARIANTS:
            closed_loop(server, f"txt2img_{name}", jobs[:2], 1, 2)  # warm this engine
            before = metrics(server.metrics_url, f"engine_{name}")
            res = closed_loop(server, f"txt2img_{name}", jobs, args.clients, args.steps)
            after = metrics(server.metrics_url, f"engine_{name}")
            d = {k: after[k] - before[k] for k in COUNTERS}
            calls = max(d["tessera_denoiser_calls_total"], 1)
            res |= {
                "denoiser_calls": d["tessera_denoiser_calls_total"],
                "engine_steps": d["tessera_engine_steps_total"],
                "rows_per_call": d["tessera_denoiser_rows_total"] / calls,
                "resolutions_per_call": d["tessera_denoiser_resolutions_total"] / calls,
                "requests_per_call": d["tessera_denoiser_requests_total"] / calls,
            }
            results[name] = res
            print(f"{name:15s} {res['throughput_img_s']:.2f} img/s  calls {res['denoiser_calls']:.0f}  "
                  f"rows/call {res['rows_per_call']:.1f}  res/call {res['resolutions_per_call']:.2f}  "
                  f"errors {len(res['errors'])}", flush=True)
    base = results["image-fcfs"]["throughput_img_s"]
    for r in results.values():
        r["ratio_vs_image_fcfs"] = r["throughput_img_s"] / base
    config = vars(args) | {"sizes": SIZES, "variants": VARIANTS, "model": "tiny UNet (build-tiny --kind unet)",
                           "baseline": "image-fcfs", "max_batch": 16}
    path = write_result("batching", config, {"variants": results})
    _plot(results, RESULTS / "batching.png", args)
    print(f"wrote {path}")
    return 0


def _plot(results: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    vals = [results[n]["throughput_img_s"] for n in names]
    ax.bar(names, vals, color=["#888"] + ["#4a7"] * (len(names) - 1))
    for i, n in enumerate(names):
        ax.annotate(f"x{results[n]['ratio_vs_image_fcfs']:.2f}", (i, vals[i]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("images / s (closed loop)")
    ax.set_title(f"Mixed 3-resolution workload, {args.clients} clients, {args.steps} steps, CPU (1 thread)")
    plt.setp(ax.get_xticklabels(), rotation=15, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
