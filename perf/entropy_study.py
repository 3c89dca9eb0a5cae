"""Which latent entropy signals convergence, and what each stop point costs in quality (in-process study
for docs/early_exit.md; the served table is `tessera quality --set early-exit`).

Runs the heavy reference model's full-step path in process (Tessera's own Txt2Img, ORT components) for
48 prompts x N seeds, records after every step: Gaussian entropy of the predicted clean latent x0_hat,
histogram entropy of x0_hat, Gaussian entropy of the latent z_t; then replays ExitRule on the recorded
traces for a grid of (epsilon, window) and decodes what each "last step" mode would return at its stop:
  x0    decode x0_hat of the stop step;  jump  x0_hat of the next step (one more call);  none  z_t.
Paired PSNR is against the full-step image of the same prompt and seed.
Writes perf/results/entropy_study.json + .png. Run: python -m perf.entropy_study
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from perf.common import parser, write_result

EPSILONS = (0.002, 0.005, 0.01, 0.02, 0.05)
WINDOWS = (1, 2, 3)


def build_parser() -> argparse.ArgumentParser:
    ap = parser("entropy_study", __doc__)
    ap.add_argument("--models", default="quality_models", help="directory holding heavy/ (the reference)")
    ap.add_argument("--steps", type=int, default=50, help="full-step denoising steps")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per prompt (48 prompts each)")
    ap.add_argument("--min-fraction", type=float, default=0.3,
                    help="exit rule: no stop before this fraction of the steps")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import torch
    from transformers import CLIPTokenizer

    torch.set_num_threads(1)
    from tessera.early_exit import ExitRule, gaussian_entropy, histogram_entropy
    from tessera.executors.ort import LocalComponents
    from tessera.generation import Txt2Img
    from tessera.quality.harness import GUIDANCE
    from tessera.quality.metrics import psnr as _psnr

    def psnr(a, b):
        return float(_psnr(a[None], b[None])[0])
    from tessera.quality.shapes import all_labels
    from tessera.request import GenerationParams
    from tessera.spec import PipelineSpec
    from tessera_export.repository import export_pipeline

    repo = Path(tempfile.mkdtemp(prefix="tessera-entropy-")) / "repo"
    export_pipeline(Path(args.models) / "heavy", repo, executor="local", progress=lambda *_: None)
    spec = PipelineSpec.load(repo / "engine" / "1" / "manifest.json")
    toks = [CLIPTokenizer.from_pretrained(repo / "engine" / "1" / d) for d in spec.tokenizers]
    pipe = Txt2Img(spec, LocalComponents(spec, repo), toks)

    def decode(latent):
        run.latents = latent
        return pipe.finish(run)

    traces = {"h_x0_gauss": [], "h_x0_hist": [], "h_z_gauss": []}
    x0s, zs, finals = [], [], []
    for seed in range(args.seeds):
        for lb in all_labels():
            run = pipe.start(GenerationParams(lb.caption, "", 64, 64, args.steps, GUIDANCE, seed))
            hx, hh, hz, xr, zr = [], [], [], [], []
            while not run.done:
                pipe.step(run)
                hx.append(run.entropies[-1])
                hh.append(histogram_entropy(run.x0.numpy()))
                hz.append(gaussian_entropy(run.latents.numpy()))
                xr.append(run.x0.clone())
                zr.append(run.latents.clone())
            traces["h_x0_gauss"].append(hx)
            traces["h_x0_hist"].append(hh)
            traces["h_z_gauss"].append(hz)
            x0s.append(xr)
            zs.append(zr)
            finals.append(pipe.finish(run))
    n = len(finals)
    print(f"[tessera] entropy study: {n} full-step runs recorded", flush=True)
    mean = {k: np.mean(np.asarray(v), axis=0).tolist() for k, v in traces.items()}
    absdelta = {k: np.mean(np.abs(np.diff(np.asarray(v), axis=1)), axis=0).tolist() for k, v in traces.items()}
    # Quality of stopping after k steps, every k (x0: decode x0_hat_k; none: decode z_k).
    every = {}
    for k in (5, 10, 15, 20, 25, 30, 35, 40, 45):
        ims_x0 = [decode(x0s[i][k - 1]) for i in range(n)]
        ims_z = [decode(zs[i][k - 1]) for i in range(n)]
        every[k] = {"psnr_x0_db": float(np.mean([psnr(a, b) for a, b in zip(ims_x0, finals, strict=True)])),
                    "psnr_noisy_db": float(np.mean([psnr(a, b) for a, b in zip(ims_z, finals, strict=True)]))}
        print(f"  stop after {k}: {every[k]}", flush=True)
    grid = []
    for signal in ("h_x0_gauss", "h_x0_hist"):
        for eps in EPSILONS:
            for w in WINDOWS:
                for mode in ("x0", "jump", "none"):
                    rule = ExitRule(eps, w, args.min_fraction, 4, mode)
                    ran, ps = [], []
                    for i in range(n):
                        tr = traces[signal][i]
                        stop = next((k for k in range(1, args.steps + 1) if rule.should_stop(tr[:k], args.steps)), None)
                        if stop is None:
                            ran.append(args.steps)
                            ps.append(float("inf"))
                            continue
                        if mode == "x0":
                            img, steps = decode(x0s[i][stop - 1]), stop
                        elif mode == "jump":
                            img, steps = decode(x0s[i][stop]), stop + 1
                        else:
                            img, steps = decode(zs[i][stop - 1]), stop
                        ran.append(steps)
                        ps.append(psnr(img, finals[i]))
                    finite = [p for p in ps if np.isfinite(p)]
                    grid.append({"signal": signal, "epsilon": eps, "window": w, "last_step": mode,
                                 "mean_steps": float(np.mean(ran)), "saved": 1 - float(np.mean(ran)) / args.steps,
                                 "psnr_db_mean_exited": float(np.mean(finite)) if finite else None,
                                 "psnr_db_min": float(np.min(finite)) if finite else None,
                                 "exited": len(finite)})
    for row in grid:
        if row["signal"] == "h_x0_gauss" and row["last_step"] != "none":
            print(f"  {row}", flush=True)
    config = {"models": args.models, "steps": args.steps, "prompts": 48, "seeds": args.seeds, "size": [64, 64],
              "guidance": GUIDANCE, "min_fraction": args.min_fraction, "runtime": "in-process ORT (Txt2Img)"}
    path = write_result("entropy_study", config, {"mean_trace": mean, "mean_abs_delta": absdelta,
                                                  "stop_after_k": every, "grid": grid})
    _plot(mean, absdelta, every, path.with_suffix(".png"))
    print(f"[tessera] entropy study: wrote {path}")
    return 0


def _plot(mean, absdelta, every, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for k, v in mean.items():
        ax[0].plot(range(1, len(v) + 1), v, label=k)
    ax[0].set(title="entropy after each step (mean)", xlabel="step", ylabel="nats")
    ax[0].legend()
    for k, v in absdelta.items():
        ax[1].semilogy(range(2, len(v) + 2), v, label=k)
    ax[1].set(title="|H_t - H_t-1| (mean)", xlabel="step")
    ax[1].legend()
    ks = sorted(every)
    ax[2].plot(ks, [every[k]["psnr_x0_db"] for k in ks], "o-", label="decode x0_hat (one last step)")
    ax[2].plot(ks, [every[k]["psnr_noisy_db"] for k in ks], "s-", label="decode noisy z_t")
    ax[2].set(title="paired PSNR vs full-step, stop after k", xlabel="k", ylabel="dB")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
