"""Offline image-quality metrics, own code (no torchvision): paired fidelity (PSNR, SSIM, feature cosine,
evaluator agreement), Fréchet distance and KID in any feature space, and per-attribute adherence with
a Wilson interval. Images are uint8 [N, H, W, 3] unless said otherwise."""

from __future__ import annotations

import math

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB (uint8 range); identical images give +inf."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0**2 / mse)


def _gauss(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size) - size // 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filter over axes 1 and 2 of [N, H, W, C]."""
    k = len(g)
    h = sum(g[i] * x[:, i : x.shape[1] - k + 1 + i] for i in range(k))
    return sum(g[i] * h[:, :, i : h.shape[2] - k + 1 + i] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5), averaged over channels."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    g = _gauss()
    mx, my = _blur(x, g), _blur(y, g)
    sxx = _blur(x * x, g) - mx * mx
    syy = _blur(y * y, g) - my * my
    sxy = _blur(x * y, g) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.reshape(len(a), -1).mean(1)


def cosine(f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    num = (f1 * f2).sum(1)
    return num / (np.linalg.norm(f1, axis=1) * np.linalg.norm(f2, axis=1) + 1e-12)


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Exact FD between Gaussians fitted to two feature sets; tr sqrt(S1 S2) from the nuclear norm of
    the centred cross product (no d x d sqrtm, exact when N <= d; quality.md §4)."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    n1, n2 = len(f1), len(f2)
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    if n1 <= f1.shape[1] or n2 <= f2.shape[1]:
        tr = np.linalg.svd(x1 @ x2.T, compute_uv=False).sum() / math.sqrt((n1 - 1) * (n2 - 1))
    else:
        s1, s2 = x1.T @ x1 / (n1 - 1), x2.T @ x2 / (n2 - 1)
        w, v = np.linalg.eigh(s1)
        r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        tr = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    mean = ((f1.mean(0) - f2.mean(0)) ** 2).sum()
    return float(mean + (x1**2).sum() / (n1 - 1) + (x2**2).sum() / (n2 - 1) - 2 * tr)


def kid(f1: np.ndarray, f2: np.ndarray, subsets: int = 10, subset_size: int = 100, seed: int = 0) -> float:
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel, mean over subsets."""
    rng = np.random.default_rng(seed)
    d = f1.shape[1]
    m = min(subset_size, len(f1), len(f2))
    vals = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)].astype(np.float64)
        y = f2[rng.choice(len(f2), m, replace=False)].astype(np.float64)
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                    - 2 * kxy.mean())
    return float(np.mean(vals))


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float, float]:
    """Proportion and its 95% Wilson interval."""
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = hits / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return p, centre - half, centre + half


def adherence(pred: np.ndarray, labels: np.ndarray) -> dict:
    """Per-attribute accuracy of evaluator predictions [N, 3] against the prompts' labels [N, 3]."""
    out = {}
    for i, name in enumerate(("colour", "shape", "position")):
        hits = int((pred[:, i] == labels[:, i]).sum())
        p, lo, hi = wilson(hits, len(pred))
        out[name] = {"accuracy": p, "ci95": [lo, hi], "n": len(pred)}
    out["all"] = float((pred == labels).all(1).mean()) if len(pred) else float("nan")
    return out


def paired(images: np.ndarray, reference: np.ndarray, feats: np.ndarray | None = None,
           ref_feats: np.ndarray | None = None, pred: np.ndarray | None = None,
           ref_pred: np.ndarray | None = None) -> dict:
    """Paired fidelity of `images` against `reference` (same prompt and seed, image by image)."""
    p = psnr(images, reference)
    finite = p[np.isfinite(p)]
    out = {
        "psnr_db_mean": float(finite.mean()) if len(finite) else None,
        "psnr_db_median": float(np.median(p)) if np.isfinite(np.median(p)) else None,
        "identical": int((~np.isfinite(p)).sum()),
        "ssim_mean": float(ssim(images, reference).mean()),
    }
    if feats is not None and ref_feats is not None:
        out["feature_cosine_mean"] = float(cosine(feats, ref_feats).mean())
    if pred is not None and ref_pred is not None:
        out["evaluator_agreement"] = float((pred == ref_pred).all(1).mean())
    return out
