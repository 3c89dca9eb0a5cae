"""The cascade's discriminator (DiffServe, issue 17): a small CNN that tells real rendered images (label 1) from
generated ones (label 0: the light AND the heavy pipeline's images, as DiffServe found works better than light
ones alone); its confidence is P(real). Exported to ONNX as its own Triton model (uint8 [N, H, W, 3] in, `p_real`
[N, 1] out). `train_discriminator` generates its data, trains it, and measures on held-out seeds what the cascade
plans with: the deferral profile f(t) and the light pipeline's adherence among the images it would keep and defer
at each threshold (the discriminator against random routing, offline). Everything it records comes from here."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .shapes import Label, all_labels, batch

SIZE = 64  # images are scored at 64 x 64 (larger ones resized, as the evaluator does)
QUANTILES = np.linspace(0.05, 0.95, 19)  # f(t) is measured at 0, 1 and these quantiles of the light confidences
INPUT, OUTPUT = "image", "p_real"


class Discriminator(nn.Module):
    """uint8 [N, H, W, 3] -> P(real) [N, 1]: 4 stride-2 convs (GroupNorm, SiLU), mean pool, one logit."""

    def __init__(self, width: int = 32):
        super().__init__()
        chans = (3, width // 2, width, 2 * width, 2 * width)
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.GroupNorm(8, chans[i + 1]),
                       nn.SiLU()]
        self.conv = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], 1)

    def logit(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().permute(0, 3, 1, 2) / 127.5 - 1.0
        # always resized (identity at 64 x 64), so the exported graph resizes every size it is given
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        return self.head(self.conv(x).mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(images))


def generate(pipeline, jobs: list[tuple[Label, int]], steps: int, guidance: float = 4.0, size: int = SIZE,
             chunk: int = 48) -> np.ndarray:
    """uint8 [N, size, size, 3]: the diffusers pipeline (a directory, or one already loaded) on (label, seed) jobs,
    batched."""
    from tessera_export.tiny import load_pipeline

    pipe = load_pipeline(pipeline) if isinstance(pipeline, (str, Path)) else pipeline
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(jobs), chunk):
        part = jobs[i : i + chunk]
        ims = pipe([lb.caption for lb, _ in part], height=size, width=size, num_inference_steps=steps,
                   guidance_scale=guidance, generator=[torch.Generator().manual_seed(s) for _, s in part],
                   output_type="np").images
        out.append((np.clip(ims, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def jobs_for(n: int, seed0: int) -> list[tuple[Label, int]]:
    labels = all_labels()
    return [(labels[i % len(labels)], seed0 + i) for i in range(n)]


def real_images(n: int, seed: int) -> np.ndarray:
    images, _, _ = batch(n, SIZE, SIZE, np.random.default_rng(seed))
    return (images * 255).round().astype(np.uint8)


@torch.no_grad()
def score(model: Discriminator, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(images[i : i + chunk])).numpy()[:, 0]
                           for i in range(0, len(images), chunk)])


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def export_onnx(model: Discriminator, path: str | Path) -> float:
    """ONNX with dynamic batch, height and width; returns the largest |ONNX - torch| on a random batch."""
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.randint(0, 256, (2, SIZE, SIZE, 3), dtype=torch.uint8)
    torch.onnx.export(model, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: "batch", 1: "height", 2: "width"}, OUTPUT: {0: "batch"}},
                      opset_version=17, dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    err = 0.0
    for h, w in ((SIZE, SIZE), (2 * SIZE, SIZE)):  # the exported graph resizes, as torch does
        test = torch.randint(0, 256, (3, h, w, 3), dtype=torch.uint8)
        with torch.no_grad():
            want = model(test).numpy()
        err = max(err, float(np.abs(sess.run(None, {INPUT: test.numpy()})[0] - want).max()))
    return err


def export_checkpoint(src_dir: str | Path, path: str | Path) -> float:
    """model.onnx at `path` from the trained weights `src_dir`/discriminator.pt (the repository keeps the weights;
    ONNX files are build outputs); returns the largest |ONNX - torch|, as export_onnx."""
    model = Discriminator()
    model.load_state_dict(torch.load(Path(src_dir) / "discriminator.pt", map_location="cpu", weights_only=True))
    return export_onnx(model, path)


def train_discriminator(out_dir: str | Path, light_dir: str | Path, heavy_dir: str | Path, evaluator_path: str | Path,
                        light_steps: int, heavy_steps: int = 50, per_kind: int = 576, held_out: int = 288,
                        steps: int = 600, seed: int = 0) -> dict:
    """Generate, train, export `out_dir`/model.onnx and write `out_dir`/discriminator.json (the training record,
    the profile f(t) and the per-threshold adherence); returns that record."""
    from .features import evaluator_features, load_evaluator
    from .shapes import parse_caption

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    train_jobs = jobs_for(per_kind, 100_000 + seed * 10_000)
    light = generate(light_dir, train_jobs, light_steps)
    heavy = generate(heavy_dir, jobs_for(per_kind, 200_000 + seed * 10_000), heavy_steps)
    real = real_images(2 * per_kind, seed + 17)
    gen_s = time.monotonic() - t0
    x = np.concatenate([real, light, heavy])
    y = np.concatenate([np.ones(len(real)), np.zeros(len(light) + len(heavy))]).astype(np.float32)
    model = Discriminator()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    t1 = time.monotonic()
    losses = []
    for step in range(steps):
        idx = rng.integers(0, len(x), size=64)
        logit = model.logit(torch.from_numpy(x[idx]))[:, 0]
        loss = F.binary_cross_entropy_with_logits(logit, torch.from_numpy(y[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    train_s = time.monotonic() - t1
    model.eval()
    # held out: other seeds (and prompts cycled from the start), scored and judged by the evaluator
    ho_jobs = jobs_for(held_out, 300_000 + seed * 10_000)
    ho_light = generate(light_dir, ho_jobs, light_steps)
    ho_heavy = generate(heavy_dir, ho_jobs, heavy_steps)
    ho_real = real_images(held_out, seed + 29)
    c_light, c_heavy, c_real = score(model, ho_light), score(model, ho_heavy), score(model, ho_real)
    ev = load_evaluator(evaluator_path)
    labels = np.stack([parse_caption(lb.caption).as_array() for lb, _ in ho_jobs])
    right_light = (evaluator_features(ev, ho_light)[1] == labels).all(axis=1)
    right_heavy = (evaluator_features(ev, ho_heavy)[1] == labels).all(axis=1)
    from ..cascade import DeferralProfile

    # the grid: quantiles of the held-out light confidences (a discriminator sure that every generated image is
    # fake puts them all near 0: a fixed grid in P(real) would not resolve them), with 0 (keep all) and 1
    grid = sorted({0.0, 1.0, *(float(q) for q in np.quantile(c_light, QUANTILES))})
    profile = DeferralProfile.measure(c_light, grid)
    per_t = []
    for t in grid:
        keep = c_light >= t
        served_right = np.where(keep, right_light, right_heavy)  # the cascade's answers at t
        per_t.append({"threshold": t, "deferral": float(1 - keep.mean()),
                      "light_right_kept": float(right_light[keep].mean()) if keep.any() else None,
                      "light_right_deferred": float(right_light[~keep].mean()) if (~keep).any() else None,
                      "cascade_right": float(served_right.mean())})
    # random routing at each deferral: the expected share right is the mix of the two pipelines' rates
    for row in per_t:
        d = row["deferral"]
        row["random_right"] = float((1 - d) * right_light.mean() + d * right_heavy.mean())
    path = out / "model.onnx"
    max_err = export_onnx(model, path)
    torch.save(model.state_dict(), out / "discriminator.pt")
    record = {
        "trained_by": "tessera.quality.discriminator.train_discriminator",
        "light": {"dir": str(light_dir), "steps": light_steps}, "heavy": {"dir": str(heavy_dir), "steps": heavy_steps},
        "train": {"real": len(real), "light": len(light), "heavy": len(heavy), "steps": steps, "batch": 64,
                  "seed": seed, "generate_s": round(gen_s, 1), "train_s": round(train_s, 1),
                  "final_loss_mean_last_50": float(np.mean(losses[-50:]))},
        "held_out": {"n": held_out, "auc_real_vs_light": auc(c_real, c_light), "auc_real_vs_heavy": auc(c_real, c_heavy),
                     "auc_right_vs_wrong_light": auc(c_light[right_light], c_light[~right_light])
                     if right_light.any() and (~right_light).any() else None,
                     "light_right": float(right_light.mean()), "heavy_right": float(right_heavy.mean()),
                     "confidence_mean": {"real": float(c_real.mean()), "light": float(c_light.mean()),
                                         "heavy": float(c_heavy.mean())}},
        "profile": profile.to_json(), "per_threshold": per_t, "onnx_max_abs_err": max_err,
    }
    (out / "discriminator.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
