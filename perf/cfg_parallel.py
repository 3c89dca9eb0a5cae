"""CFG (latent) parallelism in one engine process (issue 15, first step): a lone request's denoiser calls
run as two halves at once (`cfg_parallel=on`: the conditional and unconditional rows on two threads, ONNX
Runtime one intra-op thread each) against one call, through the server, interleaved round by round.

The ideal speed-up comes from Amdahl's law with the denoiser's share of a request measured in the same run
on the same engine (the engine's own cost model: step time x steps over the request's latency):
1 / ((1 - p) + p / 2). Writes perf/results/cfg_parallel.json (+ .png). Run: python -m perf.cfg_parallel
"""

from __future__ import annotations

import argparse
import queue
import statistics
import time

from perf.common import RESULTS, parser, tiny_unet_repo, write_result
from perf.overhead import cost_terms


def build_parser() -> argparse.ArgumentParser:
    ap = parser("cfg_parallel", __doc__)
    ap.add_argument("--runs", type=int, default=7, help="timed rounds (each variant once per round)")
    ap.add_argument("--size", type=int, default=256, help="image edge, pixels")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps")
    ap.add_argument("--guidance", type=float, default=7.5, help="guidance scale (> 1: CFG, two rows a call)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tessera.client import infer_inputs, make_client, request_arrays
    from tessera.server import TritonServer
    from tessera_export.repository import add_engine

    work, _, repo = tiny_unet_repo("cfg-parallel")
    add_engine(repo, "engine", "engine_local", executor="local")
    add_engine(repo, "engine", "engine_cfg2", executor="local", cfg_parallel="on")
    times: dict[str, list[float]] = {"one_call": [], "two_halves": []}
    variants = {"one_call": "engine_local", "two_halves": "engine_cfg2"}
    with TritonServer(repo, log_path=work / "server.log") as server:
        client = make_client("grpc", server.grpc_url)
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i in range(2 + args.runs):  # 2 warm-up rounds
            for name, model in variants.items():
                arrays = request_arrays("a red circle at top left", args.size, args.size, args.steps, args.guidance, i)
                t0 = time.perf_counter()
                client.async_stream_infer(model, infer_inputs("grpc", arrays, declared_types=False), request_id=str(i))
                _, error = answers.get(timeout=300)
                if error is not None:
                    raise RuntimeError(error)
                if i >= 2:
                    times[name].append((time.perf_counter() - t0) * 1e3)
            if i >= 2:
                print(f"round {i - 1}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items()), flush=True)
        client.stop_stream()
        client.close()
        terms = cost_terms(server, "engine_local")
    med = {k: statistics.median(v) for k, v in times.items()}
    cells = (args.size // 8) ** 2 * 2  # rows x latent cells of one CFG request
    step_ms = 1e3 * (terms["step_const"] + terms["step_cells"] * cells + terms["step_requests"]
                     + terms["step_resolutions"] + terms["step_rows"] * 2)
    share = min(1.0, step_ms * args.steps / med["one_call"])
    ideal = 1.0 / ((1.0 - share) + share / 2.0)
    speedup = med["one_call"] / med["two_halves"]
    result = {"median_ms": med, "latency_ms": times, "speedup": speedup, "denoiser_share": share,
              "ideal_speedup_amdahl": ideal, "of_ideal": (speedup - 1) / (ideal - 1) if ideal > 1 else None,
              "predicted_step_ms_one_call": step_ms}
    path = write_result("cfg_parallel", vars(args) | {"model": "tiny UNet pipeline, executor local, ORT, 1 thread "
                                                                "per part"}, result)
    _plot(med, speedup, ideal, RESULTS / "cfg_parallel.png")
    print(f"one call {med['one_call']:.0f} ms, two halves {med['two_halves']:.0f} ms: {speedup:.2f}x "
          f"(ideal {ideal:.2f}x, denoiser share {share:.2f}); wrote {path}")
    return 0


def _plot(med: dict, speedup: float, ideal: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(list(med), list(med.values()), color=["#888", "#4a4"])
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"lone CFG request: {speedup:.2f}x (ideal {ideal:.2f}x)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
