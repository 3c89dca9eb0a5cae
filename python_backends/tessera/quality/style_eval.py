"""The style evaluator (issue 14): a small CNN that tells an image's style (`shapes.STYLES`), so that style
adherence of the LoRA reference adapters is measured like colour/shape/position by the main evaluator
(`quality_models/evaluator.pt`, untouched). Weights: `quality_models/style_evaluator.pt`, with the training
metadata the training code writes beside them (`style_evaluator.json`: steps, wall time, test accuracy per
style, and, when a VAE is given, accuracy on images after the VAE round trip -- the most a UNet-only LoRA can
show, since every generated image is decoded by that VAE).

`tessera train-style-evaluator OUT_DIR [--minutes M] [--steps N] [--vae DIR] [--roundtrip P]`: fixed seeds,
wall-clock bounded, resumable from `--work` (like train-reference). With `--roundtrip P` a share P of the
training batches goes through the VAE first: this VAE cannot draw thin outlines and stripes exactly and lifts
dark backgrounds towards grey, so an evaluator that saw only clean renderings judges generated images by
details no generator with this VAE can show."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from .models import Evaluator
from .shapes import RESOLUTIONS, STYLES, batch

WEIGHTS_NAME = "style_evaluator.pt"
REPORT_NAME = "style_evaluator.json"


class StyleEvaluator(nn.Module):
    """4 conv layers (GroupNorm, SiLU) -> global mean and max pooling -> style logits. Pooling over the whole
    image: a style is a property of every object and background, wherever they are."""

    def __init__(self, n_styles: int = len(STYLES)):
        super().__init__()
        chans = (3, 24, 48, 64, 64)
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2 if i else 1, padding=1),
                       nn.GroupNorm(8, chans[i + 1]), nn.SiLU()]
        self.conv = nn.Sequential(*layers)
        self.head = nn.Linear(2 * chans[-1], n_styles)

    prepare = staticmethod(Evaluator.prepare)  # the main evaluator's input: [N, 3, 64, 64] in [-1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


def load_style_evaluator(path: str | Path) -> StyleEvaluator:
    model = StyleEvaluator()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def predict_styles(model: StyleEvaluator, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Style indices [N] for images [N, H, W, 3], uint8 or float in [0, 1]."""
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        chunk = np.ascontiguousarray(images[i : i + batch_size])
        x = torch.from_numpy(chunk).float()
        if chunk.dtype == np.uint8:
            x = x / 255.0
        out.append(model(StyleEvaluator.prepare(x)).argmax(-1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def _styled_batch(n: int, h: int, w: int, rng: np.random.Generator):
    styles = rng.integers(0, len(STYLES), size=n)
    images = np.stack([batch(1, h, w, rng, style=STYLES[s])[0][0] for s in styles])
    return images, styles


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Noise and blur, as the main evaluator's training: generated images are judged on content."""
    x = x + torch.randn_like(x) * float(rng.uniform(0, 0.15))
    if rng.random() < 0.3:
        x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return x


@torch.no_grad()
def style_accuracy(model: StyleEvaluator, rng: np.random.Generator, n_per_style_res: int = 50, vae=None) -> dict:
    """Per-style accuracy over every resolution (n_per_style_res images per style and resolution); with a VAE,
    the images are encoded and decoded first (what a generator with that VAE can show at best)."""
    model.eval()
    hits = np.zeros(len(STYLES))
    n = np.zeros(len(STYLES))
    for h, w in RESOLUTIONS:
        for s, style in enumerate(STYLES):
            images = batch(n_per_style_res, h, w, rng, style=style)[0]
            if vae is not None:
                images = vae_roundtrip(vae, images)
            hits[s] += (predict_styles(model, images) == s).sum()
            n[s] += len(images)
    return {style: round(float(hits[s] / n[s]), 4) for s, style in enumerate(STYLES)} | {
        "mean": round(float(hits.sum() / n.sum()), 4), "n": int(n.sum())}


@torch.no_grad()
def vae_roundtrip(vae, images: np.ndarray) -> np.ndarray:
    """Images [N, H, W, 3] in [0, 1] encoded and decoded by `vae` (the latent mean): what a generator decoding
    through that VAE can show at best."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2) * 2 - 1
    x = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return ((x + 1) / 2).permute(0, 2, 3, 1).numpy()


def train_style_evaluator(out_dir: str | Path, work_dir: str | Path, minutes: float = 5.0, steps: int = 1500,
                          seed: int = 0, vae_dir: str | Path | None = None, n_test: int = 50,
                          batch_size: int = 32, roundtrip: float = 0.0) -> dict:
    """Train (or resume) the style evaluator; write OUT/style_evaluator.pt and OUT/style_evaluator.json.
    `roundtrip`: the share of training batches passed through the VAE of `vae_dir` first, so that the
    evaluator also knows each style as that VAE renders it (a generated image always is)."""
    from .train import _bar, _load_state, _save_state

    if roundtrip and vae_dir is None:
        raise ConfigError(f"roundtrip: needs a VAE (--vae); allowed 0 without one, got {roundtrip}")
    if not 0 <= roundtrip <= 1:
        raise ConfigError(f"roundtrip: allowed [0, 1], got {roundtrip}")
    torch.set_num_threads(1)
    vae = None
    if vae_dir is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    out, work = Path(out_dir), Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = StyleEvaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    ckpt = work / "style_evaluator.state"
    start = step = _load_state(ckpt, model=model, opt=opt)
    rng = np.random.default_rng([seed + 20, start])  # a resumed run draws a fresh, still seeded, data stream
    t0 = time.monotonic()
    loss = torch.zeros(())
    while step < steps and time.monotonic() - t0 < minutes * 60:
        model.train()
        h, w = RESOLUTIONS[step % len(RESOLUTIONS)]
        images, styles = _styled_batch(batch_size, h, w, rng)
        if roundtrip and rng.random() < roundtrip:
            images = vae_roundtrip(vae, images)
        x = _augment(StyleEvaluator.prepare(torch.from_numpy(images)), rng)
        loss = F.cross_entropy(model(x), torch.from_numpy(styles))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            _bar("style-eval", step, steps, t0, f"loss {loss.item():.3f}")
        if step % 200 == 0:
            _save_state(ckpt, step, model=model, opt=opt)
    _save_state(ckpt, step, model=model, opt=opt)
    wall = time.monotonic() - t0
    print()
    torch.save(model.state_dict(), out / WEIGHTS_NAME)
    report_path = out / REPORT_NAME
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    earlier = report.get("wall_s", 0.0) if start > 0 else 0.0  # time of the runs this one resumed
    report |= {
        "styles": list(STYLES), "seed": seed, "batch": batch_size, "steps": step, "target_steps": steps,
        "resumed_from_step": start, "wall_s": round(earlier + wall, 1), "torch_threads": 1,
        "roundtrip_share": roundtrip,
        "test_accuracy": style_accuracy(model, np.random.default_rng(seed + 999), n_test),
    }
    if vae is not None:
        report["vae_roundtrip_accuracy"] = style_accuracy(model, np.random.default_rng(seed + 998), n_test, vae)
        report["vae"] = str(vae_dir)
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
