"""Every operator-facing choice as an enum, parsed once when the config loads (`Option.parse` names the
setting and lists the allowed values); the code compares members, never free strings."""

from __future__ import annotations

import enum

from .errors import ConfigError


class Option(str, enum.Enum):
    @classmethod
    def parse(cls, setting: str, value: object) -> Option:
        """`value` as a member of this option; ConfigError naming `setting` and the allowed values."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(m.value for m in cls)
            raise ConfigError(f"{setting}: unknown value; allowed {allowed}, got {value!r}") from None

    def __str__(self) -> str:
        return self.value


class PolicyName(Option):
    IMAGE_FCFS = "image-fcfs"
    STEP_FCFS = "step-fcfs"
    SLACK = "slack"
    EDF_MH = "edf-mh"  # re-planned rounds: EDF packing with Moore-Hodgson admission (was "rounds")
    TETRIS = "tetris"  # TetriServe: per-request degree every round, group-knapsack packing over workers
    FIXED = "fixed"  # one fixed degree for every request, first come first served, no batching (xDiT)
    RSSP = "rssp"  # TetriServe's resolution-specific fixed degree

    @classmethod
    def _missing_(cls, value):
        return cls.EDF_MH if value == "rounds" else None  # the old name of edf-mh keeps working


class Placement(Option):
    LEAST_WORK = "least-work"  # degree-1 work on the worker with the least predicted work (QoS-Diff)
    ROUND_ROBIN = "round-robin"  # each request on the next worker in turn, kept there (a baseline)


class Decode(Option):
    LOOP = "loop"  # finished requests decoded on the step loop, between steps (the default)
    PIPELINED = "pipelined"  # decoded on their own thread, concurrently with the next steps (QoS-Diff)


class OnHopeless(Option):
    DROP = "drop"  # answered UNAVAILABLE at once
    DEGRADE = "degrade"  # fewer steps (never below min_steps), ending with one last step to t = 0


class LastStep(Option):
    X0 = "x0"  # decode the predicted clean latent of the step just taken
    JUMP = "jump"  # one more denoiser call whose update goes straight to t = 0
    NONE = "none"  # decode the noisy latent (ablation)


class Switch(Option):
    OFF = "off"
    ON = "on"

    def __bool__(self) -> bool:
        return self is Switch.ON


class EarlyRefusal(Option):
    OFF = "off"  # refused only once hopeless alone (late)
    ON = "on"  # refused at admission when the plan sets the newcomer aside
    STRICT = "strict"  # ... or when admitting it would push an admitted request out of the plan

    def __bool__(self) -> bool:
        return self is not EarlyRefusal.OFF


class Executor(Option):
    BLS = "bls"  # components are their own Triton models, called over BLS
    LOCAL = "local"  # components run in the engine's own stub (ONNX Runtime)


class Runtime(Option):
    ORT = "ort"
    TORCH = "torch"


class DenoiseMode(Option):
    CONCAT = "concat"  # one call per latent resolution
    PATCHES = "patches"  # one exact call for every resolution (torch)
    TILED = "tiled"  # fixed-size tiles, blended (approximate)


class Family(Option):
    SD = "sd"  # UNet2DConditionModel, StableDiffusionPipeline
    SD3 = "sd3"  # SD3Transformer2DModel, StableDiffusion3Pipeline without T5


class LoraBatching(Option):
    MIXED = "mixed"  # requests with different adapter sets, and none, share a step (per-row adapters)
    ONE_SET = "one_set"  # one adapter set per step, as servers that merge adapters do (a baseline)


class CfgParallel(Option):
    OFF = "off"
    ON = "on"  # every denoiser call of 2+ rows as two halves at once
    AUTO = "auto"  # only calls of at most 2 rows (a lone CFG latent, which leaves a core idle)

    def __bool__(self) -> bool:
        return self is not CfgParallel.OFF


class ControlMode(Option):
    SYNC = "sync"  # every step's residuals from this step's ControlNet calls (exact)
    ASYNC = "async"  # the decoder takes the previous step's residuals; ControlNets run beside the whole UNet


class Routing(Option):
    """How the cascade entry (DiffServe, issue 17) picks the model that answers a request."""

    CONTROLLED = "controlled"  # the discriminator's confidence against a threshold the controller re-chooses
    STATIC = "static"  # the discriminator's confidence against a fixed threshold
    RANDOM = "random"  # a fixed fraction deferred at random, whatever the image (the routing baseline)
    LIGHT = "light"  # the light pipeline answers every request
    HEAVY = "heavy"  # the heavy pipeline answers every request (the light one never runs)


class DiscriminatorInput(Option):
    """What the cascade's discriminator sees (its training record says; the cascade sends what it names)."""

    IMAGE = "image"  # the image alone: P(real), DiffServe's discriminator
    IMAGE_PROMPT = "image+prompt"  # the image and its prompt's token ids: P(real and of this prompt)
