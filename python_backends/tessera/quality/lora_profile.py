"""`tessera lora-profile`: each adapter's BAL step K per step count, from an offline profile (issue 14).

The same seeded prompts run twice through a diffusers StableDiffusionPipeline, with the adapter disabled and
enabled (`pipe.load_lora_weights`, then `disable_lora`/`enable_lora`), and the latents after every step are
kept (`callback_on_step_end`). Per step, the cosine similarity of the two trajectories' latents (flattened per
image, averaged over the images) says how long the base model stands in for the adapter: K (`choose_k`) is
the number of leading steps that stay at or above `threshold`, the steps a request may run without the
adapter while it loads (tessera/bal.py). The profile is written beside the adapter (`Adapter.profile_path`),
where `LoraRegistry.k_for` reads it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ConfigError
from ..lora_registry import LoraRegistry, parse_profile
from .shapes import all_labels


def choose_k(cosine: Sequence[float], threshold: float) -> int:
    """K from one step curve: `cosine[i]` is the similarity after step i (0-based) of the latents with and
    without the adapter. K is the number of leading steps whose similarity stays >= `threshold` (the adapter
    may join after them), clamped to [0, len(cosine) - 1]: the last step always runs with the adapter (as
    bal.effective_k). A first step already below the threshold gives 0 (synchronous load)."""
    if not cosine:
        raise ValueError("cosine: empty step curve; allowed one value per step (>= 1), got []")
    k = 0
    for value in cosine:
        if not value >= threshold:  # NaN counts as below
            break
        k += 1
    return max(0, min(k, len(cosine) - 1))


def profile_prompts(n: int) -> list[str]:
    """The first `n` shapes captions (`shapes.all_labels()` order), repeated from the start beyond 48."""
    if n < 1:
        raise ConfigError(f"prompts: allowed >= 1, got {n}")
    captions = [label.caption for label in all_labels()]
    return [captions[i % len(captions)] for i in range(n)]


@torch.no_grad()
def trajectory(pipe, prompts: list[str], seed: int, steps: int, guidance: float, size: int) -> torch.Tensor:
    """The latents after every step, float64 [steps, N, C, size/8, size/8]; one generator per prompt
    (seed + i), as train_lora.generate seeds them."""
    kept: list[torch.Tensor] = []

    def keep(_pipe, _i, _t, tensors):
        kept.append(tensors["latents"].detach().to(torch.float64).clone())
        return tensors

    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
         output_type="latent", callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
    return torch.stack(kept)


def step_cosine(base: torch.Tensor, adapted: torch.Tensor) -> list[float]:
    """Per step, the mean over images of the cosine similarity of the flattened latents; in [-1, 1].
    base, adapted: [steps, N, ...] of one shape."""
    if base.shape != adapted.shape:
        raise ValueError(f"latents: shapes differ; allowed equal, got {tuple(base.shape)} and "
                         f"{tuple(adapted.shape)}")
    a = base.flatten(2).to(torch.float64)
    b = adapted.flatten(2).to(torch.float64)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=2, eps=1e-30)  # [steps, N]
    return [float(v) for v in cos.mean(dim=1).clamp(-1.0, 1.0)]


def profile_adapter(pipe, path: str | Path, name: str, steps_list: Sequence[int], prompts: list[str],
                    seed: int, guidance: float, size: int, threshold: float, base: str | None = None) -> dict:
    """One adapter's profile: {"k_by_steps": {str(steps): K}, "cosine_by_steps": {str(steps): [per step]},
    "threshold", "prompts" (count), "seed", "guidance", "size", "base"} (parse_profile reads it).

    `pipe` must carry no adapter: `name` is loaded from `path` (a file, or a directory holding
    pytorch_lora_weights.safetensors) and unloaded again before returning. `base`: recorded as the base
    model (None: the pipeline's name_or_path)."""
    steps_list = sorted(set(steps_list))
    if not steps_list or steps_list[0] < 1:
        raise ConfigError(f"steps: allowed step counts >= 1, got {steps_list}")
    if not -1.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold: allowed a cosine similarity in [-1, 1], got {threshold}")
    loaded = {k: v for k, v in pipe.get_list_adapters().items() if v}
    if loaded:
        raise ValueError(f"pipe: already carries adapters; allowed a pipeline without any, got {loaded}")
    path = Path(path)
    if path.is_file():
        pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=name)
    else:
        pipe.load_lora_weights(path, adapter_name=name)
    cosine_by_steps, k_by_steps = {}, {}
    try:
        for steps in steps_list:
            pipe.disable_lora()
            without = trajectory(pipe, prompts, seed, steps, guidance, size)
            pipe.enable_lora()
            with_adapter = trajectory(pipe, prompts, seed, steps, guidance, size)
            curve = step_cosine(without, with_adapter)
            cosine_by_steps[str(steps)] = [round(v, 6) for v in curve]
            k_by_steps[str(steps)] = choose_k(curve, threshold)
    finally:
        pipe.unload_lora_weights()
    profile = {"k_by_steps": k_by_steps, "cosine_by_steps": cosine_by_steps, "threshold": threshold,
               "prompts": len(prompts), "seed": seed, "guidance": guidance, "size": size,
               "base": str(base if base is not None else pipe.name_or_path)}
    parse_profile(profile, f"adapter {name!r} profile")  # what LoraRegistry will read back
    return profile


def write_profile(path: str | Path, profile: dict) -> Path:
    """Write `profile` as JSON to `path` atomically (a temporary file beside it, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(profile, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def lora_profile(lora_dir: str | Path, base: str | Path = "quality_models/heavy",
                 names: Sequence[str] | None = None, steps_list: Sequence[int] = (50, 20),
                 threshold: float = 0.995, n_prompts: int = 8, size: int = 64, guidance: float = 4.0,
                 seed: int = 0, pipe=None) -> dict[str, dict]:
    """Profile the adapters `names` of `lora_dir` (None: every adapter there, sorted) on the pipeline `base`
    and write each profile to its `Adapter.profile_path`; returns the profiles by name. `pipe`: an already
    loaded pipeline of `base` (None: loaded here with train_lora.load_reference)."""
    registry = LoraRegistry(lora_dir)
    known = sorted(registry.names(refresh=True))
    wanted = sorted(known) if names is None else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ConfigError(f"--names: unknown adapter(s) {', '.join(unknown)}; allowed adapters of "
                          f"{lora_dir}: {', '.join(known) or '(none)'}")
    if not wanted:
        raise ConfigError(f"lora_dir: no adapters in {lora_dir}; allowed <name>.safetensors or "
                          f"<name>/pytorch_lora_weights.safetensors")
    prompts = profile_prompts(n_prompts)
    if pipe is None:
        from .train_lora import load_reference

        pipe = load_reference(base)
    pipe.set_progress_bar_config(disable=True)
    profiles = {}
    for name in wanted:
        adapter = registry.adapter(name)
        profiles[name] = profile_adapter(pipe, adapter.path, name, steps_list, prompts, seed, guidance, size,
                                         threshold, base=str(base))
        write_profile(adapter.profile_path, profiles[name])
    return profiles
