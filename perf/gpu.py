"""GPU check: the pure step engine (tessera.engine.Engine, no Triton) with torch components on CUDA.

Text encoder, denoiser and VAE run in torch on the device (TorchComponents below); the engine, the
policy (step-fcfs) and each request's sampler run on the host, as in the server. Two measurements:
  (a) throughput: N mixed-resolution requests, all queued at once, stepped through the Engine until
      done, once per denoiser executor (concat: one call per resolution; patches: exact patches, one call;
      tiled: fixed tiles with overlap, one call), after one identical warm-up pass; ratios vs concat;
  (b) per-step latency by batch size: median of timed denoiser runs over b requests of one size (and of
      the sizes mixed), for each executor.
Writes perf/results/gpu-batching.json + .png (with --device cpu: a temp dir unless --out is given, so
the tiny CPU case that CI runs never overwrites recorded results). The PipelineSpec comes from one ONNX
export of the pipeline on the CPU (seconds for the tiny UNet; a large --pipeline takes minutes there).
Run: python -m perf.gpu --device cuda   (perf/README.md: what a CUDA host needs)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from perf.common import parser

DEFAULTS = {  # per device: sizes (HxW pixels), steps, requests, batch sizes of the latency sweep, repeats
    "cuda": dict(sizes="256x256,256x512,512x512", steps=20, requests=48, batches="1,2,4,8,16", repeats=10),
    "cpu": dict(sizes="64x64,64x128,128x64", steps=3, requests=6, batches="1,2", repeats=2),
}
PROMPT = "a red circle at top left"
GUIDANCE = 5.0  # > 1: classifier-free guidance, two denoiser rows per request


class TorchComponents:
    """executors.base.Components in torch on one device: the diffusers pipeline's own modules, computing
    what the exported ONNX components compute (tessera_export.onnx_export), numpy in, FP32 numpy out."""

    def __init__(self, pipe, spec, device, dtype):
        import torch

        from tessera.executors.denoise import torch_call

        self.torch, self.device, self.dtype = torch, torch.device(device), dtype

        def place(module):  # cast only for fp16 (diffusers warns about any dtype passed to .to())
            module = module.to(self.device)
            return (module if dtype == torch.float32 else module.to(dtype)).eval()

        # spec.text_encoders are the pipeline's attribute names (exported without a prefix)
        self.encoders = {name: place(getattr(pipe, name)) for name in spec.text_encoders}
        self.model = place(pipe.unet if spec.family.value == "sd" else pipe.transformer)
        self.vae = place(pipe.vae)
        self._denoise = torch_call(self.model, spec.family)

    def _host(self, t) -> np.ndarray:
        return t.to("cpu", self.torch.float32).numpy()

    def encode_text(self, encoder: str, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        with self.torch.no_grad():
            ids = self.torch.from_numpy(input_ids).to(self.device)
            out = self.encoders[encoder](ids, output_hidden_states=True, return_dict=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        return {"last_hidden_state": self._host(out.last_hidden_state),
                "penultimate_hidden_state": self._host(out.hidden_states[-2]), "pooled": self._host(pooled)}

    def denoise(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._denoise(inputs)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            z = self.torch.from_numpy(np.ascontiguousarray(latent)).to(self.device, self.dtype)
            return self._host(self.vae.decode(z, return_dict=False)[0])


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _pairs(text: str) -> list[tuple[int, int]]:
    try:
        out = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]
        if out and all(len(p) == 2 and min(p) > 0 for p in out):
            return out  # type: ignore[return-value]
    except ValueError:
        pass
    raise ValueError(f"--sizes: comma-separated HxW pixel sizes, e.g. 256x256,256x512; got {text!r}")


def _ints(text: str) -> list[int]:
    try:
        out = [int(v) for v in text.split(",") if v]
        if out and min(out) > 0:
            return out
    except ValueError:
        pass
    raise ValueError(f"--batches: comma-separated positive integers, e.g. 1,2,4; got {text!r}")


def build_stack(args, work: Path):
    """(spec, Txt2Img pipeline, TorchComponents) for args.pipeline (default: the tiny UNet, built here)."""
    import torch
    from transformers import CLIPTokenizer

    from tessera.config import EngineConfig
    from tessera.generation import Txt2Img
    from tessera.spec import PipelineSpec
    from tessera_export.repository import export_pipeline
    from tessera_export.tiny import build_tiny, load_pipeline

    quiet = lambda *_: None  # noqa: E731
    if args.pipeline:
        pipeline_dir = Path(args.pipeline)
    else:
        pipeline_dir = build_tiny(work / "tiny-sd", kind="unet", progress=quiet)
    repo = work / "repo"
    export_pipeline(pipeline_dir, repo, engine_config=EngineConfig(policy="step-fcfs"), progress=quiet)
    spec = PipelineSpec.load(repo / "engine" / "1" / "manifest.json")
    tokenizers = [CLIPTokenizer.from_pretrained(repo / "engine" / "1" / d) for d in spec.tokenizers]
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    components = TorchComponents(load_pipeline(pipeline_dir), spec, args.device, dtype)
    return spec, Txt2Img(spec, components, tokenizers), components


def make_denoisers(spec, components, tile: int, overlap: int) -> dict:
    from tessera.executors.denoise import ConcatDenoiser, PatchDenoiser, TiledDenoiser, torch_call

    call = torch_call(components.model, spec.family)
    return {
        "concat": ConcatDenoiser(call),
        "patches": PatchDenoiser(components.model, spec.family, spec.denoiser_multiple),
        "tiled": TiledDenoiser(call, tile, overlap),
    }


def engine_pass(pipeline, denoiser, jobs, steps: int, max_batch: int, device: str) -> dict:
    """Queue every job at once, step the Engine until all are answered; throughput and call shape."""
    from tessera.engine import Engine
    from tessera.request import FinishReason, GenerationParams, RequestState
    from tessera.scheduler import StepFcfsPolicy

    engine = Engine(pipeline, denoiser, StepFcfsPolicy(max_batch=max_batch))
    _sync(device)
    t0 = time.perf_counter()
    for i, (h, w, seed) in enumerate(jobs):
        params = GenerationParams(PROMPT, "", h, w, steps, GUIDANCE, seed)
        engine.add(RequestState(f"r{i}", params, engine.clock()))
    finals = []
    while engine.has_work():
        finals += [o for o in engine.step() if o.final]
    _sync(device)
    wall = time.perf_counter() - t0
    recs = list(engine.records)
    calls = sum(r.denoiser_calls for r in recs)
    images = sum(o.finish_reason is FinishReason.COMPLETED and o.image is not None for o in finals)
    return {
        "requests": len(jobs), "images": images, "wall_s": wall, "throughput_img_s": images / wall,
        "engine_steps": len(recs), "denoiser_calls": calls, "calls_per_step": calls / max(len(recs), 1),
        "rows_per_call": sum(sum(r.batch_per_call) for r in recs) / max(calls, 1),
        "resolutions_per_call": sum(sum(r.resolutions_per_call) for r in recs) / max(calls, 1),
        "mean_step_ms": 1e3 * statistics.fmean(r.measured_s for r in recs) if recs else None,
    }


def step_latency(pipeline, denoiser, sizes, batch: int, repeats: int, device: str) -> float:
    """Median wall time (ms) of one denoiser run over `batch` requests cycling through `sizes`."""
    from tessera.request import GenerationParams

    params = [GenerationParams(PROMPT, "", *sizes[i % len(sizes)], 10, GUIDANCE, i) for i in range(batch)]
    runs = [pipeline.start(p) for p in params]
    items = [pipeline.denoiser_inputs(r) for r in runs]
    times = []
    for k in range(repeats + 1):  # the first run warms this shape up and is not counted
        _sync(device)
        t0 = time.perf_counter()
        denoiser.run(items)
        _sync(device)
        if k:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    ap = parser("gpu", __doc__)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda: the check; cpu: a tiny case into a temp dir (CI)")
    ap.add_argument("--out", help="result JSON (none: perf/results/gpu-batching.json on cuda, a temp dir "
                                  "on cpu); the PNG is written next to it")
    ap.add_argument("--pipeline", help="diffusers pipeline directory (none: the tiny UNet, built here)")

    def per_device(key: str) -> str:
        return f"(none: {DEFAULTS['cuda'][key]} on cuda, {DEFAULTS['cpu'][key]} on cpu)"

    ap.add_argument("--sizes", help="HxW pixel sizes, mixed in the workload " + per_device("sizes"))
    ap.add_argument("--steps", type=int, help="denoising steps per request " + per_device("steps"))
    ap.add_argument("--requests", type=int,
                    help="requests per executor in the throughput pass " + per_device("requests"))
    ap.add_argument("--batches", help="batch sizes (requests) of the per-step latency sweep "
                    + per_device("batches"))
    ap.add_argument("--repeats", type=int, help="timed denoiser runs per latency point, median reported "
                    + per_device("repeats"))
    ap.add_argument("--max-batch", type=int, default=16, help="StepFcfsPolicy max_batch (requests per step)")
    ap.add_argument("--tile", type=int, default=0, help="tiled: tile edge in latent cells (0: smallest edge)")
    ap.add_argument("--overlap", type=int, default=-1, help="tiled: overlap in latent cells (-1: tile // 2)")
    ap.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="fp16 only with --device cuda")
    ap.add_argument("--seed", type=int, default=0, help="seed of the requests")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for k, v in DEFAULTS[args.device].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps <= 0 or args.requests <= 0 or args.repeats <= 0 or args.max_batch <= 0:
        print("--steps, --requests, --repeats, --max-batch: must be positive", file=sys.stderr)
        return 2
    if args.dtype == "fp16" and args.device != "cuda":
        print("--dtype fp16: only with --device cuda (CPU runs fp32)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"--device cuda: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}); run on a host whose torch sees a GPU, or pass --device cpu for the "
              "tiny CPU case", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)  # as every CPU benchmark here (two threads on 2 shared cores: outliers)
    try:
        sizes, batches = _pairs(args.sizes), _ints(args.batches)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (
        Path.cwd() / "perf" / "results" / "gpu-batching.json" if args.device == "cuda"
        else Path(tempfile.mkdtemp(prefix="tessera-gpu-check-")) / "gpu-batching.json")

    work = Path(tempfile.mkdtemp(prefix="tessera-gpu-"))  # the pipeline and its export: removed at the end
    try:
        return measure(args, sizes, batches, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, sizes: list[tuple[int, int]], batches: list[int], out: Path, work: Path) -> int:
    """Build the stack in `work`, run (a) and (b), write the JSON and the PNG, print the table."""
    import torch

    t_setup = time.perf_counter()
    spec, pipeline, components = build_stack(args, work)
    f = spec.vae_scale_factor
    bad = [s for s in sizes if s[0] % spec.limits.size_multiple or s[1] % spec.limits.size_multiple]
    if bad:
        print(f"--sizes: each side must be a multiple of {spec.limits.size_multiple}; got {bad}",
              file=sys.stderr)
        return 2
    tile = args.tile or min(min(h, w) for h, w in sizes) // f
    overlap = tile // 2 if args.overlap < 0 else args.overlap
    denoisers = make_denoisers(spec, components, tile, overlap)
    setup_s = time.perf_counter() - t_setup

    rng = np.random.default_rng(args.seed)
    jobs = [(*sizes[i % len(sizes)], int(rng.integers(1 << 30))) for i in range(args.requests)]
    throughput = {}
    for mode, den in denoisers.items():
        engine_pass(pipeline, den, jobs, args.steps, args.max_batch, args.device)  # warm-up: the same pass
        throughput[mode] = engine_pass(pipeline, den, jobs, args.steps, args.max_batch, args.device)
    base = throughput["concat"]["throughput_img_s"]
    for r in throughput.values():
        r["ratio_vs_concat"] = r["throughput_img_s"] / base

    size_keys = {f"{h}x{w}": [(h, w)] for h, w in sizes} | {"mixed": sizes}
    latency = {mode: {key: {str(b): step_latency(pipeline, den, sz, b, args.repeats, args.device)
                            for b in batches} for key, sz in size_keys.items()}
               for mode, den in denoisers.items()}

    config = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu (1 torch thread)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": args.dtype,
        "pipeline": str(args.pipeline) if args.pipeline else "tiny UNet (build-tiny --kind unet)",
        "family": spec.family.value, "sizes": sizes, "steps": args.steps, "requests": args.requests,
        "batches": batches, "repeats": args.repeats, "max_batch": args.max_batch, "policy": "step-fcfs",
        "tile": tile, "overlap": overlap, "patch_multiple": spec.denoiser_multiple, "guidance": GUIDANCE,
        "seed": args.seed, "setup_s": setup_s, "baseline": "concat",
        "workload": "all requests queued at once, sizes cycled; one identical warm-up pass per executor",
        "latency": "median ms of one denoiser run (executor.run) over b requests; first run not counted",
    }
    path = write(out, config, {"throughput": throughput, "step_latency_ms": latency})
    _plot(throughput, latency, batches, out.with_suffix(".png"), config)
    _print(throughput, latency, batches)
    print(f"wrote {path} and {out.with_suffix('.png').name}")
    return 0


def write(out: Path, config: dict, results: dict) -> Path:
    from tessera.results import write_result

    return write_result(out.stem, config, results, out.parent)


def _print(throughput: dict, latency: dict, batches: list[int]) -> None:
    print(f"{'mode':8s} {'img/s':>8s} {'vs concat':>9s} {'images':>6s} {'calls/step':>10s} {'rows/call':>9s} "
          f"{'res/call':>8s}")
    for mode, r in throughput.items():
        print(f"{mode:8s} {r['throughput_img_s']:8.2f} {r['ratio_vs_concat']:9.2f} {r['images']:6d} "
              f"{r['calls_per_step']:10.2f} {r['rows_per_call']:9.1f} {r['resolutions_per_call']:8.2f}")
    print("per-step denoiser latency, ms (median), by batch size: " + ", ".join(map(str, batches)))
    for mode, per in latency.items():
        for key, row in per.items():
            print(f"  {mode:8s} {key:10s} " + " ".join(f"{row[str(b)]:8.2f}" for b in batches))


def _plot(throughput: dict, latency: dict, batches: list[int], path: Path, config: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    modes = list(throughput)
    vals = [throughput[m]["throughput_img_s"] for m in modes]
    a.bar(modes, vals, color=["#888", "#4a7", "#47a"][: len(modes)])
    for i, m in enumerate(modes):
        a.annotate(f"x{throughput[m]['ratio_vs_concat']:.2f}", (i, vals[i]), ha="center", va="bottom",
                   fontsize=8)
    a.set_ylabel("images / s")
    a.set_title(f"{config['requests']} mixed requests, {config['steps']} steps", fontsize=9)
    for m in modes:
        b.plot(batches, [latency[m]["mixed"][str(x)] for x in batches], marker="o", label=m)
    b.set_xscale("log", base=2)
    b.set_xticks(batches, [str(x) for x in batches])
    b.set_xlabel("requests per step (sizes mixed)")
    b.set_ylabel("denoiser ms per step (median)")
    b.legend(fontsize=8)
    fig.suptitle(f"Engine on {config['device_name']} ({config['dtype']}), sizes "
                 + ", ".join(f"{h}x{w}" for h, w in config["sizes"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
