"""LoRA on ONNX Runtime, its cost (executors/lora_ort.py): building the merged session for one adapter set vs a
call on a cached merged session vs the base call, on the tiny UNet and the heavy reference pipeline.

Per pipeline: the denoiser exported alone (tessera_export.onnx_export, as `tessera export` does), one random
adapter on the attention, projection and feed-forward layers (conftest's targets, rank 4) and a second one;
then, interleaved for `--repeats` rounds: a cold build (a fresh OrtLora: merge + session), and the median of
`--calls` calls each of the base session, the cached merged session, and a mixed step whose rows carry
(X, Y, none) (three ORT calls) against the base call on the same rows. One thread (ORT and torch).
Writes perf/results/lora_ort_cost.json. Run: python -m perf.lora_ort_cost
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from perf.common import parser, write_result

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]  # conftest's lora targets
HEAVY = Path("quality_models/heavy")


def build_parser() -> argparse.ArgumentParser:
    ap = parser("lora_ort_cost", __doc__)
    ap.add_argument("--repeats", type=int, default=5, help="cold builds per pipeline (fresh cache each)")
    ap.add_argument("--calls", type=int, default=20, help="timed calls per variant and round")
    ap.add_argument("--batch", type=int, default=2, help="rows per call (2: one request with CFG)")
    ap.add_argument("--latent", type=int, default=16, help="latent cells per side (16: 128 px)")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank")
    ap.add_argument("--no-heavy", action="store_true", help=f"only the tiny UNet (not {HEAVY})")
    ap.add_argument("--out-dir", default=None, help="where the result JSON goes (none: perf/results)")
    return ap


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(pipeline_dir: Path, work: Path, args) -> dict:
    from tessera.executors.base import DENOISER_OUTPUT
    from tessera.executors.denoise import torch_call
    from tessera.executors.lora_ort import OrtLora
    from tessera.executors.lora_onnx import OnnxWeights
    from tessera.executors.lora_torch import load_lora
    from tessera.executors.ort import OrtModel
    from tessera.options import Family
    from tessera_export.onnx_export import export_component, plan_components
    from tessera_export.tiny import load_pipeline, write_random_lora

    pipe = load_pipeline(pipeline_dir)
    unet = pipe.unet.eval()
    comp = next(c for c in plan_components(pipe, Family.SD, ((8, 8), (8, 12))) if c.name == "denoiser")
    onnx_path = work / "unet.onnx"
    t0 = time.perf_counter()
    export_component(comp, onnx_path, progress=lambda *_: None)
    export_s = time.perf_counter() - t0
    adapters = []
    for seed, name in ((1, "X"), (2, "Y")):
        write_random_lora(unet, work / name, seed=seed, std=0.05, r=args.rank, lora_alpha=args.rank,
                          target_modules=TARGETS)
        adapters.append(load_lora(work / name, name))
    X, Y = adapters
    t0 = time.perf_counter()
    base = OrtModel(onnx_path)
    base_build_s = time.perf_counter() - t0
    base_call = lambda feeds: base.run(feeds)[DENOISER_OUTPUT]  # noqa: E731
    g = np.random.default_rng(0)
    b, n = args.batch, args.latent
    feeds = {"sample": g.standard_normal((b, unet.config.in_channels, n, n)).astype(np.float32),
             "timestep": np.full((b,), 500.0, np.float32),
             "encoder_hidden_states": g.standard_normal((b, 77, unet.config.cross_attention_dim)).astype(np.float32),
             }
    mixed_feeds = {k: np.concatenate([v, v, v]) for k, v in feeds.items()}
    x_only = [(((X, 1.0),), b)]
    mixed = [(((X, 1.0),), b), (((Y, 1.0),), b), ((), b)]

    t0 = time.perf_counter()
    weights = OnnxWeights(onnx_path)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = weights.merged([(X, 1.0)])
    merge_s = time.perf_counter() - t0
    rounds = []
    for _ in range(args.repeats):
        lora = OrtLora(onnx_path, base_call)
        t0 = time.perf_counter()
        lora(feeds, x_only)  # cold: merge + session build + the first call
        cold_s = time.perf_counter() - t0
        build_s = lora.stats().build_s_total
        lora(mixed_feeds, mixed)  # builds Y; warm both
        base_call(feeds)
        rounds.append({
            "cold_first_call_s": cold_s,
            "build_s": build_s,
            "base_call_ms": _median_ms(lambda: base_call(feeds), args.calls),
            "cached_call_ms": _median_ms(lambda: lora(feeds, x_only), args.calls),
            "base_call_mixed_rows_ms": _median_ms(lambda: base_call(mixed_feeds), args.calls),
            "mixed_call_ms": _median_ms(lambda: lora(mixed_feeds, mixed), args.calls),
        })
        assert lora.stats().builds == 2
    # memory: RSS growth over 4 more cached sessions (other scales of X: one session each)
    lora = OrtLora(onnx_path, base_call, max_sessions=8)
    rss0 = _rss_mb()
    for s in (0.25, 0.5, 0.75, 1.25):
        lora(feeds, [(((X, s),), b)])
    rss_per_session = (_rss_mb() - rss0) / 4
    # accuracy: the merged session vs the torch executor (per row, unmerged) with the same adapter
    reference = torch_call(unet, Family.SD)
    want = reference(feeds, x_only)
    accuracy = {"ort_vs_torch_executor_max_abs": float(np.abs(lora(feeds, x_only) - want).max()),
                "adapter_effect_max_abs": float(np.abs(want - reference(feeds)).max()),
                "output_max_abs": float(np.abs(want).max())}
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {
        "pipeline": str(pipeline_dir),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "onnx_mb": onnx_path.stat().st_size / 2**20,
        "adapter": {"targets": TARGETS, "rank": args.rank, "layers": len(X.layers), "mb": X.nbytes / 2**20,
                    "initializers_changed": len(merged),
                    "initializers_changed_mb": sum(a.nbytes for a in merged.values()) / 2**20},
        "export_denoiser_s": export_s,
        "base_session_build_s": base_build_s,
        "onnx_weight_index_s": load_s,
        "merge_weights_s": merge_s,
        "median": med,
        "build_vs_base_call": med["build_s"] * 1e3 / med["base_call_ms"],
        "cached_vs_base_call": med["cached_call_ms"] / med["base_call_ms"],
        "mixed_vs_base_call_same_rows": med["mixed_call_ms"] / med["base_call_mixed_rows_ms"],
        "rss_mb_per_cached_session": rss_per_session,
        "accuracy": accuracy,
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from tessera_export.tiny import build_tiny

    work = Path(tempfile.mkdtemp(prefix="tessera-lora-ort-"))
    pipelines = {"tiny": build_tiny(work / "tiny-sd", kind="unet", progress=lambda *_: None)}
    if not args.no_heavy and HEAVY.is_dir():
        pipelines["heavy"] = HEAVY
    results = {}
    for name, path in pipelines.items():
        (work / name).mkdir()
        results[name] = measure(Path(path), work / name, args)
        r = results[name]
        m = r["median"]
        print(f"[tessera] lora_ort_cost {name}: build {m['build_s'] * 1e3:.0f} ms (merge "
              f"{r['merge_weights_s'] * 1e3:.1f} ms), base call {m['base_call_ms']:.2f} ms, cached merged call "
              f"{m['cached_call_ms']:.2f} ms, mixed (X, Y, none) {m['mixed_call_ms']:.2f} ms vs base "
              f"{m['base_call_mixed_rows_ms']:.2f} ms on the same rows; ~{r['rss_mb_per_cached_session']:.0f} MB "
              "RSS per cached session")
    config = {k: getattr(args, k) for k in ("repeats", "calls", "batch", "latent", "rank")}
    config |= {"threads": 1, "adapter_std": 0.05, "targets": TARGETS, "pipelines": list(pipelines)}
    extra = {"out_dir": Path(args.out_dir)} if args.out_dir else {}
    path = write_result("lora_ort_cost", config, {"pipelines": results}, **extra)
    print(f"[tessera] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
