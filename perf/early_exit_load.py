"""Early exit under load: one server, one trace per load, two engines that differ only in `early_exit`
(off / on, the default rule), same policy. Reports SLO attainment (SAR), latency, steps run, and the quality
of what was served: paired PSNR/SSIM of every completed image against the full-step image of the same
prompt, seed and size (generated in process afterwards with Tessera's own Txt2Img), and evaluator adherence.

Model: the committed heavy reference (quality_models/heavy), shapes prompts, 50 steps, guidance 4.
SLO per size = k x its isolated latency with early exit off, sent as slo_ms so both engines get the same
deadlines. Writes perf/results/early_exit.json + .png. Run: python -m perf.early_exit_load
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from perf.common import RESULTS, parser, write_result
from tessera.options import PolicyName

SIZES = ((64, 64), (64, 128), (128, 128))
MODES = ("off", "on")


def build_parser() -> argparse.ArgumentParser:
    ap = parser("early_exit_load", __doc__)
    ap.add_argument("--models", default="quality_models", help="directory holding heavy/ (the reference)")
    ap.add_argument("--loads", default="0.8,1.2,1.8", help="offered load, multiples of the early-exit-off capacity")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per load")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps asked per request")
    ap.add_argument("--slo-scale", type=float, default=5.0, help="SLO per size = k x its isolated latency")
    ap.add_argument("--policy", default=PolicyName.EDF_MH.value, choices=[m.value for m in PolicyName],
                    help="scheduling policy of both engines")
    ap.add_argument("--seed", type=int, default=7, help="trace seed (seed + i for the i-th load)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from tessera.bench.loadgen import replay, summarize
    from tessera.bench.traces import poisson
    from tessera.quality.harness import GUIDANCE
    from tessera.quality.shapes import all_labels
    from tessera.server import TritonServer
    from tessera_export.repository import add_engine, export_pipeline

    from perf.slo import isolated_ms

    work = Path(tempfile.mkdtemp(prefix="tessera-eeload-"))
    repo = work / "repo"
    export_pipeline(Path(args.models) / "heavy", repo, executor="local", progress=lambda *_: None)
    common = dict(executor="local", policy=args.policy, max_batch=16, slo_scale=args.slo_scale,
                  profile_sizes=",".join(f"{h}x{w}" for h, w in SIZES))
    for mode in MODES:
        add_engine(repo, "engine", f"engine_{mode}", entry=f"txt2img_{mode}", early_exit=mode, **common)
    labels = all_labels()
    loads = [float(x) for x in args.loads.split(",")]
    runs = {m: [] for m in MODES}
    served = {m: [] for m in MODES}  # per load: records (with images)
    traces = []
    with TritonServer(repo, log_path=work / "server.log") as server:
        iso = isolated_ms(server, "txt2img_off", args.steps, 3, sizes=SIZES, guidance=GUIDANCE)
        slo = {k: args.slo_scale * v for k, v in iso.items()}
        capacity = 1000.0 / float(np.mean(list(iso.values())))
        print(f"[tessera] isolated ms {iso}; capacity ~{capacity:.2f} req/s (early exit off)", flush=True)
        for i, load in enumerate(loads):
            tr = poisson(load * capacity, args.duration, SIZES, (1, 1, 1), args.steps, args.seed + i)
            reqs = tuple(dataclasses.replace(r, prompt=labels[(k * 7) % len(labels)].caption)
                         for k, r in enumerate(tr.requests))
            tr = dataclasses.replace(tr, requests=reqs)
            tr.save(RESULTS / "traces" / f"early-exit-load{load:g}.json")
            traces.append(tr)
            for mode in MODES:
                recs = replay(server.grpc_url, f"engine_{mode}", tr, slo, guidance=GUIDANCE, stream=True,
                              keep_images=True)
                summary = summarize(recs, args.duration)
                ran = [r.steps_run for r in recs if r.status == "ok" and r.steps_run is not None]
                summary |= {"load": load, "rate_rps": load * capacity,
                            "steps_run_mean": float(np.mean(ran)) if ran else None,
                            "steps_saved_fraction": 1 - float(np.mean(ran)) / args.steps if ran else None}
                runs[mode].append(summary)
                served[mode].append(recs)
                print(f"load {load:.1f} early exit {mode:3s} SAR {summary['slo_attainment']:.3f} "
                      f"completed {summary['completed']} dropped {summary['dropped']} "
                      f"steps {summary['steps_run_mean']}", flush=True)
                time.sleep(2)
    quality = _quality(args, repo, traces, served)
    for mode in MODES:
        for row, q in zip(runs[mode], quality[mode], strict=True):
            row["quality"] = q
    config = vars(args) | {"sizes": SIZES, "shares": [1, 1, 1], "model": "heavy reference (quality_models/heavy)",
                           "engine": common, "guidance": GUIDANCE,
                           "isolated_ms": {f"{h}x{w}": v for (h, w), v in iso.items()},
                           "slo_ms": {f"{h}x{w}": v for (h, w), v in slo.items()}, "capacity_rps": capacity,
                           "baseline": "early_exit=off, same policy, same trace"}
    comparison = {f"{load:g}": {"sar_off": runs["off"][i]["slo_attainment"], "sar_on": runs["on"][i]["slo_attainment"],
                                "gain_points": 100 * (runs["on"][i]["slo_attainment"] - runs["off"][i]["slo_attainment"]),
                                "psnr_on_db": runs["on"][i]["quality"]["psnr_db_mean"],
                                "steps_saved_fraction_on": runs["on"][i]["steps_saved_fraction"]}
                  for i, load in enumerate(loads)}
    path = write_result("early_exit", config, {"runs": runs, "comparison": comparison})
    _plot(runs, loads, path.with_suffix(".png"))
    print(f"[tessera] early exit under load: wrote {path}")
    return 0


def _quality(args, repo: Path, traces, served) -> dict:
    """Paired fidelity of each completed image against the in-process full-step image; adherence."""
    import torch
    from transformers import CLIPTokenizer

    from tessera.executors.ort import LocalComponents
    from tessera.generation import Txt2Img
    from tessera.quality.features import evaluator_features, load_evaluator
    from tessera.quality.harness import GUIDANCE
    from tessera.quality.metrics import adherence, paired
    from tessera.quality.shapes import parse_caption
    from tessera.request import GenerationParams
    from tessera.spec import PipelineSpec

    torch.set_num_threads(1)  # the served repository's ONNX files, now in process
    spec = PipelineSpec.load(repo / "engine" / "1" / "manifest.json")
    toks = [CLIPTokenizer.from_pretrained(repo / "engine" / "1" / d) for d in spec.tokenizers]
    pipe = Txt2Img(spec, LocalComponents(spec, repo), toks)
    evaluator = load_evaluator(Path(args.models) / "evaluator.pt")
    cache: dict[tuple, np.ndarray] = {}
    out = {m: [] for m in MODES}
    for li, tr in enumerate(traces):
        for mode in MODES:
            recs = served[mode][li]
            ok = [(r, q) for r, q in zip(recs, tr.requests, strict=True) if r.status == "ok" and r.image is not None]
            if not ok:
                out[mode].append({"n": 0})
                continue
            refs = []
            for _, q in ok:
                key = (q.prompt, q.seed, q.height, q.width)
                if key not in cache:
                    cache[key] = pipe.generate(GenerationParams(q.prompt, "", q.height, q.width, args.steps, GUIDANCE,
                                                                q.seed))
                refs.append(cache[key])
            row = {"n": len(ok)}
            psnrs, ssims = [], []
            for (r, _), ref in zip(ok, refs, strict=True):  # sizes differ: pair image by image
                p = paired(r.image[None], ref[None])
                psnrs.append(p["psnr_db_mean"] if p["psnr_db_mean"] is not None else np.inf)
                ssims.append(p["ssim_mean"])
            finite = [p for p in psnrs if np.isfinite(p)]
            row |= {"psnr_db_mean": float(np.mean(finite)) if finite else None, "identical": len(psnrs) - len(finite),
                    "ssim_mean": float(np.mean(ssims))}
            preds = np.concatenate([evaluator_features(evaluator, r.image[None])[1] for r, _ in ok])
            truth = np.stack([parse_caption(q.prompt).as_array() for _, q in ok])
            row["adherence"] = adherence(preds, truth)
            out[mode].append(row)
            print(f"[tessera] quality load {li} {mode}: {row['n']} images, PSNR {row['psnr_db_mean']}, "
                  f"identical {row['identical']}", flush=True)
    return out


def _plot(runs, loads, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode in MODES:
        ax[0].plot(loads, [r["slo_attainment"] for r in runs[mode]], marker="o", label=f"early exit {mode}")
        ax[1].plot(loads, [r["p99_latency_ms"] or np.nan for r in runs[mode]], marker="o", label=f"early exit {mode}")
    ax[0].set(xlabel="offered load (x capacity without early exit)", ylabel="SLO attainment", ylim=(0, 1.05),
              title="Heavy reference, 3 sizes, SLO = 5x isolated")
    ax[1].set(xlabel="offered load", ylabel="p99 latency of completed (ms)", title="Latency (CPU)")
    for a in ax:
        a.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
