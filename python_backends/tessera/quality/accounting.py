"""Quality accounting on what a server returned (issue 17): Frechet distance in evaluator features against real
rendered images, and adherence (the evaluator reads colour, shape and position back and compares them with the
prompt), over a set of answers and per time window. Images come in as uint8 [H, W, 3] with their prompts (one of
the 48 shapes captions) and send times."""

from __future__ import annotations

import numpy as np

from .features import evaluator_features
from .metrics import frechet_distance
from .shapes import parse_caption

MIN_FD_IMAGES = 32  # fewer answers in a window: FD not computed (adherence still is)


def real_features(evaluator, n: int, seed: int = 12345, size: int = 64) -> np.ndarray:
    """Evaluator features of n real rendered images (the reference FD is measured against)."""
    from .shapes import batch

    images, _, _ = batch(n, size, size, np.random.default_rng(seed))
    return evaluator_features(evaluator, (images * 255).round().astype(np.uint8))[0]


def served_quality(evaluator, images: list[np.ndarray], prompts: list[str], real: np.ndarray,
                   n_fd: int | None = None, seed: int = 0) -> dict:
    """{n, adherence (all three attributes right), per-attribute accuracy, fd}. `n_fd`: FD over a random subset of
    this many images (FD is biased by N: sets compared should use the same N); None: all of them."""
    if not images:
        return {"n": 0, "adherence": None, "fd": None}
    feats, preds = evaluator_features(evaluator, np.stack(images))
    labels = np.stack([parse_caption(p).as_array() for p in prompts])
    right = preds == labels
    out = {"n": len(images), "adherence": float(right.all(axis=1).mean()),
           "colour": float(right[:, 0].mean()), "shape": float(right[:, 1].mean()),
           "position": float(right[:, 2].mean()), "fd": None, "fd_n": 0}
    if n_fd is not None and len(images) >= n_fd:
        idx = np.random.default_rng(seed).choice(len(images), size=n_fd, replace=False)
        out["fd"], out["fd_n"] = frechet_distance(feats[idx], real), n_fd
    elif n_fd is None and len(images) >= MIN_FD_IMAGES:
        out["fd"], out["fd_n"] = frechet_distance(feats, real), len(images)
    return out


def by_window(evaluator, records, real: np.ndarray, window_s: float) -> list[dict]:
    """served_quality per window of send time (records with .arrival_s, .status, .image, .prompt, .met)."""
    if not records:
        return []
    end = max(r.arrival_s for r in records)
    out = []
    for k in range(int(end // window_s) + 1):
        sub = [r for r in records if k * window_s <= r.arrival_s < (k + 1) * window_s]
        ok = [r for r in sub if r.status == "ok" and r.image is not None]
        q = served_quality(evaluator, [r.image for r in ok], [r.prompt for r in ok], real)
        out.append({"start_s": k * window_s, "requests": len(sub),
                    "violation": 1 - sum(r.met for r in sub) / len(sub) if sub else None,
                    "light_share": sum(r.served_by == "light" for r in ok) / len(ok) if ok else None, **q})
    return out
