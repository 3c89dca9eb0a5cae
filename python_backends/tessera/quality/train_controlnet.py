"""`tessera train-controlnet`: the reference ControlNets of issue 15, one per kind of control map.

Each ControlNet is made the way diffusers' ControlNet training script makes one: `ControlNetModel.from_unet`
copies the frozen heavy reference UNet's encoder (down + mid blocks) and adds zero convolutions and a small
condition embedding; only the ControlNet trains, on the reference's own objective (v-prediction MSE,
`train.training_draws`, the same caption dropout), with the UNet taking its residuals.

Control maps (`CONTROLS`), white on black, at the image's resolution:
  silhouette  the object's filled shape (`shapes.render(with_mask=True)`)
  box         the object's bounding box, filled
diffusers' ControlNetModel always has a 3x3 conv_in: the heavy UNet's 9x9 kernel is cropped to its centre
(`from_unet`). The map must win over the caption: with probability `mismatch` a training caption's position words are
redrawn at random among the four positions (3 in 4 of them then name another position than the image's:
37.5% of captions at the default 0.5; the map is the ground truth of the image), so that a prompt and a map
that disagree on position give the map's position (the issue's adherence test).

Fixed seeds, wall-clock bounded, resumable from `work_dir`. Each ControlNet is written with diffusers'
`save_pretrained` (fp16 files, loaded as fp32 like the reference UNet): `OUT/<kind>/`, what
`ControlNetModel.from_pretrained(OUT/<kind>)` and `tessera export --controlnet <kind>=OUT/<kind>` read.
`OUT/training.json` (written here) records per kind the steps, wall time, loss, file bytes and position
adherence of generated images whose prompt names another position than the map (main evaluator).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import models as M
from .shapes import POSITIONS, RESOLUTIONS, Label, all_labels, render
from .train import _bar, _to_tensor, training_draws
from .train_lora import optimizer_step, training_setup

CONTROLS = ("silhouette", "box")
CKPT_EVERY = 50
CONDITIONING_CHANNELS = (16, 32, 48, 64)  # the condition embedding: 3 stride-2 convs = the VAE's 8x


def control_map(kind: str, mask: np.ndarray) -> np.ndarray:
    """uint8 [H, W] white-on-black map of `kind` from an object's silhouette (bool [H, W])."""
    if kind == "silhouette":
        return mask.astype(np.uint8) * 255
    if kind == "box":
        out = np.zeros(mask.shape, np.uint8)
        ys, xs = np.nonzero(mask)
        if len(ys):
            out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 255
        return out
    raise ValueError(f"control: allowed {CONTROLS}, got {kind!r}")


def scene(label: Label, height: int, width: int, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """One rendered image (float [H, W, 3] in [0, 1]) and its `kind` control map (uint8 [H, W])."""
    image, mask = render(label, height, width, rng, with_mask=True)
    return image, control_map(kind, mask)


def with_position(caption: str, position: int) -> str:
    """`caption` with its position words replaced ("... at top left" -> "... at <position>")."""
    return caption.rsplit(" at ", 1)[0] + f" at {POSITIONS[position]}"


def condition(maps: np.ndarray) -> torch.Tensor:
    """uint8 maps [N, H, W] (or [N, H, W, 3]) -> the ControlNet's condition [N, 3, H, W] in [0, 1], as
    diffusers' control image processor prepares an image (no normalisation to [-1, 1])."""
    x = torch.from_numpy(np.ascontiguousarray(maps)).float() / 255.0
    x = x[..., None].expand(*x.shape, 3) if x.ndim == 3 else x
    return x.permute(0, 3, 1, 2).contiguous()


@dataclass
class ControlSettings:
    lr: float = 5e-4
    warmup: int = 50
    batch: int = 32  # at 64x64; other resolutions get half
    steps: int = 1500  # per kind
    per_res: int = 400  # rendered scenes per resolution (x4 at 64x64), encoded once
    mismatch: float = 0.5  # chance a caption's position words are redrawn at random (3 in 4: another one)
    resolutions: tuple[tuple[int, int], ...] = RESOLUTIONS


@torch.no_grad()
def control_dataset(vae, work: Path, per_res: int, seed: int, resolutions) -> dict:
    """{(h, w): (latents [N,4,h/8,w/8], captions, masks bool [N,h,w])}, cached in `work`: one set of scenes
    shared by every kind (each kind's map derives from the mask)."""
    path = work / f"control-{per_res}-{'x'.join(f'{h}-{w}' for h, w in resolutions)}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    rng = np.random.default_rng(seed + 23)
    pool = all_labels()
    data = {}
    for h, w in resolutions:
        n = per_res * (4 if (h, w) == (64, 64) else 1)
        zs, caps, masks = [], [], []
        for i in range(0, n, 128):
            labels = [pool[j] for j in rng.integers(0, len(pool), size=min(128, n - i))]
            drawn = [render(lb, h, w, rng, with_mask=True) for lb in labels]
            images = np.stack([d[0] for d in drawn])
            zs.append(vae.encode(_to_tensor(images)).latent_dist.mean * vae.config.scaling_factor)
            caps += [lb.caption for lb in labels]
            masks.append(np.stack([d[1] for d in drawn]))
        data[(h, w)] = (torch.cat(zs), caps, np.concatenate(masks))
        print(f"[tessera] train-controlnet dataset: {n} scenes at {w}x{h}", flush=True)
    torch.save(data, path)
    return data


def control_loss(unet, controlnet, sampler, x0, emb, t, noise, cond) -> torch.Tensor:
    """v-prediction MSE of the UNet taking the ControlNet's residuals (uniform weighting, as train.v_loss)."""
    xt = sampler.add_noise(x0, noise, t)
    target = sampler.get_velocity(x0, noise, t)
    down, mid = controlnet(xt, t, encoder_hidden_states=emb, controlnet_cond=cond, return_dict=False)
    pred = unet(xt, t, encoder_hidden_states=emb, down_block_additional_residuals=down,
                mid_block_additional_residual=mid).sample
    return (pred - target).pow(2).mean()


def from_unet(unet):
    """`ControlNetModel.from_unet`, for a UNet whose conv_in is wider than 3x3 (the heavy reference's is 9x9;
    diffusers' ControlNetModel always builds a 3x3 one): every other weight copied, conv_in's kernel cropped
    to its centre 3x3 (the ControlNet trains from there)."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS,
                                    load_weights_from_unet=False)
    weight = unet.conv_in.weight.detach()
    k = weight.shape[-1]
    with torch.no_grad():
        net.conv_in.weight.copy_(weight[..., k // 2 - 1 : k // 2 + 2, k // 2 - 1 : k // 2 + 2])
        net.conv_in.bias.copy_(unet.conv_in.bias.detach())
    for name in ("time_proj", "time_embedding", "down_blocks", "mid_block"):
        getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
    return net


def train_kind(pipe, kind: str, data: dict, embs: dict, work: Path, settings: ControlSettings, minutes: float,
               seed: int = 0):
    """Train (or resume) one ControlNet; returns (controlnet, report)."""
    index = CONTROLS.index(kind)
    torch.manual_seed(seed + 300 + index)
    controlnet = from_unet(pipe.unet)
    controlnet.train()
    params = list(controlnet.parameters())
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)
    ckpt = work / f"controlnet-{kind}.state"
    step, loss_avg, wall_before = 0, None, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        controlnet.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, loss_avg, wall_before = int(state["step"]), state.get("loss_avg"), float(state.get("wall_s", 0.0))
    start = step
    rng = np.random.default_rng([seed + 31, index, start])
    torch.manual_seed(seed + 400 + index + 1000 * start)
    sampler = M.sampler()
    keys = list(data)
    weights = np.array([4.0 if k == (64, 64) else 1.0 for k in keys])
    t0 = time.monotonic()

    def save() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"step": step, "model": controlnet.state_dict(), "opt": opt.state_dict(), "loss_avg": loss_avg,
                    "wall_s": wall_before + time.monotonic() - t0}, tmp)
        tmp.replace(ckpt)

    while step < settings.steps and time.monotonic() - t0 < minutes * 60:
        key = keys[rng.choice(len(keys), p=weights / weights.sum())]
        latents, captions, masks = data[key]
        bs = settings.batch if key == (64, 64) else max(1, settings.batch // 2)
        idx = rng.integers(0, len(latents), size=bs)
        caps = [with_position(captions[i], int(rng.integers(len(POSITIONS)))) if rng.random() < settings.mismatch
                else captions[i] for i in idx]
        x0 = latents[idx]
        caps, t, noise = training_draws(rng, sampler, x0, caps)
        emb = torch.stack([embs[c] for c in caps])
        cond = condition(np.stack([control_map(kind, masks[i]) for i in idx]))
        loss = control_loss(pipe.unet, controlnet, sampler, x0, emb, t, noise, cond)
        optimizer_step(opt, loss, params, settings.lr, settings.warmup, step)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 5 == 0:
            _bar(f"cn {kind}", step, settings.steps, t0, f"loss {loss_avg:.4f}")
        if step % CKPT_EVERY == 0:
            save()
    save()
    print()
    controlnet.eval().requires_grad_(False)
    wall = wall_before + time.monotonic() - t0
    return controlnet, {"steps": step, "resumed_from_step": start, "wall_s": round(wall, 1),
                        "loss_avg": None if loss_avg is None else round(loss_avg, 5)}


def mismatched_set(n: int, size: tuple[int, int], kind: str, seed: int):
    """n (prompt, map, label of the map) triples whose prompt names another position than the map: the
    adherence test set (labels cycle through all 48; the map's position is the prompt's shifted by 1..3)."""
    rng = np.random.default_rng(seed)
    pool = all_labels()
    prompts, maps, truths = [], [], []
    for i in range(n):
        lb = pool[i % len(pool)]
        shifted = Label(lb.colour, lb.shape, (lb.position + 1 + i // len(pool) % 3) % len(POSITIONS))
        _, cmap = scene(shifted, size[0], size[1], rng, kind)
        prompts.append(lb.caption)
        maps.append(cmap)
        truths.append(shifted)
    return prompts, np.stack(maps), truths


@torch.no_grad()
def generate_controlled(pipe, controlnets: list, prompts: list[str], maps: list[np.ndarray], seed: int, steps: int,
                        guidance: float, scales: list[float] | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] from diffusers' StableDiffusionControlNetPipeline over `pipe`'s components, one
    seeded generator per prompt (seed + i); `maps`: one uint8 [N, H, W] array per ControlNet."""
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    net = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(controlnets)
    cpipe = StableDiffusionControlNetPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, controlnet=net,
        scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cpipe.set_progress_bar_config(disable=True)
    out = []
    for i, prompt in enumerate(prompts):
        images = [condition(m[i : i + 1]) for m in maps]
        res = cpipe(prompt, image=images[0] if len(images) == 1 else images, num_inference_steps=steps,
                    guidance_scale=guidance, generator=torch.Generator().manual_seed(seed + i), output_type="np",
                    height=maps[0].shape[1], width=maps[0].shape[2],
                    controlnet_conditioning_scale=(scales or [1.0] * len(images))[0] if len(images) == 1
                    else (scales or [1.0] * len(images))).images
        out.append((np.clip(res[0], 0, 1) * 255).round().astype(np.uint8))
    return np.stack(out)


def position_adherence(evaluator, images: np.ndarray, truths: list[Label], prompts: list[str]) -> dict:
    """Share of images whose evaluated position is the map's, and the prompt's (the disagreeing one)."""
    from .features import evaluator_features
    from .shapes import parse_caption

    pred = evaluator_features(evaluator, images)[1]
    want = np.array([t.position for t in truths])
    said = np.array([parse_caption(p).position for p in prompts])
    colour_shape = np.array([[t.colour, t.shape] for t in truths])
    return {"position_of_map": round(float((pred[:, 2] == want).mean()), 4),
            "position_of_prompt": round(float((pred[:, 2] == said).mean()), 4),
            "colour": round(float((pred[:, 0] == colour_shape[:, 0]).mean()), 4),
            "shape": round(float((pred[:, 1] == colour_shape[:, 1]).mean()), 4)}


def train_controlnet(out_dir: str | Path, heavy_dir: str | Path = "quality_models/heavy",
                     work_dir: str | Path = ".tessera_cache/train-controlnet", kinds: tuple[str, ...] = CONTROLS,
                     minutes: float = 30.0, seed: int = 0, settings: ControlSettings | None = None,
                     eval_images: int = 48, eval_steps: int = 20, guidance: float = 4.0,
                     evaluator_path: str | Path | None = "quality_models/evaluator.pt", command: str = "") -> dict:
    """Train (or resume) one ControlNet per kind; write OUT/<kind>/ and OUT/training.json. `minutes` is
    shared evenly by the kinds still to train."""
    settings = settings or ControlSettings()
    for k in kinds:
        if k not in CONTROLS:
            raise ValueError(f"kinds: allowed {CONTROLS}, got {k!r}")
    out, work, pipe, embs, report_path, report = training_setup(out_dir, work_dir, heavy_dir)
    t_start = time.monotonic()
    data = control_dataset(pipe.vae, work, settings.per_res, seed, settings.resolutions)
    report |= {
        "command": command or report.get("command", ""), "base": str(heavy_dir), "seed": seed, "machine_threads": 1,
        "controlnet": {"from": "ControlNetModel.from_unet(heavy unet)",
                       "conditioning_embedding_out_channels": list(CONDITIONING_CHANNELS)},
        "training": {"objective": "v-prediction MSE through the frozen UNet taking the residuals", "lr": settings.lr,
                     "warmup": settings.warmup, "batch_64x64": settings.batch, "steps_per_kind": settings.steps,
                     "scenes_per_resolution": settings.per_res, "caption_position_mismatch": settings.mismatch,
                     "resolutions": [list(r) for r in settings.resolutions]},
    }
    report.setdefault("kinds", {})
    evaluator = None
    if eval_images and evaluator_path is not None and Path(evaluator_path).exists():
        from .features import load_evaluator

        evaluator = load_evaluator(evaluator_path)
    for i, kind in enumerate(kinds):
        left = max(minutes - (time.monotonic() - t_start) / 60, 0.0) / (len(kinds) - i)
        net, res = train_kind(pipe, kind, data, embs, work, settings, left, seed)
        net.to(torch.float16).save_pretrained(out / kind, safe_serialization=True)
        net.to(torch.float32)
        res |= {"bytes": sum(f.stat().st_size for f in (out / kind).iterdir()),
                "parameters": sum(p.numel() for p in net.parameters())}
        if evaluator is not None:
            prompts, maps, truths = mismatched_set(eval_images, (64, 64), kind, seed + 7000)
            images = generate_controlled(pipe, [net], prompts, [maps], seed + 5000, eval_steps, guidance)
            res["adherence_mismatched"] = position_adherence(evaluator, images, truths, prompts)
            res["eval"] = {"images": eval_images, "steps": eval_steps, "guidance": guidance, "size": 64}
        report["kinds"][kind] = res
        print(f"[tessera] train-controlnet {kind}: {res}", flush=True)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
