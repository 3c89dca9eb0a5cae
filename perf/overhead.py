"""Serving overhead: a lone request end-to-end through tritonserver vs the same exported components in
an in-process diffusers pipeline, interleaved, same process order every round.

Variants: `served_bls` (txt2img -> engine, which calls the component models over BLS: the default
repository), `served_local` (txt2img -> engine_local, which runs the same ONNX files in its own stub),
`in_process` (diffusers' StableDiffusionPipeline with its modules' forward passes on the exported ONNX
files; the baseline).
Writes perf/results/overhead.json and overhead.png. Run: python -m perf.overhead
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from perf.common import RESULTS, tiny_unet_repo, write_result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from tessera.client import infer_image, make_client, request_arrays
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

    times: dict[str, list[float]] = {"in_process": [], "served_bls": [], "served_local": []}
    with TritonServer(repo, log_path=work / "server.log") as server:
        client = make_client("grpc", server.grpc_url)

        def served(model: str, seed: int) -> None:
            arrays = request_arrays(prompt, args.height, args.width, args.steps, args.guidance, seed)
            infer_image(client, "grpc", arrays, model=model)

        variants = {
            "in_process": in_process,
            "served_bls": lambda s: served("txt2img", s),
            "served_local": lambda s: served("txt2img_local", s),
        }
        for i in range(args.warmup + args.runs):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn(i)
                ms = (time.perf_counter() - t0) * 1e3
                if i >= args.warmup:
                    times[name].append(ms)
            print(f"round {i}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items() if v), flush=True)
        client.close()

    base = statistics.median(times["in_process"])
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
    path = write_result("overhead", config, {"variants": summary})
    _plot(summary, RESULTS / "overhead.png", args)
    for name, s in summary.items():
        print(f"{name:13s} median {s['median_ms']:.0f} ms  ratio {s['ratio_vs_in_process']:.3f}")
    print(f"wrote {path}")
    return 0


def _plot(summary: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(6, 3.5))
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
