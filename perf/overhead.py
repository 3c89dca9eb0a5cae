"""Serving overhead: a lone request end-to-end through tritonserver vs the same exported components in
an in-process diffusers pipeline, interleaved, same process order every round.

Variants: `served_bls` (txt2img -> engine, which calls the component models over BLS: the default
repository), `served_local` (txt2img -> engine_local, which runs the same ONNX files in its own stub),
`stream_bls` / `stream_local` (the same engines called directly over a gRPC stream: no facade hop),
`in_process` (diffusers' StableDiffusionPipeline with its modules' forward passes on the exported ONNX
files; the baseline). Where the time goes, by differences of medians: facade hop = served - stream;
BLS = stream_bls - stream_local (split into the components' own compute, from Triton's per-model
statistics, and the calls' IPC); engine = stream_local - in_process (gRPC, loop hand-off, per-step work).
Writes perf/results/overhead.json and overhead.png. Run: python -m perf.overhead
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import time
import urllib.request
from pathlib import Path

from perf.common import RESULTS, parser, tiny_unet_repo, write_result


def build_parser() -> argparse.ArgumentParser:
    ap = parser("overhead", __doc__)
    ap.add_argument("--runs", type=int, default=9, help="timed rounds (each variant once per round)")
    ap.add_argument("--height", type=int, default=256, help="pixels")
    ap.add_argument("--width", type=int, default=256, help="pixels")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps")
    ap.add_argument("--guidance", type=float, default=7.5, help="guidance scale (> 1: CFG)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import torch

    from tessera.client import infer_image, infer_inputs, make_client, request_arrays
    from tessera.server import TritonServer
    from tessera_export.ort_diffusers import ort_backed_pipeline
    from tessera_export.repository import add_engine

    work, pipeline, repo = tiny_unet_repo("overhead")
    add_engine(repo, "engine", "engine_local", entry="txt2img_local", executor="local")
    pipe = ort_backed_pipeline(pipeline, repo)
    prompt = "a red circle at top left"

    def in_process(seed: int) -> None:
        pipe(prompt, height=args.height, width=args.width, num_inference_steps=args.steps,
             guidance_scale=args.guidance, generator=torch.Generator().manual_seed(seed), output_type="np")

    times: dict[str, list[float]] = {k: [] for k in ("in_process", "served_bls", "served_local", "stream_bls",
                                                     "stream_local")}
    with TritonServer(repo, log_path=work / "server.log") as server:
        client = make_client("grpc", server.grpc_url)
        stream = make_client("grpc", server.grpc_url)
        answers: queue.Queue = queue.Queue()
        stream.start_stream(callback=lambda result, error: answers.put((result, error)))

        def served(model: str, seed: int) -> None:
            arrays = request_arrays(prompt, args.height, args.width, args.steps, args.guidance, seed)
            infer_image(client, "grpc", arrays, model=model)

        def streamed(model: str, seed: int) -> None:
            arrays = request_arrays(prompt, args.height, args.width, args.steps, args.guidance, seed)
            stream.async_stream_infer(model, infer_inputs("grpc", arrays, declared_types=False), request_id=str(seed))
            result, error = answers.get(timeout=120)
            if error is not None:
                raise RuntimeError(error)

        before = {m: _model_stats(server, m) for m in ("text_encoder", "denoiser", "vae_decoder")}
        variants = {
            "in_process": in_process,
            "served_bls": lambda s: served("txt2img", s),
            "served_local": lambda s: served("txt2img_local", s),
            "stream_bls": lambda s: streamed("engine", s),
            "stream_local": lambda s: streamed("engine_local", s),
        }
        for i in range(args.warmup + args.runs):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn(i)
                ms = (time.perf_counter() - t0) * 1e3
                if i >= args.warmup:
                    times[name].append(ms)
            print(f"round {i}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items() if v), flush=True)
        stream.stop_stream()
        stream.close()
        client.close()
        components = {m: _delta(_model_stats(server, m), before[m]) for m in before}
        gaps = {m: cost_terms(server, m) for m in ("engine", "engine_local")}

    base = statistics.median(times["in_process"])
    med = {k: statistics.median(v) for k, v in times.items()}
    calls = {m: c["calls"] for m, c in components.items()}
    runs_bls = 2 * (args.warmup + args.runs)  # served_bls and stream_bls rounds
    compute_ms = sum(c["compute_ms_per_call"] * c["calls"] for c in components.values()) / runs_bls
    breakdown = {
        "facade_hop_bls_ms": med["served_bls"] - med["stream_bls"],
        "facade_hop_local_ms": med["served_local"] - med["stream_local"],
        "bls_total_ms": med["stream_bls"] - med["stream_local"],
        "bls_component_calls_per_request": {m: n / runs_bls for m, n in calls.items()},
        "bls_component_compute_ms_per_request": compute_ms,
        "engine_local_vs_in_process_ms": med["stream_local"] - med["in_process"],
        "engine_loop_gap_ms_per_step": {m: 1e3 * g.get("gap_s", float("nan")) for m, g in gaps.items()},
        "components": components,
        "note": "differences of medians; compute per call from Triton's per-model statistics (compute_infer); "
                "the engine-local term includes gRPC, the loop hand-off and the engine's per-step work",
    }
    summary = {
        name: {
            "median_ms": statistics.median(v),
            "min_ms": min(v),
            "ratio_vs_in_process": statistics.median(v) / base,
            "latency_ms": v,
        }
        for name, v in times.items()
    }
    config = vars(args) | {"protocol": "grpc", "model": "tiny UNet pipeline (tessera build-tiny --kind unet)",
                           "baseline": "in_process"}
    path = write_result("overhead", config, {"variants": summary, "breakdown": breakdown})
    _plot(summary, RESULTS / "overhead.png", args)
    for name, s in summary.items():
        print(f"{name:13s} median {s['median_ms']:.0f} ms  ratio {s['ratio_vs_in_process']:.3f}")
    print({k: v for k, v in breakdown.items() if k != "components"})
    print(f"wrote {path}")
    return 0


def _model_stats(server, model: str) -> dict:
    """Successful inferences and mean compute time per call of one model (Triton's statistics extension)."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as r:
        stats = json.load(r)["model_stats"][0]["inference_stats"]
    n = int(stats["success"]["count"])
    compute_ns = sum(int(stats[k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output"))
    return {"calls": n, "compute_ns": compute_ns, "queue_ns": int(stats["queue"]["ns"])}


def _delta(after: dict, before: dict) -> dict:
    """Calls and mean compute/queue time per call between two statistics snapshots."""
    n = after["calls"] - before["calls"]
    return {"calls": n, "compute_ms_per_call": (after["compute_ns"] - before["compute_ns"]) / max(n, 1) / 1e6,
            "queue_ms_per_call": (after["queue_ns"] - before["queue_ns"]) / max(n, 1) / 1e6}


def cost_terms(server, model: str) -> dict[str, float]:
    from perf.slo import scrape_all

    return {lab["term"]: v for lab, v in scrape_all(server.metrics_url, "tessera_cost_model") if lab.get("model") == model}


def _plot(summary: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.boxplot([summary[n]["latency_ms"] for n in names], tick_labels=names)
    for i, n in enumerate(names, 1):
        ax.annotate(f"x{summary[n]['ratio_vs_in_process']:.3f}", (i, summary[n]["median_ms"]),
                    textcoords="offset points", xytext=(18, 0), fontsize=8)
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title(f"Lone request, {args.width}x{args.height}, {args.steps} steps (ratio = median vs in-process)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
