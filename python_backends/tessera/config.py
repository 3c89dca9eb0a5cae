"""EngineConfig: the engine model's `config.pbtxt` parameters, typed in one place."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import ConfigError
from .options import (CfgParallel, ControlMode, Decode, DenoiseMode, EarlyRefusal, Executor, LastStep, LoraBatching,
                      OnHopeless, Option, Placement, PolicyName, Runtime, Switch)

OPTIONS: dict[str, type[Option]] = {c.__name__: c for c in (CfgParallel, ControlMode, Decode, DenoiseMode, EarlyRefusal,
                                                            Executor, LastStep, LoraBatching, OnHopeless, Placement,
                                                            PolicyName, Runtime, Switch)}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    policy: PolicyName = PolicyName.EDF_MH
    """Request scheduling policy (policies.POLICIES): image-fcfs, step-fcfs, slack, edf-mh (was `rounds`; it holds
    deadlines best on one denoiser worker), and over several workers tetris, fixed, rssp (docs/instances.md)."""
    max_batch: int = 16
    """Most requests advanced in one step."""
    max_in_flight: int = 256
    """Admission bound: beyond it a request is rejected at once (UNAVAILABLE)."""
    executor: Executor = Executor.BLS
    """How text encoder, VAE (and the ORT denoiser) are called: BLS to their models, or in-process ORT."""
    denoiser_runtime: Runtime = Runtime.ORT
    """ort: the exported ONNX denoiser; torch: the diffusers module saved next to it (exact patches)."""
    denoise_mode: DenoiseMode = DenoiseMode.CONCAT
    """concat: one call per latent resolution; patches: one exact call (torch); tiled: fixed-size tiles."""
    patch_size: int = 0
    """Patch edge in latent cells for denoise_mode=patches; 0 = GCD of the step's resolutions."""
    tile_size: int = 16
    """Tile edge in latent cells for denoise_mode=tiled."""
    tile_overlap: int = 4
    """Tile overlap in latent cells for denoise_mode=tiled."""
    intra_op_threads: int = 1
    """torch / ORT threads (1: two threads on 2 shared cores gave 100x outliers)."""
    slo_scale: float = 5.0
    """Deadline of a request without slo_ms: slo_scale x its profiled isolated latency."""
    on_hopeless: OnHopeless = OnHopeless.DROP
    """slack/rounds: a request that cannot meet its deadline even alone is dropped, or degraded to fewer steps."""
    min_steps: int = 4
    """Degrade never goes below this many steps (or the steps asked, if fewer)."""
    round_steps: int = 5
    """rounds: re-plan every this many engine steps."""
    deadline_margin: float = 0.1
    """slack/rounds: plan as if the predicted time still to run were this fraction longer (step-time
    jitter; 0 plans on the predictions exactly). Hopeless still means hopeless on the bare prediction."""
    early_exit: Switch = Switch.OFF
    """Entropy early exit for requests that do not say (their `early_exit` input overrides): off, on."""
    exit_epsilon: float = 0.002
    """Early exit: stop when |H_t - H_t-1| of the predicted clean latent's entropy stays below this..."""
    exit_window: int = 2
    """... for this many consecutive steps."""
    exit_min_fraction: float = 0.3
    """Early exit never ends a request before max(min_steps, this fraction of its steps)."""
    last_step: LastStep = LastStep.X0
    """How an early-stopped request ends: jump (one more step straight to t=0), x0 (decode the predicted
    clean latent), none (decode the noisy latent; ablation only)."""
    profile_sizes: str = ""
    """Start-up profile sizes, 'HxW,HxW'; empty = min, 2x and 4x the minimum size, plus one non-square."""
    early_refusal: EarlyRefusal = EarlyRefusal.ON
    """slack/rounds: refuse a newcomer at admission (UNAVAILABLE, within milliseconds) when the current plan
    sets it aside (on), or also when admitting it would push an admitted request out of the plan (strict),
    instead of when it becomes hopeless alone (off). perf/results/overload.json measures the three."""
    fault_injection: Switch = Switch.OFF
    """Testing only: requests whose prompt carries a fault marker fail at that stage (tessera.faults)."""
    lora_dir: str = ""
    """LoRA adapters served per request (`lora` input): a directory of diffusers/PEFT LoRA safetensors
    (`<name>.safetensors` or `<name>/pytorch_lora_weights.safetensors`), rescanned when it changes; empty: none.
    Needs denoise_mode=concat; denoiser_runtime=torch applies them per row, ort one merged session per adapter set
    (docs/lora.md)."""
    lora_cache_mb: int = 512
    """Loaded adapters kept in memory (LRU; adapters in use are never evicted)."""
    lora_k: int = 0
    """BAL: the step by which a request's adapters must have joined (it waits there if still loading; 0: wait
    before the first step, i.e. synchronous) unless the adapter has a profile (`<name>.profile.json`)."""
    lora_load_delay_ms: int = 0
    """Testing and benchmarks: added to every adapter load (emulates remote storage)."""
    cfg_parallel: CfgParallel = CfgParallel.OFF
    """on: a denoiser call of 2 or more rows runs as two halves at once on two threads of the engine's process
    (a lone request's CFG halves in parallel: latent parallelism); auto: only calls of at most 2 rows (one CFG
    latent alone in its call; batched steps run whole, for hosts where one batched call fills the device: with
    one intra-op thread per call it does not, and `on` wins at saturation too, perf/results/controlnet.json);
    needs executor=local, denoiser_runtime=ort."""
    lora_batching: LoraBatching = LoraBatching.MIXED
    """mixed: requests with different adapter sets, and none, share each step; one_set: a step runs one adapter
    set (the most urgent request's), the others sit it out, as in servers that hold one adapter per batch."""
    control_parallel: Switch = Switch.ON
    """ControlNets (issue 15): on: a step's ControlNet calls run beside the UNet encoder on threads of the
    engine's process and the decoder waits for them; off: encoder, ControlNets, decoder one after another."""
    control_mode: ControlMode = ControlMode.SYNC
    """sync: each step's residuals from this step's ControlNet calls (exact); async: the previous step's
    (SwiftDiffusion's asynchronous variant: the ControlNets overlap the whole UNet; measured in
    perf/results/controlnet_quality.json)."""
    controlnet_cache: int = 4
    """ControlNet service: ControlNets kept resident (LRU; ones in use are never evicted)."""
    controlnet_cache_mb: int = 1024
    """... and the bytes they may hold."""
    denoiser_workers: int = 1
    """Denoiser worker processes the engine owns (issue 16, docs/instances.md), joined by torch.distributed (gloo
    on CPU; NCCL, one GPU each, where the host has that many): a request runs on one worker or, at degree k, on k
    (sequence-parallel DiT, CFG-split UNet). > 1 needs denoiser_runtime=torch, denoise_mode=concat, no adapters."""
    placement: Placement = Placement.LEAST_WORK
    """With denoiser_workers > 1, for policies that do not choose degrees: least-work puts each request on the
    worker with the least predicted work this step (QoS-Diff); round-robin on the next worker, kept there."""
    fixed_degree: int = 1
    """policy=fixed: every request's degree (a power of two <= denoiser_workers)."""
    rssp: str = ""
    """policy=rssp: the degree per resolution, 'HxW:k,HxW:k' (other sizes at 1)."""
    decode: Decode = Decode.LOOP
    """Where finished requests are decoded (decode.py): loop (on the step loop, between steps) or pipelined (on
    a thread of their own, concurrently with the next denoising steps; QoS-Diff)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.type in OPTIONS:  # options are enum members from here on
                object.__setattr__(self, f.name, OPTIONS[f.type].parse(f.name, getattr(self, f.name)))
        if self.denoise_mode is DenoiseMode.PATCHES and self.denoiser_runtime is not Runtime.TORCH:
            raise ConfigError(
                "denoise_mode: 'patches' needs patch-aware ops; allowed with denoiser_runtime=torch, "
                f"got denoiser_runtime={self.denoiser_runtime.value!r} (use denoise_mode=tiled for fixed-shape runtimes)"
            )
        if not 0 <= self.tile_overlap < self.tile_size:
            raise ConfigError(f"tile_overlap: allowed [0, tile_size={self.tile_size}), got {self.tile_overlap}")
        self.exit_rule()  # validates exit_*
        if not 0 <= self.deadline_margin <= 1:
            raise ConfigError(f"deadline_margin: allowed [0, 1], got {self.deadline_margin}")
        if not self.slo_scale > 0:
            raise ConfigError(f"slo_scale: allowed > 0, got {self.slo_scale}")
        if self.lora_dir and self.denoise_mode is not DenoiseMode.CONCAT:
            raise ConfigError("lora_dir: adapters are applied one resolution per call (torch: per row, ort: a merged "
                              "session per adapter set); allowed with denoise_mode=concat and denoiser_runtime=torch "
                              f"or ort, got denoiser_runtime={self.denoiser_runtime.value!r}, "
                              f"denoise_mode={self.denoise_mode.value!r}")
        if self.cfg_parallel and (self.executor is not Executor.LOCAL or self.denoiser_runtime is not Runtime.ORT):
            raise ConfigError("cfg_parallel: 'on' and 'auto' split in-process ONNX Runtime calls; allowed with executor=local "
                              f"and denoiser_runtime=ort, got executor={self.executor.value!r}, "
                              f"denoiser_runtime={self.denoiser_runtime.value!r}")
        if self.lora_cache_mb < 0 or self.lora_k < 0 or self.lora_load_delay_ms < 0:
            raise ConfigError("lora_cache_mb, lora_k, lora_load_delay_ms: allowed >= 0, got "
                              f"{self.lora_cache_mb}, {self.lora_k}, {self.lora_load_delay_ms}")
        if self.controlnet_cache_mb < 0:
            raise ConfigError(f"controlnet_cache_mb: allowed >= 0, got {self.controlnet_cache_mb}")
        if self.denoiser_workers > 1 and (self.denoiser_runtime is not Runtime.TORCH or self.denoise_mode is not DenoiseMode.CONCAT
                                          or self.lora_dir):
            raise ConfigError("denoiser_workers: > 1 runs the diffusers denoiser in worker processes; allowed with "
                              "denoiser_runtime=torch, denoise_mode=concat and no lora_dir, got denoiser_runtime="
                              f"{self.denoiser_runtime.value!r}, denoise_mode={self.denoise_mode.value!r}, "
                              f"lora_dir={self.lora_dir!r}")
        self.degrees_per_size()  # validates rssp
        for name in ("max_batch", "max_in_flight", "controlnet_cache", "intra_op_threads", "tile_size", "min_steps", "round_steps",
                     "denoiser_workers", "fixed_degree"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: allowed >= 1, got {getattr(self, name)}")

    def exit_rule(self):
        from .early_exit import ExitRule

        return ExitRule(self.exit_epsilon, self.exit_window, self.exit_min_fraction, self.min_steps, self.last_step)

    def degrees_per_size(self) -> tuple[tuple[tuple[int, int], int], ...]:
        from .degrees import parse_rssp

        return parse_rssp(self.rssp)

    def sizes(self) -> list[tuple[int, int]]:
        out = []
        for item in filter(None, self.profile_sizes.split(",")):
            try:
                h, w = (int(v) for v in item.lower().split("x"))
            except ValueError as e:
                raise ConfigError(f"profile_sizes: allowed 'HxW,HxW', got {self.profile_sizes!r}") from e
            out.append((h, w))
        return out

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> EngineConfig:
        known = {f.name: f for f in fields(cls)}
        kw = {}
        for key, raw in params.items():
            if key not in known:
                raise ConfigError(f"{key}: unknown engine parameter; allowed {', '.join(known)}")
            kind = known[key].type
            if kind in ("int", "float"):
                try:
                    kw[key] = int(raw) if kind == "int" else float(raw)
                except ValueError as e:
                    raise ConfigError(f"{key}: not a number; allowed a {kind}, got {raw!r}") from e
            else:
                kw[key] = raw
        return cls(**kw)
