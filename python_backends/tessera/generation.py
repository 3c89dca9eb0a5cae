"""One request's text-to-image run, step by step, reproducing the diffusers pipelines exactly.

`Txt2Img.start(params)` encodes the prompt and draws the seeded noise (a RequestRun); `step(run)` makes
one denoiser call and one sampler update; `finish(run)` decodes to uint8. The step-level engine drives
the same three calls for many requests at once. The recipes follow diffusers' StableDiffusionPipeline
(family "sd") and StableDiffusion3Pipeline without T5 (family "sd3") line for line, so a served image
equals the in-process diffusers image for the same prompt, seed, steps, guidance and size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch

from .early_exit import gaussian_entropy
from .executors.base import Components
from .request import GenerationParams
from .options import Family
from .spec import PipelineSpec
from .tokenizer import padded_ids


def make_sampler(config: dict):
    """A fresh diffusers noise scheduler ("sampler") from its saved config: one per request (they are stateful)."""
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config(config)


@dataclass(slots=True)
class RequestRun:
    """Mutable per-request state: embeddings, latent, sampler and progress."""

    params: GenerationParams
    sampler: object
    latents: torch.Tensor  # [1, C, h, w] fp32
    embeds: np.ndarray  # [n_cfg, S, D] fp32: [uncond, cond] with CFG, [cond] without
    pooled: np.ndarray | None  # [n_cfg, P] fp32 (sd3)
    timesteps: torch.Tensor  # the sampler's timesteps, in order
    step_index: int = 0  # steps done
    step_times_s: list[float] = field(default_factory=list)
    x0: torch.Tensor | None = None  # the predicted clean latent of the last step
    entropies: list[float] = field(default_factory=list)  # early_exit.gaussian_entropy(x0) after each step
    jump_last: bool = False  # the last scheduled step's update goes straight to t = 0 (latent := x0)

    @property
    def steps_left(self) -> int:
        return len(self.timesteps) - self.step_index

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)


class Txt2Img:
    def __init__(self, spec: PipelineSpec, components: Components, tokenizers: list):
        self.spec = spec
        self.components = components
        self.tokenizers = tokenizers
        # Fast tokenizers keep padding/truncation state on the shared Rust object: counting (execute
        # thread) and encoding (engine thread) must not share one instance.
        self._count_tokenizers = [copy.deepcopy(t) for t in tokenizers]
        self._sampler_proto = make_sampler(spec.sampler_config)

    # -- text ---------------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens including start/end (the same count diffusers would truncate at model_max_length)."""
        return max(len(tok(text).input_ids) for tok in self._count_tokenizers)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Prompt embeddings for `texts` as the family's diffusers pipeline computes them."""
        outs = [
            self.components.encode_text(enc, padded_ids(tok, texts))
            for enc, tok in zip(self.spec.text_encoders, self.tokenizers, strict=True)
        ]
        if self.spec.family is Family.SD:
            return outs[0]["last_hidden_state"].astype(np.float32), None
        # sd3: penultimate hidden states of both CLIPs side by side, padded to the joint width, then the
        # zero T5 tokens appended; pooled = both projections side by side.
        clip = np.concatenate([o["penultimate_hidden_state"] for o in outs], axis=-1)
        pad = self.spec.joint_attention_dim - clip.shape[-1]
        clip = np.pad(clip, ((0, 0), (0, 0), (0, pad))) if pad >= 0 else clip[..., : self.spec.joint_attention_dim]
        t5 = np.zeros((len(texts), self.spec.t5_tokens, self.spec.joint_attention_dim), np.float32)
        pooled = np.concatenate([o["pooled"] for o in outs], axis=-1).astype(np.float32)
        return np.concatenate([clip, t5], axis=1).astype(np.float32), pooled

    # -- the three calls --------------------------------------------------------------------------------
    def start(self, params: GenerationParams) -> RequestRun:
        texts = [params.negative_prompt, params.prompt] if params.do_cfg else [params.prompt]
        embeds, pooled = self.encode(texts)
        f = self.spec.vae_scale_factor
        shape = (1, self.spec.latent_channels, params.height // f, params.width // f)
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        sampler = copy.deepcopy(self._sampler_proto)
        sampler.set_timesteps(params.num_steps, device="cpu")
        if self.spec.family is Family.SD:
            latents = latents * sampler.init_noise_sigma
        return RequestRun(params, sampler, latents, embeds, pooled, sampler.timesteps)

    def denoiser_inputs(self, run: RequestRun) -> dict[str, np.ndarray]:
        """This step's denoiser batch for one request: [uncond, cond] halves with CFG."""
        t = run.timesteps[run.step_index]
        model_in = torch.cat([run.latents] * 2) if run.params.do_cfg else run.latents
        if self.spec.family is Family.SD:
            model_in = run.sampler.scale_model_input(model_in, t)
        n = model_in.shape[0]
        inputs = {
            "sample": model_in.numpy(),
            "timestep": np.full((n,), float(t), dtype=np.float32),
            "encoder_hidden_states": run.embeds,
        }
        if run.pooled is not None:
            inputs["pooled_projections"] = run.pooled
        return inputs

    def apply(self, run: RequestRun, noise_pred: np.ndarray) -> None:
        """Guidance combine and one sampler update from this request's denoiser output."""
        pred = torch.from_numpy(np.ascontiguousarray(noise_pred))
        if run.params.do_cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + run.params.guidance_scale * (cond - uncond)
        t = run.timesteps[run.step_index]
        out = run.sampler.step(pred, t, run.latents, return_dict=True)
        x0 = getattr(out, "pred_original_sample", None)
        if x0 is None:  # flow matching: x_t = (1 - s) x0 + s noise, the model predicts noise - x0
            x0 = run.latents - float(run.sampler.sigmas[run.step_index]) * pred
        run.x0 = x0
        run.entropies.append(gaussian_entropy(x0.numpy()))
        run.latents = out.prev_sample
        run.step_index += 1
        if run.jump_last and run.done:
            run.latents = x0

    def truncate(self, run: RequestRun, total: int, clean: bool = True) -> None:
        """End `run` after `total` steps (never fewer than already done). clean: "one last step" -- the
        last step's update goes straight to t = 0 (its predicted clean latent is decoded); if that step
        is already done, the latent becomes its x0 now. Not clean: the noisy latent is decoded as is."""
        total = max(total, run.step_index)
        if total >= len(run.timesteps):
            return
        run.timesteps = run.timesteps[:total]
        run.jump_last = clean
        if run.done and clean and run.x0 is not None:
            run.latents = run.x0

    def step(self, run: RequestRun) -> None:
        self.apply(run, self.components.denoise(self.denoiser_inputs(run)))

    def finish(self, run: RequestRun) -> np.ndarray:
        """Decode the final latent into a uint8 image [H, W, 3] (diffusers' postprocess to PIL)."""
        latent = run.latents / self.spec.scaling_factor + self.spec.shift_factor
        image = self.components.decode(latent.numpy().astype(np.float32))[0]
        image = np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(1, 2, 0)
        return (image * 255).round().astype(np.uint8)

    def generate(self, params: GenerationParams) -> np.ndarray:
        run = self.start(params)
        while not run.done:
            self.step(run)
        return self.finish(run)

    def preview(self, run: RequestRun) -> np.ndarray:
        """A cheap preview of the current latent: its first three channels, min-max scaled, uint8
        [h, w, 3] at latent resolution (no VAE call)."""
        lat = run.latents[0, :3].numpy()
        lo, hi = float(lat.min()), float(lat.max())
        img = (lat - lo) / (hi - lo + 1e-8)
        return (img.transpose(1, 2, 0) * 255).round().astype(np.uint8)
