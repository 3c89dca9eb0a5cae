"""`tessera train-reference`: train the evaluator, the VAE and the heavy/light generators from fixed seeds.

Every stage is bounded by steps and by wall-clock, checkpoints to `work_dir` and resumes from there.
The finished pipelines are saved with `save_pretrained` in fp32 (values rounded through fp16), the dtype
they are exported and served in, so that a plain `DiffusionPipeline.from_pretrained(dir)` loads every
component in one dtype and they export and serve like any other diffusers pipeline.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import models as M
from .shapes import RESOLUTIONS, all_labels, batch

CFG_DROPOUT = 0.1


@dataclass
class Budget:
    steps: int
    minutes: float


def _bar(stage: str, step: int, total: int, t0: float, extra: str) -> None:
    done = step / max(total, 1)
    width = 30
    bar = "#" * int(done * width) + "-" * (width - int(done * width))
    print(f"\r[tessera] train {stage:9s} [{bar}] {step}/{total} {time.monotonic() - t0:6.0f}s {extra}", end="", flush=True)


def _load_state(path: Path, **objs) -> int:
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    widened = False
    for name, obj in objs.items():
        if isinstance(obj, torch.optim.Optimizer):
            if not widened:
                obj.load_state_dict(state[name])
            continue
        widened |= _widen_kernels(state[name], obj)
        obj.load_state_dict(state[name])
    return int(state["step"])


def _saved_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["step"]) if path.exists() else 0


def _widen_kernels(saved: dict, module: torch.nn.Module) -> bool:
    """Resume a checkpoint into a model whose convolutions grew (3x3 -> kxk): the old kernel sits at the
    centre, zeros around it (same function at the start). The optimizer then starts afresh."""
    own = module.state_dict()
    widened = False
    for key, value in saved.items():
        want = own.get(key)
        if want is not None and value.ndim == 4 and want.shape[:2] == value.shape[:2] and want.shape[2:] != value.shape[2:]:
            grown = torch.zeros_like(want)
            dh, dw = (want.shape[2] - value.shape[2]) // 2, (want.shape[3] - value.shape[3]) // 2
            grown[:, :, dh:dh + value.shape[2], dw:dw + value.shape[3]] = value
            saved[key] = grown
            widened = True
    return widened


def _save_state(path: Path, step: int, **objs) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"step": step, **{k: v.state_dict() for k, v in objs.items()}}, tmp)
    tmp.replace(path)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() * 2 - 1  # [-1, 1]


# -- evaluator --------------------------------------------------------------------------------------------
def train_evaluator(work: Path, budget: Budget, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = M.Evaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    ckpt = work / "evaluator.state"
    step = _load_state(ckpt, model=model, opt=opt)
    t0 = time.monotonic()
    while step < budget.steps and time.monotonic() - t0 < budget.minutes * 60:
        h, w = RESOLUTIONS[step % len(RESOLUTIONS)]
        images, labels, _ = batch(32, h, w, rng)
        x = M.Evaluator.prepare(torch.from_numpy(images))
        # Augment: noise and blur, so generated (imperfect) images are judged on content.
        x = x + torch.randn_like(x) * float(rng.uniform(0, 0.15))
        if rng.random() < 0.3:
            x = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        logits = model(x)
        y = torch.from_numpy(labels)
        loss = sum(F.cross_entropy(lg, y[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 20 == 0:
            _bar("evaluator", step, budget.steps, t0, f"loss {loss.item():.3f}")
        if step % 200 == 0:
            _save_state(ckpt, step, model=model, opt=opt)
    _save_state(ckpt, step, model=model, opt=opt)
    print()
    acc = evaluator_accuracy(model, np.random.default_rng(seed + 999), n_per_res=500)
    return {"steps": step, "test_accuracy": acc, "model": model}


@torch.no_grad()
def evaluator_accuracy(model, rng, n_per_res: int = 500) -> dict:
    model.eval()
    hits = np.zeros(3)
    n = 0
    for h, w in RESOLUTIONS:
        images, labels, _ = batch(n_per_res, h, w, rng)
        pred = predict(model, images)
        hits += (pred == labels).sum(0)
        n += len(labels)
    return {k: float(v / n) for k, v in zip(("colour", "shape", "position"), hits, strict=True)} | {"n": n}


@torch.no_grad()
def predict(model, images01: np.ndarray) -> np.ndarray:
    """Evaluator predictions [N, 3] for images [N, H, W, 3] in [0, 1]."""
    model.eval()
    out = []
    for i in range(0, len(images01), 256):
        logits = model(M.Evaluator.prepare(torch.from_numpy(np.ascontiguousarray(images01[i : i + 256]))))
        out.append(torch.stack([lg.argmax(-1) for lg in logits], -1).numpy())
    return np.concatenate(out)


# -- VAE --------------------------------------------------------------------------------------------------
def train_vae(work: Path, budget: Budget, seed: int = 0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    vae = M.vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    ckpt = work / "vae.state"
    step = _load_state(ckpt, vae=vae, opt=opt)
    t0 = time.monotonic()
    while step < budget.steps and time.monotonic() - t0 < budget.minutes * 60:
        images, _, _ = batch(16, 64, 64, rng)
        x = _to_tensor(images)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        kl = post.kl().mean()
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + 1e-6 * kl
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 10 == 0:
            _bar("vae", step, budget.steps, t0, f"loss {loss.item():.4f}")
        if step % 100 == 0:
            _save_state(ckpt, step, vae=vae, opt=opt)
    _save_state(ckpt, step, vae=vae, opt=opt)
    print()
    vae.eval()
    with torch.no_grad():
        images, _, _ = batch(256, 64, 64, np.random.default_rng(seed + 2))
        z = vae.encode(_to_tensor(images)).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        recon = vae.decode(z).sample
        psnr = float(-10 * torch.log10(((recon.clamp(-1, 1) - _to_tensor(images)) / 2).pow(2).mean()))
    return vae, {"steps": step, "scaling_factor": vae.config.scaling_factor, "recon_psnr_db": psnr}


@torch.no_grad()
def latent_dataset(vae, work: Path, per_res: int, seed: int = 0, style: str = "plain",
                   resolutions=RESOLUTIONS) -> dict:
    """Rendered images at every resolution, encoded once: {(h, w): (latents [N,4,h/8,w/8], captions)}, cached
    in `work`. Every style draws the same random numbers: a styled dataset is the plain one's scenes, restyled."""
    if style == "plain" and tuple(resolutions) == tuple(RESOLUTIONS):
        path = work / f"latents-{per_res}.pt"  # the reference's cache name
    else:
        path = work / f"latents-{style}-{per_res}-{'x'.join(f'{h}-{w}' for h, w in resolutions)}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    rng = np.random.default_rng(seed + 3)
    data = {}
    for h, w in resolutions:
        n = per_res * (4 if (h, w) == (64, 64) else 1)
        zs, caps = [], []
        for i in range(0, n, 128):
            images, _, captions = batch(min(128, n - i), h, w, rng, style=style)
            zs.append(vae.encode(_to_tensor(images)).latent_dist.mean * vae.config.scaling_factor)
            caps += captions
        data[(h, w)] = (torch.cat(zs), caps)
        print(f"[tessera] train dataset ({style}): {n} latents at {w}x{h}", flush=True)
    torch.save(data, path)
    return data


# -- generators ------------------------------------------------------------------------------------------
WEIGHTINGS = ("v", "min-snr")


def loss_weight(weighting: str, snr: torch.Tensor) -> torch.Tensor:
    """Per-sample weight of the v-MSE. "v": uniform (every noise level counts). "min-snr": Min-SNR-5 for
    v-prediction, min(snr, 5) / (snr + 1), which is ~snr -> 0 at high noise: measured here to leave the
    position words unlearned (position is only decided at high noise; loss with the right and the wrong
    position word was identical to 4 digits after 4k steps), so it is no longer the default."""
    if weighting == "v":
        return torch.ones_like(snr)
    if weighting == "min-snr":
        return torch.clamp(snr, max=5.0) / (snr + 1)
    raise ValueError(f"weighting: allowed {WEIGHTINGS}, got {weighting!r}")


def training_draws(rng: np.random.Generator, sampler, x0: torch.Tensor, captions: list[str]):
    """One batch's random draws, in this order: captions with classifier-free-guidance dropout (the empty
    caption with probability CFG_DROPOUT), timesteps (numpy rng), noise (torch's global generator)."""
    caps = ["" if rng.random() < CFG_DROPOUT else c for c in captions]
    t = torch.from_numpy(rng.integers(0, sampler.config.num_train_timesteps, size=len(x0)))
    noise = torch.randn_like(x0)
    return caps, t, noise


def v_loss(unet, sampler, x0: torch.Tensor, emb: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
           weighting: str = "v") -> torch.Tensor:
    """The generators' objective: MSE of the UNet's v-prediction at x_t (x0 noised to t), weighted per sample
    by `loss_weight`. Shared by train-reference and train-lora."""
    xt = sampler.add_noise(x0, noise, t)
    target = sampler.get_velocity(x0, noise, t)
    pred = unet(xt, t, encoder_hidden_states=emb).sample
    alphas = sampler.alphas_cumprod
    snr = alphas[t] / (1 - alphas[t])
    w = loss_weight(weighting, snr).view(-1, 1, 1, 1)
    return (w * (pred - target).pow(2)).mean()


def train_generator(kind: str, vae, data: dict, work: Path, budget: Budget, seed: int = 0, weighting: str = "v",
                    conv_in_kernel: int = 3):
    torch.manual_seed(seed + 10)
    rng = np.random.default_rng(seed + 11)
    tok = M.tokenizer()
    nets = torch.nn.ModuleDict({"text": M.text_encoder(tok), "unet": M.unet(kind, conv_in_kernel)})
    ema = copy.deepcopy(nets).requires_grad_(False)
    opt = torch.optim.AdamW(nets.parameters(), lr=1e-3, weight_decay=1e-4)
    sampler = M.sampler()
    ckpt = work / f"{kind}.state"
    step = _load_state(ckpt, nets=nets, ema=ema, opt=opt)
    ids_cache: dict[str, torch.Tensor] = {}

    def ids(captions: list[str]) -> torch.Tensor:
        for c in set(captions) - set(ids_cache):
            ids_cache[c] = torch.tensor(tok(c, padding="max_length", max_length=77, truncation=True).input_ids)
        return torch.stack([ids_cache[c] for c in captions])

    keys = list(data)
    weights = np.array([4.0 if k == (64, 64) else 1.0 for k in keys])
    t0 = time.monotonic()
    while step < budget.steps and time.monotonic() - t0 < budget.minutes * 60:
        key = keys[rng.choice(len(keys), p=weights / weights.sum())]
        latents, captions = data[key]
        bs = 64 if key == (64, 64) else 32
        idx = rng.integers(0, len(latents), size=bs)
        x0 = latents[idx]
        caps, t, noise = training_draws(rng, sampler, x0, [captions[i] for i in idx])
        emb = nets["text"](ids(caps))[0]
        loss = v_loss(nets["unet"], sampler, x0, emb, t, noise, weighting)
        lr = 1e-3 * min(1.0, (step + 1) / 100)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(nets.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), nets.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        step += 1
        if step % 10 == 0:
            _bar(kind, step, budget.steps, t0, f"loss {loss.item():.4f}")
        if step % 100 == 0:
            _save_state(ckpt, step, nets=nets, ema=ema, opt=opt)
    _save_state(ckpt, step, nets=nets, ema=ema, opt=opt)
    print()
    return ema, tok, {"steps": step, "weighting": weighting}


def save_pipeline(out: Path, vae, nets, tok) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae), text_encoder=copy.deepcopy(nets["text"]), tokenizer=tok,
        unet=copy.deepcopy(nets["unet"]), scheduler=M.sampler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    return save_fp16(pipe, out)


def save_fp16(pipe, out: Path) -> Path:
    """Weights stored in fp16 (half the bytes). diffusers loads the UNet and VAE as fp32 by default, but
    transformers loads the text encoder in the dtype its config names: the config says float32, so a plain
    DiffusionPipeline.from_pretrained gives one dtype and generates."""
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    config = out / "text_encoder" / "config.json"
    text = config.read_text()
    if '"dtype": "float16"' not in text:
        raise RuntimeError(f"{config}: no \"dtype\": \"float16\" to set to float32 (transformers changed its config)")
    config.write_text(text.replace('"dtype": "float16"', '"dtype": "float32"'))
    return out


def train_reference(out_dir: str | Path, work_dir: str | Path, minutes: float = 60.0, seed: int = 0,
                    stages: tuple[str, ...] = ("evaluator", "vae", "heavy", "light")) -> dict:
    """Run the stages in order; each gets a share of `minutes`. Resumes from `work_dir`. Generators follow
    their recipe (models.RECIPES): each phase resumes the previous one, and a phase that runs out of time
    stops the recipe there (run again to go on)."""
    torch.set_num_threads(1)
    out, work = Path(out_dir), Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    share = {"evaluator": 0.06, "vae": 0.14, "heavy": 0.6, "light": 0.2}
    total = sum(share[s] for s in stages) or 1.0
    budget = {s: minutes * share[s] / total for s in share}
    report_path = out / "training.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if "evaluator" in stages:
        res = train_evaluator(work, Budget(800, budget["evaluator"]), seed)
        torch.save(res.pop("model").state_dict(), out / "evaluator.pt")
        report["evaluator"] = res
        print(f"[tessera] evaluator test accuracy: {res['test_accuracy']}")
    vae = M.vae()
    if "vae" in stages:
        vae, res = train_vae(work, Budget(2500, budget["vae"]), seed)
        vae.save_pretrained(work / "vae")
        report["vae"] = res
        print(f"[tessera] vae: {res}")
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(work / "vae")
    vae.eval().requires_grad_(False)
    for kind in ("heavy", "light"):
        if kind not in stages:
            continue
        data = latent_dataset(vae, work, per_res=2000, seed=seed)
        t0, done = time.monotonic(), _saved_step(work / f"{kind}.state")
        phases = [p for p in M.RECIPES[kind] if p[0] > done] or [M.RECIPES[kind][-1]]
        for until, kernel, weighting in phases:
            left = max(budget[kind] - (time.monotonic() - t0) / 60, 0.0)
            nets, tok, res = train_generator(kind, vae, data, work, Budget(until, left), seed, weighting, kernel)
            if res["steps"] < until:
                break
        save_pipeline(out / kind, vae, nets, tok)
        report[kind] = res
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
