"""`tessera train-lora`: the reference LoRA adapters of issue 14, one per style of the shapes world.

Each adapter is trained on the heavy reference pipeline (`quality_models/heavy`, frozen) the way diffusers'
LoRA training scripts do it: `unet.add_adapter(LoraConfig(r, lora_alpha, init_lora_weights="gaussian",
target_modules=...))` on the UNet's attention projections, transformer feed-forward and projections, and
its ResNet convolutions (`TARGETS`); only the LoRA weights train. The objective is the reference's own
(`train.training_draws` + `train.v_loss`: v-prediction MSE, cosine schedule, uniform weighting, the same
classifier-free-guidance caption dropout), on images rendered in the style (`shapes.render(style=...)`)
and captioned with the normal captions: the style comes from the adapter, never from the prompt.

Fixed seeds, wall-clock bounded (`minutes`, shared evenly by the styles), resumable from `work_dir` (a
checkpoint per style every `CKPT_EVERY` steps). Each adapter is written with
`StableDiffusionPipeline.save_lora_weights` (diffusers format, PEFT config in the header):
`OUT/<style>/pytorch_lora_weights.safetensors`, what `pipe.load_lora_weights(OUT/<style>)` and
`tessera.executors.lora_torch.load_lora` read. `OUT/training.json` (written here) records per style the
steps, wall time, final loss, file bytes and, when `eval_images` > 0, style adherence of generated images
(style evaluator) plus colour/shape/position adherence (main evaluator), next to the base model's.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import models as M
from .shapes import RESOLUTIONS, STYLES, all_labels
from .train import _bar, latent_dataset, training_draws, v_loss

# diffusers' SD LoRA scripts target to_q/to_k/to_v/to_out.0; the DreamBooth/advanced ones add the
# transformer's feed-forward and projections, and conv LoRA (LyCORIS "LoCon") the ResNet convolutions. A
# style changes texture and background everywhere, so convolutions matter here.
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
           "conv1", "conv2", "conv_shortcut")
LORA_STYLES = tuple(s for s in STYLES if s != "plain")
CKPT_EVERY = 50
WEIGHT_NAME = "pytorch_lora_weights.safetensors"


@dataclass
class LoraSettings:
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    lr: float = 1e-3
    warmup: int = 50
    batch: int = 32  # at 64x64; other resolutions get half
    steps: int = 1500  # per style
    per_res: int = 500  # rendered images per resolution (x4 at 64x64), encoded once per style
    resolutions: tuple[tuple[int, int], ...] = RESOLUTIONS
    targets: tuple[str, ...] = TARGETS

    def config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha or self.rank, init_lora_weights="gaussian",
                          target_modules=list(self.targets))


def load_reference(heavy_dir: str | Path):
    """The frozen heavy reference pipeline (fp32, CPU)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(heavy_dir, safety_checker=None, requires_safety_checker=False)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe




@torch.no_grad()
def caption_embeddings(pipe) -> dict[str, torch.Tensor]:
    """Frozen text-encoder output for every caption and the empty one (CFG dropout)."""
    caps = [lb.caption for lb in all_labels()] + [""]
    ids = pipe.tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    emb = pipe.text_encoder(ids)[0]
    return {c: emb[i] for i, c in enumerate(caps)}


def _lora_state(unet) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def train_style(pipe, style: str, data: dict, embs: dict, work: Path, settings: LoraSettings, minutes: float,
                seed: int = 0):
    """Train (or resume) one style's adapter on a copy of the reference UNet; returns (unet, report)."""
    from peft.utils import set_peft_model_state_dict

    index = STYLES.index(style)
    torch.manual_seed(seed + 100 + index)  # the adapter's gaussian init of A (B starts at zero)
    unet = copy.deepcopy(pipe.unet).requires_grad_(False)
    unet.add_adapter(settings.config())
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=1e-4)
    ckpt = work / f"lora-{style}.state"
    step, loss_avg, wall_before = 0, None, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        set_peft_model_state_dict(unet, state["lora"])
        opt.load_state_dict(state["opt"])
        step, loss_avg, wall_before = int(state["step"]), state.get("loss_avg"), float(state.get("wall_s", 0.0))
    start = step
    rng = np.random.default_rng([seed + 11, index, start])  # a resumed run: a fresh, still seeded, stream
    torch.manual_seed(seed + 200 + index + 1000 * start)
    sampler = M.sampler()
    keys = list(data)
    weights = np.array([4.0 if k == (64, 64) else 1.0 for k in keys])
    unet.train()
    t0 = time.monotonic()

    def save() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"step": step, "lora": _lora_state(unet), "opt": opt.state_dict(), "loss_avg": loss_avg,
                    "wall_s": wall_before + time.monotonic() - t0}, tmp)
        tmp.replace(ckpt)

    while step < settings.steps and time.monotonic() - t0 < minutes * 60:
        key = keys[rng.choice(len(keys), p=weights / weights.sum())]
        latents, captions = data[key]
        bs = settings.batch if key == (64, 64) else max(1, settings.batch // 2)
        idx = rng.integers(0, len(latents), size=bs)
        x0 = latents[idx]
        caps, t, noise = training_draws(rng, sampler, x0, [captions[i] for i in idx])
        emb = torch.stack([embs[c] for c in caps])
        loss = v_loss(unet, sampler, x0, emb, t, noise, "v")
        optimizer_step(opt, loss, params, settings.lr, settings.warmup, step)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if step % 5 == 0:
            _bar(f"lora {style}", step, settings.steps, t0, f"loss {loss_avg:.4f}")
        if step % CKPT_EVERY == 0:
            save()
    save()
    print()
    unet.eval()
    wall = wall_before + time.monotonic() - t0
    return unet, {"steps": step, "resumed_from_step": start, "wall_s": round(wall, 1),
                  "loss_avg": None if loss_avg is None else round(loss_avg, 5)}


def optimizer_step(opt, loss, params, lr: float, warmup: int, step: int) -> None:
    """One AdamW step at `step`: linear warmup of the learning rate, gradients clipped at norm 1 (train-lora
    and train-controlnet)."""
    for g in opt.param_groups:
        g["lr"] = lr * min(1.0, (step + 1) / max(warmup, 1))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def training_setup(out_dir: str | Path, work_dir: str | Path, heavy_dir: str | Path):
    """What train-lora and train-controlnet start from: one thread, the output and work directories, the
    frozen heavy reference, its caption embeddings, and OUT/training.json as far as it exists (resumed runs
    add to it). Returns (out, work, pipe, embeddings, report path, report)."""
    torch.set_num_threads(1)
    out, work = Path(out_dir), Path(work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    pipe = load_reference(heavy_dir)
    report_path = out / "training.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    return out, work, pipe, caption_embeddings(pipe), report_path, report


def save_adapter(unet, out: Path) -> Path:
    """diffusers' LoRA file (what its training scripts write): OUT/pytorch_lora_weights.safetensors."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    # PEFT keys as they are (lora_A / lora_B), as diffusers' newer scripts save them. Not
    # convert_state_dict_to_diffusers: it rewrites only the attention keys to the old `.lora.down` form, and
    # a file mixing both forms loses those layers in load_lora_weights (it converts only when the first key
    # is not lora_A).
    layers = get_peft_model_state_dict(unet)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=layers, safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return out / WEIGHT_NAME


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float, size: int = 64) -> np.ndarray:
    """uint8 [N, size, size, 3], one seeded generator per prompt (seed + i)."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
               generator=gens, output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def adherence(images: np.ndarray, prompts: list[str], style: str, evaluator, style_evaluator) -> dict:
    """Share of images in `style` (style evaluator) and with the prompt's colour/shape/position."""
    from .features import evaluator_features
    from .shapes import parse_caption
    from .style_eval import predict_styles

    res = {}
    if style_evaluator is not None:
        pred = predict_styles(style_evaluator, images)
        res["style"] = round(float((pred == STYLES.index(style)).mean()), 4)
        res["style_predicted"] = {s: int((pred == i).sum()) for i, s in enumerate(STYLES)}
    if evaluator is not None:
        labels = np.stack([parse_caption(p).as_array() for p in prompts])
        pred = evaluator_features(evaluator, images)[1]
        res |= {k: round(float((pred[:, i] == labels[:, i]).mean()), 4)
                for i, k in enumerate(("colour", "shape", "position"))}
    return res


def train_lora(out_dir: str | Path, heavy_dir: str | Path = "quality_models/heavy",
               work_dir: str | Path = ".tessera_cache/train-lora", styles: tuple[str, ...] = LORA_STYLES,
               minutes: float = 30.0, seed: int = 0, settings: LoraSettings | None = None, eval_images: int = 48,
               eval_steps: int = 20, guidance: float = 4.0, evaluators_dir: str | Path | None = "quality_models",
               command: str = "") -> dict:
    """Train (or resume) one adapter per style; write OUT/<style>/pytorch_lora_weights.safetensors and
    OUT/training.json. `minutes` is shared evenly by the styles still to train."""
    settings = settings or LoraSettings()
    for s in styles:
        if s not in LORA_STYLES:
            raise ValueError(f"styles: allowed {LORA_STYLES}, got {s!r}")
    out, work, pipe, embs, report_path, report = training_setup(out_dir, work_dir, heavy_dir)
    t_start = time.monotonic()
    cfg = settings.config()
    report |= {
        "command": command or report.get("command", ""), "base": str(heavy_dir), "seed": seed,
        "machine_threads": 1,
        "lora": {"rank": cfg.r, "alpha": cfg.lora_alpha, "init": "gaussian", "targets": list(settings.targets)},
        "training": {"objective": "v-prediction MSE, uniform weighting (train.v_loss)", "lr": settings.lr,
                     "warmup": settings.warmup, "batch_64x64": settings.batch, "steps_per_style": settings.steps,
                     "images_per_resolution": settings.per_res,
                     "resolutions": [list(r) for r in settings.resolutions]},
    }
    report.setdefault("styles", {})
    evaluator = style_evaluator = None
    prompts = [lb.caption for lb in all_labels()]
    prompts = (prompts * (eval_images // len(prompts) + 1))[:eval_images]
    if eval_images and evaluators_dir is not None:
        ev_dir = Path(evaluators_dir)
        from .features import load_evaluator
        from .style_eval import WEIGHTS_NAME, load_style_evaluator

        if (ev_dir / "evaluator.pt").exists():
            evaluator = load_evaluator(ev_dir / "evaluator.pt")
        if (ev_dir / WEIGHTS_NAME).exists():
            style_evaluator = load_style_evaluator(ev_dir / WEIGHTS_NAME)
    evaluating = eval_images > 0 and (evaluator is not None or style_evaluator is not None)
    if evaluating:
        base = generate(pipe, prompts, seed + 5000, eval_steps, guidance)
        report["eval"] = {"images": eval_images, "steps": eval_steps, "guidance": guidance, "size": 64,
                          "seeds": f"{seed + 5000}+i", "base": adherence(base, prompts, "plain", evaluator,
                                                                         style_evaluator)}
    for i, style in enumerate(styles):
        left = max(minutes - (time.monotonic() - t_start) / 60, 0.0) / (len(styles) - i)
        data = latent_dataset(pipe.vae, work, settings.per_res, seed, style, settings.resolutions)
        unet, res = train_style(pipe, style, data, embs, work, settings, left, seed)
        path = save_adapter(unet, out / style)
        res |= {"file": str(path.relative_to(out)), "bytes": path.stat().st_size,
                "lora_parameters": sum(v.numel() for v in _lora_state(unet).values())}
        if evaluating:
            pipe.load_lora_weights(out / style, adapter_name=style)
            images = generate(pipe, prompts, seed + 5000, eval_steps, guidance)
            pipe.unload_lora_weights()
            res["adherence"] = adherence(images, prompts, style, evaluator, style_evaluator)
        report["styles"][style] = res
        print(f"[tessera] train-lora {style}: {res}", flush=True)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return report
