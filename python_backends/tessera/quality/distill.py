"""A few-step student distilled from the heavy reference (issue 17: the cascade's light model). The student is
the heavy pipeline with its UNet fine-tuned so that its DDIM sampler at `steps` steps (classifier-free guidance
as served) lands where the teacher's lands at 50 steps from the same initial noise: direct distillation of the
sampler's output in latent space (Luhman & Luhman, 2021), backpropagated through the student's few steps.
It is a diffusers pipeline like any other (served, exported and batched as such); `train_student` writes it and
its training record, measured here: the evaluator's verdicts on held-out seeds (the prompts cycle the shapes
world's 48 captions) for the student at `steps` as saved (fp16-rounded), the teacher at `steps` (the same weights
undistilled) and the teacher at 50, and each one's FD in evaluator features against real rendered images.

With `adversarial` > 0 the student is also trained against a critic, as SD-Turbo's adversarial diffusion
distillation (Sauer et al., 2023) trains its one-step student: the decoded images of the student's sampler are
scored by a small CNN (the discriminator's network) that learns, beside it, to tell them from real rendered
images (hinge loss); the student's loss adds `adversarial` x the critic's hinge generator loss to the latent
regression. Regression alone lands on the teacher's mean where the student is unsure (blurred shapes, no
texture: far from real images in evaluator features); the critic pushes each image back onto real-looking
ones. Unlike ADD's critic, this one does not see the prompt: it judges realism, not adherence."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SIZE = 64  # students are trained at 64 x 64 px (8 x 8 latents), the cascade's size


def sample(unet, sampler, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, steps: int,
           guidance: float) -> torch.Tensor:
    """Latents after DDIM at `steps` with classifier-free guidance from `noise`, as the diffusers pipeline runs
    it (unconditional half first); differentiable through `unet`."""
    sampler.set_timesteps(steps)
    x = noise * sampler.init_noise_sigma
    emb = torch.cat([uncond, cond])
    for t in sampler.timesteps:
        out = unet(torch.cat([x, x]), t, encoder_hidden_states=emb).sample
        u, c = out.chunk(2)
        x = sampler.step(u + guidance * (c - u), t, x).prev_sample
    return x


def _embed(pipe, captions: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _images(pipe, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        x = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return ((x.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()


def _decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1], [N, 3, H, W]: the VAE's decode, differentiable (the critic's input)."""
    return pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)


class Critic:
    """ADD's adversarial term: a Discriminator trained beside the student on real rendered images against the
    student's decoded images (hinge loss); `generator_loss` is what the student adds, scaled."""

    def __init__(self, seed: int, pool: int = 4096, lr: float = 2e-4):
        from .discriminator import Discriminator, real_images

        self.net = Discriminator()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, betas=(0.0, 0.99), weight_decay=0.0)
        self.real = torch.from_numpy(real_images(pool, 600_000 + seed)).float().permute(0, 3, 1, 2) / 127.5 - 1.0

    def generator_loss(self, images: torch.Tensor) -> torch.Tensor:
        return -self.net.logit_pixels(images).mean()

    def update(self, images: torch.Tensor, rng: np.random.Generator) -> float:
        real = self.real[torch.from_numpy(rng.integers(0, len(self.real), size=len(images)))]
        loss = (F.relu(1 - self.net.logit_pixels(real)).mean()
                + F.relu(1 + self.net.logit_pixels(images.detach())).mean())
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()


def sample_all(unet, sampler, noise: torch.Tensor, cond: torch.Tensor, uncond1: torch.Tensor, steps: int,
               guidance: float, chunk: int = 64) -> torch.Tensor:
    """`sample` over many requests, in chunks, without gradients; `uncond1`: the empty prompt's embedding [1, ...]."""
    with torch.no_grad():
        return torch.cat([sample(unet, sampler, noise[i : i + chunk], cond[i : i + chunk],
                                 uncond1.expand(len(noise[i : i + chunk]), -1, -1), steps, guidance)
                          for i in range(0, len(noise), chunk)])


def train_student(out_dir: str | Path, teacher_dir: str | Path, evaluator_path: str | Path, steps: int = 2,
                  teacher_steps: int = 50, guidance: float = 4.0, pairs: int = 1536, held_out: int = 288,
                  train_steps: int = 1500, batch: int = 32, lr: float = 1e-4, minutes: float = 30.0,
                  seed: int = 0, init_dir: str | Path | None = None, adversarial: float = 0.0,
                  curve_every: int = 0) -> dict:
    """Generate teacher pairs (noise, 50-step latents), fine-tune a copy of the teacher's UNet on them (or of
    `init_dir`'s UNet: a smaller network, e.g. the light reference's, behind the teacher's text encoder and VAE; with
    `adversarial` > 0 against a critic as well, see the module), save the student pipeline to `out_dir` (fp16 files
    loaded as fp32, as the references) with training.json; `curve_every` > 0 records the held-out verdicts and FD every
    so many steps as well (the training curve)."""
    from tessera_export.tiny import load_pipeline

    from ..errors import ConfigError
    from .discriminator import jobs_for, real_images
    from .train import save_fp16
    from .features import evaluator_features, load_evaluator
    from .metrics import frechet_distance
    from .shapes import parse_caption

    for name, value in (("steps", steps), ("teacher_steps", teacher_steps), ("pairs", pairs), ("held_out", held_out),
                        ("train_steps", train_steps), ("batch", batch)):
        if value < 1:
            raise ConfigError(f"{name}: allowed >= 1, got {value}")
    if not adversarial >= 0:
        raise ConfigError(f"adversarial: allowed >= 0 (the critic's weight; 0: regression only), got {adversarial}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    t0 = time.monotonic()
    pipe = load_pipeline(teacher_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval().requires_grad_(False)
    pipe.vae.requires_grad_(False)
    shape = (4, SIZE // 8, SIZE // 8)
    uncond1 = _embed(pipe, [""])

    def draw(n: int, seed0: int):
        jobs = jobs_for(n, seed0)
        noise = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for _, s in jobs])
        return jobs, noise, _embed(pipe, [lb.caption for lb, _ in jobs])

    jobs, noise, cond = draw(pairs, 400_000 + seed * 10_000)
    target = sample_all(pipe.unet, pipe.scheduler, noise, cond, uncond1, teacher_steps, guidance)
    gen_s = time.monotonic() - t0

    student = copy.deepcopy(pipe.unet if init_dir is None else load_pipeline(init_dir).unet.float())
    student.train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sampler = copy.deepcopy(pipe.scheduler)
    ev = load_evaluator(evaluator_path)
    ho_jobs, ho_noise, ho_cond = draw(held_out, 500_000 + seed * 10_000)
    labels = np.stack([parse_caption(lb.caption).as_array() for lb, _ in ho_jobs])
    real = evaluator_features(ev, real_images(held_out, 500_000 + seed * 10_000))[0]

    def judge(z: torch.Tensor, teacher: torch.Tensor | None = None) -> dict:
        feats, verdict = evaluator_features(ev, _images(pipe, z))
        right = (verdict == labels).all(axis=1)
        return {"right": float(right.mean()), "wrong": float(1 - right.mean()),
                **({"latent_mse_to_teacher": float(F.mse_loss(z, teacher))} if teacher is not None else {}),
                "fd_vs_real": float(frechet_distance(feats, real))}

    curve = []
    critic = Critic(seed) if adversarial > 0 else None
    losses, gen_losses, critic_losses, t1, step = [], [], [], time.monotonic(), 0
    while step < train_steps and time.monotonic() - t0 < minutes * 60:
        idx = torch.from_numpy(rng.integers(0, pairs, size=batch))
        x = sample(student, sampler, noise[idx], cond[idx], uncond1.expand(batch, -1, -1), steps, guidance)
        regression = F.mse_loss(x, target[idx])
        loss = regression
        if critic is not None:
            images = _decode(pipe, x)
            gen = critic.generator_loss(images)
            loss = regression + adversarial * gen
            gen_losses.append(gen.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        if critic is not None:
            critic_losses.append(critic.update(images, rng))
        losses.append(regression.item())
        step += 1
        if step % 50 == 0:
            print(f"\r[tessera] distil step {step}/{train_steps} loss {np.mean(losses[-50:]):.4f} "
                  f"{time.monotonic() - t0:.0f}s", end="", flush=True)
        if curve_every > 0 and step % curve_every == 0:
            curve.append({"step": step, **judge(sample_all(student, sampler, ho_noise, ho_cond, uncond1, steps, guidance))})
            print(f"\n[tessera] held out at step {step}: {curve[-1]}", flush=True)
    print()
    train_s = time.monotonic() - t1
    if not losses:
        raise ConfigError(f"minutes: {minutes} left no time to train after generating the teacher's pairs ({gen_s:.0f} s)")
    student.eval().requires_grad_(False)
    student.half().float()  # measured as saved: fp16 weights, loaded as fp32

    # held out: other seeds (the same 48 captions); the evaluator's verdicts (every attribute right) and latent
    # error to the teacher
    lat = {"student": sample_all(student, sampler, ho_noise, ho_cond, uncond1, steps, guidance),
           "teacher_few": sample_all(pipe.unet, sampler, ho_noise, ho_cond, uncond1, steps, guidance),
           "teacher": sample_all(pipe.unet, sampler, ho_noise, ho_cond, uncond1, teacher_steps, guidance)}
    verdicts = {name: judge(z, lat["teacher"]) for name, z in lat.items()}

    teacher_params = sum(p.numel() for p in pipe.unet.parameters())
    pipe.unet = student
    out.mkdir(parents=True, exist_ok=True)
    save_fp16(pipe, out)
    record = {
        "trained_by": "tessera.quality.distill.train_student",
        "teacher": {"dir": str(teacher_dir), "steps": teacher_steps}, "student_steps": steps, "guidance": guidance,
        "init": str(init_dir) if init_dir is not None else "teacher",
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": teacher_params,
        "size": SIZE, "pairs": pairs, "batch": batch, "lr": lr, "train_steps": step, "seed": seed,
        "generate_s": round(gen_s, 1), "train_s": round(train_s, 1),
        "loss_first_50": float(np.mean(losses[:50])), "loss_last_50": float(np.mean(losses[-50:])),
        "adversarial": adversarial,
        **({"critic": {"generator_loss_last_50": float(np.mean(gen_losses[-50:])),
                       "critic_loss_last_50": float(np.mean(critic_losses[-50:])), "real_pool": len(critic.real)}}
           if critic is not None else {}),
        "held_out": {"n": held_out, **verdicts}, "curve": curve,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record
