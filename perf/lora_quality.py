"""What BAL's late join costs in quality: each reference LoRA adapter applied from step K of 50 instead of from
the start (K = 0 is the synchronous load), the way the engine runs a request while its adapter loads.

In process, diffusers on the CPU (1 thread), heavy reference pipeline (`quality_models/heavy`). For each
style adapter and each K of `--ks` plus the adapter's profiled K (`tessera lora-profile`, read through
LoraRegistry; BAL's clamp to steps - 1 applied): N prompts (all_labels cycled), one seeded generator per
prompt (seed + i, as train_lora.generate), the adapter disabled for steps < K and enabled from step K on
(`callback_on_step_end` after step K - 1). Reported per K: paired PSNR against the K = 0 image of the same
prompt and seed, and style / colour / shape / position adherence (train_lora.adherence: style evaluator +
main evaluator), its drop against K = 0 beside the seed floor: the same adherence of K = 0 images under a
second seed set (seed + `--floor-offset` + i), floor = max(|adherence(set A) - adherence(set B)|, the binomial
standard error of that difference). The base model
(no adapter) is measured once for reference.
Writes perf/results/lora_quality.json + .png (--quick: a temp dir unless --out is given).
Run: python -m perf.lora_quality
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from perf.common import RESULTS, parser, write_result

KS = (0, 2, 5, 10, 20)
METRICS = ("style", "colour", "shape", "position")
QUICK = {"images": 4, "steps": 6, "ks": "0,2,5"}  # --quick: a smoke run in seconds
# Cost of a 48-image batch relative to the base model's, measured here (2 shared cores, 1 thread): a rank-4
# adapter on train_lora.TARGETS, unfused, x1.41-1.65; the same adapter disabled (PEFT's bypass) x1.05-1.27.
LORA_FACTOR = 1.55
DISABLED_FACTOR = 1.15


def build_parser() -> argparse.ArgumentParser:
    from tessera.quality.train_lora import LORA_STYLES

    ap = parser("lora_quality", __doc__)
    ap.add_argument("--base", default="quality_models/heavy", help="the base diffusers pipeline")
    ap.add_argument("--lora-dir", default="quality_models/lora", help="adapter directory (LoraRegistry layout)")
    ap.add_argument("--evaluators", default="quality_models",
                    help="directory holding evaluator.pt and style_evaluator.pt (either may be absent)")
    ap.add_argument("--styles", default=",".join(LORA_STYLES), help="adapters (by name) to measure")
    ap.add_argument("--images", type=int, default=48, help="prompts per K (all_labels cycled)")
    ap.add_argument("--steps", type=int, default=50, help="denoising steps")
    ap.add_argument("--ks", default=",".join(map(str, KS)), help="join steps K (0: synchronous load)")
    ap.add_argument("--default-k", type=int, default=None,
                    help="K for an adapter without a profile (none: no profiled K measured)")
    ap.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    ap.add_argument("--size", type=int, default=64, help="image height and width in pixels")
    ap.add_argument("--seed", type=int, default=0, help="seed set A: prompt i gets seed + i")
    ap.add_argument("--floor-offset", type=int, default=10000, help="seed set B (the floor): seed + offset + i")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: {QUICK['images']} images, {QUICK['steps']} steps, K in {QUICK['ks']}")
    ap.add_argument("--out", help="result JSON (none: perf/results/lora_quality.json; --quick: a temp dir)")
    return ap


# -- the late join ------------------------------------------------------------------------------------------
def join_callback(k: int):
    """diffusers `callback_on_step_end` that enables the pipeline's LoRA after step k - 1 (0-based), so steps
    k, k+1, ... run with it. diffusers calls it after each step i with `i` = the step just run."""

    def callback(pipe, i: int, t, callback_kwargs: dict) -> dict:
        if i == k - 1:
            pipe.enable_lora()
        return callback_kwargs

    return callback


def generate_joined(pipe, prompts: Sequence[str], seed: int, steps: int, guidance: float, k: int,
                    size: int = 64) -> np.ndarray:
    """uint8 [N, size, size, 3], generated as train_lora.generate does (one generator per prompt, seed + i),
    with the loaded adapter(s) off for steps < k and on from step k (k <= 0: from the start; k >= steps:
    never). The adapter is enabled again on return; k <= 0 leaves the pipeline's adapters alone (no adapter
    loaded: the base model)."""
    import torch

    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    if k > 0:
        pipe.disable_lora()
    try:
        with torch.no_grad():
            out = pipe(list(prompts), height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                       generator=gens, output_type="np", callback_on_step_end=join_callback(k)).images
    finally:
        if k > 0:
            pipe.enable_lora()
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


# -- pure measures ------------------------------------------------------------------------------------------
def paired_psnr(images: np.ndarray, reference: np.ndarray) -> dict:
    """Per-image PSNR (dB, uint8 range) of images [N, H, W, 3] against the same-index reference. Identical
    pairs (+inf) are counted in `identical` and left out of mean and min (null when all are identical)."""
    from tessera.quality.metrics import psnr

    per = psnr(images, reference)
    finite = per[np.isfinite(per)]
    return {"mean_db": round(float(finite.mean()), 3) if finite.size else None,
            "min_db": round(float(finite.min()), 3) if finite.size else None,
            "identical": int((~np.isfinite(per)).sum()),
            "per_image_db": [round(float(p), 3) if math.isfinite(p) else None for p in per]}


def rates(adherence: Mapping) -> dict[str, float]:
    """The adherence shares of METRICS present in a train_lora.adherence result (style needs the style
    evaluator, the rest the main one)."""
    return {m: float(adherence[m]) for m in METRICS if m in adherence}


def seed_floor(set_a: Mapping, set_b: Mapping, n: int) -> dict:
    """The seed floor per metric: how far adherence moves when only the seeds change. Measured as
    |adherence(A) - adherence(B)| for the same prompts under two seed sets; one pair of sets is a noisy
    estimate (two lucky sets give 0), so the floor is the larger of that and the binomial standard error of
    the difference, sqrt(pA(1-pA)/n + pB(1-pB)/n) (fixed before any result was seen)."""
    a, b = rates(set_a), rates(set_b)
    measured = {m: round(abs(a[m] - b[m]), 4) for m in a if m in b}
    se = {m: round(math.sqrt(a[m] * (1 - a[m]) / n + b[m] * (1 - b[m]) / n), 4) for m in measured}
    return {"floor": {m: max(measured[m], se[m]) for m in measured}, "measured": measured, "se_diff": se}


def drops(adherence_k: Mapping, adherence_0: Mapping, floor: Mapping[str, float]) -> tuple[dict, dict]:
    """(drop, within): drop = adherence(K=0) - adherence(K) per metric (positive: worse than the synchronous
    load); within = drop <= floor."""
    k, zero = rates(adherence_k), rates(adherence_0)
    drop = {m: round(zero[m] - k[m], 4) for m in k if m in zero}
    within = {m: bool(d <= floor[m] + 1e-9) for m, d in drop.items() if m in floor}
    return drop, within


def profiled_k(lora_dir: Path, name: str, steps: int, default_k: int | None) -> dict | None:
    """The K BAL would serve `name` with at `steps` steps: its profile's (LoraRegistry.k_for), else
    `default_k`, clamped to steps - 1 (bal.effective_k); None without profile and default."""
    from tessera.bal import effective_k
    from tessera.lora_registry import LoraRegistry

    registry = LoraRegistry(lora_dir)
    path = registry.adapter(name).profile_path
    profile = registry.profile(name)
    if profile is None and default_k is None:
        return None
    raw = registry.k_for(name, steps, default_k if default_k is not None else 0)
    return {"k": effective_k(raw, steps), "k_profile": raw, "from_profile": profile is not None,
            "source": str(path) if profile is not None else f"--default-k {default_k} (no profile at {path})"}


def estimate_s(base_batch_s: float, steps: int, ks_by_style: Sequence[Sequence[int]],
               lora_factor: float = LORA_FACTOR, disabled_factor: float = DISABLED_FACTOR) -> float:
    """Wall time of a run from one timed base batch: the base batch, then per style the K=0 seed sets A and
    B and each K > 0 of that style (K steps with the adapter disabled, the rest with it on)."""
    def batch(k: int) -> float:
        return (k * disabled_factor + (steps - k) * lora_factor) / steps

    return base_batch_s * (1 + sum(2 * lora_factor + sum(batch(k) for k in set(ks) if k > 0)
                                   for ks in ks_by_style))


# -- the run ------------------------------------------------------------------------------------------------
def _load_evaluators(directory: Path):
    from tessera.quality.features import load_evaluator
    from tessera.quality.style_eval import WEIGHTS_NAME, load_style_evaluator

    evaluator = load_evaluator(directory / "evaluator.pt") if (directory / "evaluator.pt").exists() else None
    style = load_style_evaluator(directory / WEIGHTS_NAME) if (directory / WEIGHTS_NAME).exists() else None
    return evaluator, style


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.images, args.steps, args.ks = QUICK["images"], QUICK["steps"], QUICK["ks"]
    import torch

    torch.set_num_threads(1)
    from tessera.lora_registry import LoraRegistry
    from tessera.quality.shapes import STYLES, all_labels
    from tessera.quality.train_lora import adherence, load_reference

    styles = [s for s in args.styles.split(",") if s]
    ks = sorted({int(k) for k in args.ks.split(",")})
    bad = [k for k in ks if not 0 <= k <= args.steps]
    if bad or 0 not in ks:
        raise SystemExit(f"--ks: allowed integers in [0, {args.steps}] including 0, got {args.ks!r}")
    lora_dir = Path(args.lora_dir)
    registry = LoraRegistry(lora_dir)
    for s in styles:
        if s not in STYLES or s not in registry:
            raise SystemExit(f"--styles: allowed adapters of {lora_dir} named for a style {STYLES}, got {s!r} "
                             f"(servable there: {sorted(registry.names())})")
    out_dir = Path(args.out).parent if args.out else (
        Path(tempfile.mkdtemp(prefix="tessera-lora-quality-")) if args.quick else RESULTS)
    evaluator, style_evaluator = _load_evaluators(Path(args.evaluators))
    if style_evaluator is None:
        print(f"[tessera] lora quality: no style evaluator in {args.evaluators}: style adherence not measured")
    labels = [lb.caption for lb in all_labels()]
    prompts = (labels * (args.images // len(labels) + 1))[: args.images]
    seed_b = args.seed + args.floor_offset
    t_start = time.monotonic()
    pipe = load_reference(args.base)
    timing: dict[str, float] = {}

    def run(tag: str, seed: int, k: int) -> np.ndarray:
        t0 = time.monotonic()
        images = generate_joined(pipe, prompts, seed, args.steps, args.guidance, k, args.size)
        timing[tag] = round(time.monotonic() - t0, 2)
        print(f"[tessera] lora quality: {tag} {timing[tag]:.1f} s", flush=True)
        return images

    profiled = {s: profiled_k(lora_dir, s, args.steps, args.default_k) for s in styles}
    base_images = run("base", args.seed, 0)  # no adapter loaded yet: the base model
    ks_by_style = [ks + ([profiled[s]["k"]] if profiled[s] else []) for s in styles]
    est = estimate_s(timing["base"], args.steps, ks_by_style)
    print(f"[tessera] lora quality: estimated total {est / 60:.1f} min ({args.images} images, {args.steps} steps, "
          f"K {ks} + profiled, {len(styles)} styles; adapter cost x{LORA_FACTOR}, disabled x{DISABLED_FACTOR} "
          f"of the base batch's {timing['base']:.1f} s)", flush=True)
    base_adh = {s: adherence(base_images, prompts, s, evaluator, style_evaluator) for s in styles}
    results: dict[str, dict] = {}
    for style in styles:
        adapter = registry.adapter(style)
        prof = profiled[style]
        if prof is None or not prof["from_profile"]:
            print(f"[tessera] lora quality {style}: no profile at {adapter.profile_path} (`tessera lora-profile`): "
                  + ("profiled K null" if prof is None else f"--default-k {args.default_k} measured instead"))
        pipe.load_lora_weights(adapter.path.parent, weight_name=adapter.path.name, adapter_name=style)
        try:
            images = {0: run(f"{style} K=0", args.seed, 0)}
            floor_images = run(f"{style} K=0 seeds B", seed_b, 0)
            for k in sorted(set(ks) | ({prof["k"]} if prof else set())):
                if k not in images:
                    images[k] = run(f"{style} K={k}", args.seed, k)
        finally:
            pipe.unload_lora_weights()
        adh = {k: adherence(im, prompts, style, evaluator, style_evaluator) for k, im in images.items()}
        adh_b = adherence(floor_images, prompts, style, evaluator, style_evaluator)
        floor = seed_floor(adh[0], adh_b, len(prompts))
        rows = []
        for k, im in images.items():
            drop, within = drops(adh[k], adh[0], floor["floor"])
            rows.append({"k": k, "in_grid": k in ks, "profiled": bool(prof and k == prof["k"]),
                         "psnr_vs_k0": paired_psnr(im, images[0]), "adherence": adh[k], "drop_vs_k0": drop,
                         "within_floor": within})
        prow = next((r for r in rows if r["profiled"]), None)
        within_style = prow["within_floor"].get("style") if prow else None
        results[style] = {
            "adapter": str(adapter.path),
            "profile": str(adapter.profile_path) if prof and prof["from_profile"] else None,
            "profiled": prof, "base_adherence": base_adh[style],
            "k0_adherence_seed_set_b": adh_b, "seed_floor": floor["floor"], "seed_floor_measured": floor["measured"],
            "seed_floor_se_diff": floor["se_diff"],
            "by_k": rows, "profiled_k_within_floor": within_style,
            "base_psnr_vs_k0": {kk: v for kk, v in paired_psnr(base_images, images[0]).items() if kk != "per_image_db"},
        }
        summary = ", ".join(f"K={r['k']}: {r['psnr_vs_k0']['mean_db']} dB, drop {r['drop_vs_k0']}" for r in rows)
        print(f"[tessera] lora quality {style}: floor {floor['floor']}; {summary}; profiled "
              f"{prof['k'] if prof else None} within floor (style): {within_style}", flush=True)
    wall = time.monotonic() - t_start
    config = {"base": args.base, "lora_dir": str(lora_dir), "evaluators": args.evaluators, "styles": styles,
              "images": args.images, "steps": args.steps, "ks": ks, "default_k": args.default_k,
              "guidance": args.guidance, "size": [args.size, args.size], "seed_set_a": f"{args.seed}+i",
              "seed_set_b": f"{seed_b}+i", "quick": args.quick, "threads": 1,
              "style_evaluator": style_evaluator is not None, "evaluator": evaluator is not None,
              "runtime": "in-process diffusers (torch, CPU), adapter unfused (PEFT)"}
    method = {
        "join": "adapter disabled (pipe.disable_lora) for steps < K, enabled by callback_on_step_end after step "
                "K-1, so steps K.. use it; K=0 is the synchronous load (a plain run with the adapter loaded)",
        "psnr": "paired: each image vs the K=0 image of the same prompt and seed (seed set A); mean and min over "
                "non-identical pairs",
        "adherence": "train_lora.adherence: style = style evaluator's prediction equals the adapter's style; "
                     "colour/shape/position = main evaluator agrees with the prompt",
        "seed_floor": "max(seed_floor_measured, seed_floor_se_diff) per metric: seed_floor_measured = "
                      "|adherence(K=0, seed set A) - adherence(K=0, seed set B)|, same prompts; seed_floor_se_diff = "
                      "the binomial standard error of that difference (one pair of seed sets alone can give 0)",
        "drop": "adherence(K=0) - adherence(K), paired seeds (set A); within_floor: drop <= seed_floor",
        "profiled": "LoraRegistry(lora_dir).k_for(style, steps) from the adapter's profile, clamped to steps-1 as "
                    "BAL serves it; null when the adapter has no profile (and no --default-k)",
        "profiled_k_within_floor": "style drop at the profiled K <= the style seed floor; null without a "
                                   "profile or without the style evaluator",
    }
    name = Path(args.out).stem if args.out else "lora_quality"
    path = write_result(name, config, {"method": method, "styles": results, "timing_s": timing,
                                        "wall_s": round(wall, 1)}, out_dir)
    _plot(results, args.steps, path.with_suffix(".png"))
    print(f"[tessera] lora quality: wrote {path} ({wall / 60:.1f} min)")
    return 0


def _plot(results: dict, steps: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for i, (style, res) in enumerate(results.items()):
        rows = sorted((r for r in res["by_k"] if r["k"] > 0), key=lambda r: r["k"])
        colour = f"C{i}"
        ax[0].plot([r["k"] for r in rows], [r["psnr_vs_k0"]["mean_db"] for r in rows], "o-", color=colour,
                   label=f"{style} mean")
        ax[0].plot([r["k"] for r in rows], [r["psnr_vs_k0"]["min_db"] for r in rows], "x:", color=colour,
                   label=f"{style} min")
        every = sorted(res["by_k"], key=lambda r: r["k"])
        metric = next((m for m in METRICS if m in every[0]["adherence"]), None)  # style when measured
        if metric is None:
            continue
        ax[1].plot([r["k"] for r in every], [r["adherence"][metric] for r in every], "o-", color=colour,
                   label=f"{style} ({metric})")
        k0, floor = every[0]["adherence"][metric], res["seed_floor"][metric]
        ax[1].axhspan(k0 - floor, k0 + floor, color=colour, alpha=0.12)
        if res["profiled"]:
            k = res["profiled"]["k"]
            ax[1].plot([k], [next(r for r in every if r["k"] == k)["adherence"][metric]], "*", color=colour,
                       markersize=14)
    ax[0].set(title="paired PSNR vs the synchronous load (K=0)", xlabel=f"K (adapter joins at step K of {steps})",
              ylabel="dB")
    ax[0].legend(fontsize=7)
    ax[1].set(title="adherence (band: K=0 +- seed floor; star: profiled K)", xlabel="K", ylabel="share")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
