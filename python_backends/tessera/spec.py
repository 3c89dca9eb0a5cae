"""PipelineSpec: what the served pipeline is, as the exporter found it. Stored as the entry model's
manifest.json and verified at load."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ConfigError
from .inputs import Limits
from .options import Family
MANIFEST_VERSION = 2


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    family: Family
    latent_channels: int
    vae_scale_factor: int  # pixels per latent cell
    scaling_factor: float  # VAE latent scaling
    shift_factor: float  # VAE latent shift (0 for sd)
    text_encoders: tuple[str, ...]  # component model names, in the pipeline's order
    tokenizers: tuple[str, ...]  # sub-directories of the entry model's version dir, one per encoder
    denoiser: str
    vae_decoder: str
    sampler_config: dict  # the diffusers noise scheduler's config (with _class_name)
    joint_attention_dim: int = 0  # sd3: width the CLIP embeddings are padded to
    t5_tokens: int = 0  # sd3 without T5: number of zero tokens appended (diffusers' max_sequence_length)
    patch_size: int = 1  # sd3 denoiser patch size
    denoiser_multiple: int = 1  # latent cells a patch edge must divide by (UNet downsampling / DiT patch)
    component_max_batch: int = 16  # the component models' max_batch_size: BLS calls are chunked to it
    torch_denoiser: str = ""  # repo-relative directory of the diffusers denoiser (torch runtime)
    denoiser_encoder: str = ""  # the UNet's down + mid blocks (models taking ControlNet residuals; issue 15)
    denoiser_decoder: str = ""  # the UNet's up blocks over the (ControlNet-summed) skips
    controlnets: tuple[str, ...] = ()  # ControlNets served (model controlnet_<name> each, shared in the repo)
    down_residuals: int = 0  # skips the encoder hands the decoder (= each ControlNet's down residuals)
    limits: Limits = field(default_factory=Limits)
    source: dict = field(default_factory=dict)  # provenance: pipeline dir, class, config hashes

    def __post_init__(self) -> None:
        object.__setattr__(self, "family", Family.parse("family", self.family))
        if len(self.text_encoders) != len(self.tokenizers):
            raise ConfigError(
                f"tokenizers: one per text encoder; got {len(self.tokenizers)} for {len(self.text_encoders)} encoders"
            )

    def to_json(self) -> str:
        data = asdict(self)
        data["manifest_version"] = MANIFEST_VERSION
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str | Path) -> PipelineSpec:
        return cls.from_json(Path(path).read_text(), str(path))

    @classmethod
    def from_json(cls, text: str, origin: str = "manifest") -> PipelineSpec:
        data = json.loads(text)
        version = data.pop("manifest_version", None)
        if version != MANIFEST_VERSION:
            raise ConfigError(
                f"manifest_version: {origin} was written by another Tessera; allowed {MANIFEST_VERSION}, got {version}"
            )
        data["limits"] = Limits.from_dict(data.get("limits", {}))
        data["text_encoders"] = tuple(data["text_encoders"])
        data["tokenizers"] = tuple(data["tokenizers"])
        data["controlnets"] = tuple(data.get("controlnets", ()))
        return cls(**data)
