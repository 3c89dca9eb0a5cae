"""Control adherence of the reference ControlNets, served (issue 15): every prompt names one position and
its control map puts the object at another; the main evaluator should find the object where the map puts
it. Per ControlNet (silhouette, box, and both at once), N images through the real server in `sync` mode
(exact) and `async` mode (the previous step's residuals), the paired PSNR of async against sync (same seeds),
and the seed floor beside: the same sync run with other seeds (adherence difference, or its binomial
standard error if larger; PSNR between the two seed sets).

Writes perf/results/controlnet_quality.json (+ .png). Run: python -m perf.controlnet_quality
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from perf.common import RESULTS, parser, write_result
from perf.lora_quality import paired_psnr, seed_floor

MODELS = Path(__file__).resolve().parents[1] / "quality_models"
CASES = {"silhouette": ("silhouette",), "box": ("box",), "silhouette+box": ("silhouette", "box")}


def build_parser() -> argparse.ArgumentParser:
    ap = parser("controlnet_quality", __doc__)
    ap.add_argument("--n", type=int, default=288, help="images per (ControlNet case, mode); a multiple of 48 "
                                                       "covers every caption equally")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps")
    ap.add_argument("--size", type=int, default=64, help="image edge, pixels")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from tessera.config import EngineConfig
    from tessera.quality.features import load_evaluator
    from tessera.quality.harness import GUIDANCE, generate_served
    from tessera.quality.train_controlnet import mismatched_set, position_adherence
    from tessera.server import TritonServer
    from tessera_export.repository import add_engine, export_pipeline

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="tessera-controlnet-quality-"))
    repo = work / "repo"
    offline = EngineConfig(executor="local", policy="step-fcfs")  # an evaluation: every image, no deadlines
    export_pipeline(MODELS / "heavy", repo, engine_config=offline, progress=lambda *_: None,
                    controlnets={k: MODELS / "controlnet" / k for k in ("silhouette", "box")})
    add_engine(repo, "engine", "engine_async", entry="txt2img_async", control_mode="async")
    evaluator = load_evaluator(MODELS / "evaluator.pt")
    size = (args.size, args.size)
    results = {}
    with TritonServer(repo, log_path=work / "server.log") as server:
        for case in args.cases.split(","):
            names = CASES[case]
            per = [mismatched_set(args.n, size, kind, seed=7000) for kind in names]
            prompts, truths = per[0][0], per[0][2]  # the same scenes for every kind (same seed and order)
            maps = np.stack([np.repeat(p[1][..., None], 3, axis=3) for p in per], axis=3)  # [N, H, W, K, 3]
            maps = maps.reshape(args.n, *size, 3 * len(names))

            def extra(i: int) -> dict:
                return {"controlnet": ",".join(names), "control_image": maps[i]}

            images = {}
            for label, model, base in (("sync", "txt2img", 5000), ("async", "txt2img_async", 5000),
                                       ("sync-seedB", "txt2img", 9000)):
                jobs = [(truths[i], base + i, size) for i in range(args.n)]
                t0 = time.monotonic()
                images[label] = generate_served(server, model, jobs, args.steps, args.concurrency, extra=extra,
                                                prompts=prompts)
                print(f"[tessera] controlnet_quality {case} {label}: {args.n} images in "
                      f"{time.monotonic() - t0:.0f} s", flush=True)
            adherence = {k: position_adherence(evaluator, v, truths, prompts) for k, v in images.items()}
            floor = seed_floor(_rates(adherence["sync"]), _rates(adherence["sync-seedB"]), args.n)
            psnr_async = paired_psnr(images["async"], images["sync"])
            psnr_seeds = paired_psnr(images["sync-seedB"], images["sync"])
            for v in (psnr_async, psnr_seeds):
                v.pop("per_image_db")
            results[case] = {
                "adherence": adherence, "seed_floor": floor,
                "position_of_map_at_least_0.9": {m: adherence[m]["position_of_map"] >= 0.9 for m in ("sync", "async")},
                "async_vs_sync_psnr": psnr_async, "seed_floor_psnr_seedB_vs_sync": psnr_seeds,
                "async_drop_position_of_map": round(adherence["sync"]["position_of_map"]
                                                    - adherence["async"]["position_of_map"], 4),
            }
            print(f"[tessera] controlnet_quality {case}: {results[case]['adherence']} async PSNR "
                  f"{psnr_async['mean_db']} dB (seeds {psnr_seeds['mean_db']} dB)", flush=True)
    config = vars(args) | {"guidance": GUIDANCE, "model": "heavy reference + quality_models/controlnet (served, "
                           "executor local, ORT)", "prompt_vs_map": "the map's position is the prompt's + 1..3 (mod 4)",
                           "seeds": "5000+i (sync, async), 9000+i (seed floor)", "wall_s": round(time.monotonic() - t_start)}
    path = write_result("controlnet_quality", config, results)
    _plot(results, RESULTS / "controlnet_quality.png")
    print(f"[tessera] wrote {path}")
    return 0


def _rates(adherence: dict) -> dict:
    return {"position": adherence["position_of_map"], "colour": adherence["colour"], "shape": adherence["shape"]}


def _plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    cases = list(results)
    x = np.arange(len(cases))
    for j, (mode, colour) in enumerate((("sync", "#4a4"), ("async", "#48c"), ("sync-seedB", "#aaa"))):
        vals = [results[c]["adherence"][mode]["position_of_map"] for c in cases]
        ax.bar(x + (j - 1) * 0.27, vals, 0.27, label=mode, color=colour)
        prompt = [results[c]["adherence"][mode]["position_of_prompt"] for c in cases]
        ax.scatter(x + (j - 1) * 0.27, prompt, marker="x", color="k", zorder=3,
                   label="position of the prompt" if j == 0 else None)
    ax.axhline(0.9, ls="--", color="r", lw=1, label="goal 0.9")
    ax.set_xticks(x, cases)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of images with the object where the map puts it")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
