"""EngineConfig: the engine model's `config.pbtxt` parameters, typed in one place."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import ConfigError

EXECUTORS = ("bls", "local")
RUNTIMES = ("ort", "torch")
MODES = ("concat", "patches", "tiled")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    policy: str = "step-fcfs"
    """Request scheduling policy (scheduler.POLICIES)."""
    max_batch: int = 16
    """Most requests advanced in one step."""
    max_in_flight: int = 256
    """Admission bound: beyond it a request is rejected at once (UNAVAILABLE)."""
    executor: str = "bls"
    """How text encoder, VAE (and the ORT denoiser) are called: BLS to their models, or in-process ORT."""
    denoiser_runtime: str = "ort"
    """ort: the exported ONNX denoiser; torch: the diffusers module saved next to it (exact patches)."""
    denoise_mode: str = "concat"
    """concat: one call per latent resolution; patches: one exact call (torch); tiled: fixed-size tiles."""
    patch_size: int = 0
    """Patch edge in latent cells for denoise_mode=patches; 0 = GCD of the step's resolutions."""
    tile_size: int = 16
    """Tile edge in latent cells for denoise_mode=tiled."""
    tile_overlap: int = 4
    """Tile overlap in latent cells for denoise_mode=tiled."""
    intra_op_threads: int = 1
    """torch / ORT threads (1: two threads on 2 shared cores gave 100x outliers)."""

    def __post_init__(self) -> None:
        for name, allowed in (("executor", EXECUTORS), ("denoiser_runtime", RUNTIMES), ("denoise_mode", MODES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: unknown value; allowed {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.denoise_mode == "patches" and self.denoiser_runtime != "torch":
            raise ConfigError(
                "denoise_mode: 'patches' needs patch-aware ops; allowed with denoiser_runtime=torch, "
                f"got denoiser_runtime={self.denoiser_runtime!r} (use denoise_mode=tiled for fixed-shape runtimes)"
            )
        if not 0 <= self.tile_overlap < self.tile_size:
            raise ConfigError(f"tile_overlap: allowed [0, tile_size={self.tile_size}), got {self.tile_overlap}")
        for name in ("max_batch", "max_in_flight", "intra_op_threads", "tile_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: allowed >= 1, got {getattr(self, name)}")

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> EngineConfig:
        known = {f.name: f for f in fields(cls)}
        kw = {}
        for key, raw in params.items():
            if key not in known:
                raise ConfigError(f"{key}: unknown engine parameter; allowed {', '.join(known)}")
            if known[key].type == "int":
                try:
                    kw[key] = int(raw)
                except ValueError as e:
                    raise ConfigError(f"{key}: not an integer; allowed an integer, got {raw!r}") from e
            else:
                kw[key] = raw
        return cls(**kw)
