"""Request data: per-request parameters (frozen, as parsed from the wire), the engine's mutable state of a
request in flight, and how a request ended."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace

from .control_spec import ControlSpec
from .interfaces import Run
from .lora_spec import NO_LORA, LoraSet


@dataclass(frozen=True, slots=True)
class GenerationParams:
    prompt: str
    negative_prompt: str
    height: int  # pixels
    width: int  # pixels
    num_steps: int
    guidance_scale: float
    seed: int
    slo_ms: int | None = None  # deadline relative to arrival; None: slo_scale x the isolated latency
    early_exit: bool | None = None  # entropy early exit for this request; None: the server's default
    lora: LoraSet = NO_LORA  # adapters and scales (issue 14)
    control: ControlSpec | None = None  # ControlNets, scales and condition maps (issue 15)

    @property
    def do_cfg(self) -> bool:
        """Classifier-free guidance runs when guidance_scale > 1, as in diffusers pipelines."""
        return self.guidance_scale > 1.0


class FinishReason(str, enum.Enum):
    COMPLETED = "completed"
    DEGRADED = "degraded"  # completed with fewer steps than asked, to meet its deadline
    CANCELLED = "cancelled"
    ERROR = "error"
    DROPPED = "dropped"  # its deadline could not be met, even alone (refusals at admission raise RefusedError)


@dataclass(frozen=True, slots=True)
class Progress:
    """A run's progress frozen for planning: view copies carry it instead of the live run."""

    step_index: int
    steps_left: int


@dataclass(slots=True)
class RequestState:
    """Mutable per-request state; only the Engine writes it (policies read frozen copies, `frozen()`)."""

    request_id: str
    params: GenerationParams
    arrival_s: float
    progress: bool = False  # send a progress event after every step
    preview: bool = False  # include a cheap preview image in progress events
    run: Run | Progress | None = None  # set when the request joins
    deadline_s: float = math.inf  # absolute, same clock as arrival_s
    isolated_s: float = 0.0  # predicted latency of this request alone (k x isolated is the default SLO)
    asked_steps: int | None = None  # set when degraded: the steps the client asked for
    slack_at_join: float | None = None  # (deadline - join - predicted remaining) / isolated
    early_exit: bool = False  # resolved at admission: the request's choice, else the server's default
    exited: bool = False  # stopped by the entropy rule
    joined_s: float | None = None
    step_s: list[float] = field(default_factory=list)  # end time of each step
    done_s: float | None = None
    adapter_k: int = 0  # BAL: steps it may run before its adapters must be in memory (set at admission)
    adapter_load_s: float = 0.0  # expected seconds until its adapters are in memory (0: cached at admission)

    @property
    def size(self) -> tuple[int, int]:
        return self.params.height, self.params.width

    @property
    def step_index(self) -> int:
        return 0 if self.run is None else self.run.step_index

    @property
    def steps_left(self) -> int:
        return self.params.num_steps if self.run is None else self.run.steps_left

    def frozen(self) -> RequestState:
        """A copy for planning on another thread: the live run replaced by its progress."""
        run = None if self.run is None else Progress(self.step_index, self.steps_left)
        return replace(self, run=run, step_s=[])

    def with_total(self, total: int) -> RequestState:
        """A planning copy that ends after `total` steps: a waiting request with fewer steps, a running
        one with a lowered budget."""
        if self.run is None:
            return replace(self, params=replace(self.params, num_steps=total), step_s=[])
        return replace(self, run=Progress(self.step_index, max(total - self.step_index, 0)), step_s=[])
