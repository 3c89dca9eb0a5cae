"""Which light model is worth cascading (issue 17, build 1): candidate samplers on one held-out prompt set.

Each candidate is a diffusers pipeline at a number of DDIM steps, run in-process (one thread) on the same held-out
(caption, seed) jobs: the world's 48 captions cycled over --n seeds. Per candidate: the evaluator's share right
(every attribute) and wrong, per-attribute accuracy, FD in evaluator features against real rendered images (the
same N for every candidate: FD is biased by N), and the in-process time per image. The issue's bar: right on
>= 40% and wrong on >= 20% (routing matters), and >= 4x cheaper per image than the heavy pipeline at its steps.

Candidates: --candidates NAME=DIR@STEPS,... (default: the heavy reference at 50 (the reference), 2 and 1 steps, the
committed student at 2 and 1, the light reference at 50 and 2).

Writes perf/results/light_models.json (+ .png). Run: python -m perf.light_models
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from perf.common import RESULTS, parser, write_result

DEFAULT = ("heavy@50=quality_models/heavy@50,heavy@2=quality_models/heavy@2,heavy@1=quality_models/heavy@1,"
           "student@2=quality_models/student@2,student@1=quality_models/student@1,"
           "light@50=quality_models/light@50,light@2=quality_models/light@2,"
           "student-light@2=quality_models/student_light@2,student-light@1=quality_models/student_light@1,"
           "student-turbo@1=quality_models/student_turbo@1")
REFERENCE = "heavy@50"


def build_parser():
    ap = parser("light_models", __doc__)
    ap.add_argument("--candidates", default=DEFAULT, help="NAME=PIPELINE_DIR@STEPS, comma-separated; the first is "
                    "the reference the cost ratios divide")
    ap.add_argument("--evaluator", default="quality_models/evaluator.pt", help="judges the images right/wrong")
    ap.add_argument("--n", type=int, default=288, help="held-out (caption, seed) jobs")
    ap.add_argument("--seed0", type=int, default=500_000, help="first seed (the student trainer's held-out seeds)")
    ap.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance (the references')")
    return ap


def parse_candidates(text: str) -> list[tuple[str, Path, int]]:
    out = []
    for item in text.split(","):
        name, _, rest = item.partition("=")
        where, _, steps = rest.rpartition("@")
        if not name or not where or not steps.isdigit() or int(steps) < 1:
            raise SystemExit(f"--candidates: {item!r}; allowed NAME=PIPELINE_DIR@STEPS with STEPS >= 1")
        out.append((name, Path(where), int(steps)))
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from tessera.quality.discriminator import generate, jobs_for, real_images
    from tessera.quality.features import evaluator_features, load_evaluator
    from tessera.quality.metrics import frechet_distance
    from tessera.quality.shapes import parse_caption
    from tessera_export.tiny import load_pipeline

    candidates = parse_candidates(args.candidates)
    ev = load_evaluator(args.evaluator)
    jobs = jobs_for(args.n, args.seed0)
    labels = np.stack([parse_caption(lb.caption).as_array() for lb, _ in jobs])
    real = evaluator_features(ev, real_images(args.n, args.seed0))[0]
    rows = {}
    for name, where, steps in candidates:
        pipe = load_pipeline(where)
        generate(pipe, jobs[:4], steps, args.guidance)  # warm-up
        t0 = time.perf_counter()  # generation only: the pipeline is loaded once, outside the timing
        images = generate(pipe, jobs, steps, args.guidance)
        ms = 1e3 * (time.perf_counter() - t0) / len(jobs)
        feats, verdict = evaluator_features(ev, images)
        hits = verdict == labels
        right = float(hits.all(axis=1).mean())
        record = where / "training.json"
        rows[name] = {"pipeline": str(where), "steps": steps, "right": right, "wrong": 1 - right,
                      "colour": float(hits[:, 0].mean()), "shape": float(hits[:, 1].mean()),
                      "position": float(hits[:, 2].mean()), "fd_vs_real": float(frechet_distance(feats, real)),
                      "ms_per_image": ms,
                      "training": json.loads(record.read_text()) if record.exists() else None}
        print(f"[tessera] {name:12s} right {right:.3f} fd {rows[name]['fd_vs_real']:.1f} {ms:.1f} ms/image", flush=True)
    ref = rows[candidates[0][0]]["ms_per_image"]
    for name, row in rows.items():
        row["cheaper_than_reference"] = ref / row["ms_per_image"]
        row["meets_bar"] = row["right"] >= 0.4 and row["wrong"] >= 0.2 and row["cheaper_than_reference"] >= 4
    write_result("light_models", vars(args) | {"reference": candidates[0][0], "fd_n": args.n},
                 {"candidates": rows})
    _plot(rows)
    return 0


def _plot(rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, r in rows.items():
        ax.scatter(r["wrong"], r["fd_vs_real"], s=40, color="tab:green" if r["meets_bar"] else "tab:gray")
        ax.annotate(f"{name} ({r['cheaper_than_reference']:.0f}x)", (r["wrong"], r["fd_vs_real"]), fontsize=8,
                    xytext=(4, 3), textcoords="offset points")
    ax.axvline(0.2, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("wrong (evaluator), share of held-out prompts")
    ax.set_ylabel("FD vs real images (evaluator features)")
    ax.set_yscale("log")
    ax.set_title("Light-model candidates: wrong >= 20% (right of the line) and close to real (low)")
    fig.tight_layout()
    fig.savefig(RESULTS / "light_models.png", dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
