"""DiffServe's cascade (issue 17): a request first runs the light pipeline, the discriminator scores the image
(its confidence that the image is real), and the request is answered with that image when the confidence clears
the threshold; otherwise it is deferred to the heavy pipeline. Pure logic: the settings, the routing decision and
the deferral profile f(t). The served entry is tessera/triton/cascade_model.py; the threshold controller
cascade_control.py."""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .options import Routing


@dataclass(frozen=True)
class Route:
    """Where one request goes after the light image was scored."""

    defer: bool  # True: the heavy pipeline answers
    reason: str  # "confident", "below threshold", "random", "light only", "heavy only"


@dataclass(frozen=True)
class DeferralProfile:
    """f(t): the fraction of light images whose confidence falls below threshold t (deferred), measured offline on
    a grid of thresholds; interpolated between grid points."""

    thresholds: tuple[float, ...]  # ascending
    deferral: tuple[float, ...]  # f at each threshold, non-decreasing

    @classmethod
    def measure(cls, confidences, thresholds) -> DeferralProfile:
        c = np.sort(np.asarray(confidences, dtype=np.float64))
        ts = tuple(float(t) for t in sorted(thresholds))
        return cls(ts, tuple(float(np.searchsorted(c, t, side="left") / max(len(c), 1)) for t in ts))

    def f(self, t: float) -> float:
        return float(np.interp(t, self.thresholds, self.deferral))

    def to_json(self) -> dict:
        return {"thresholds": list(self.thresholds), "deferral": list(self.deferral)}

    @classmethod
    def from_json(cls, data: dict) -> DeferralProfile:
        return cls(tuple(float(t) for t in data["thresholds"]), tuple(float(f) for f in data["deferral"]))

    def threshold_for(self, fraction: float) -> float:
        """The smallest grid threshold deferring at least `fraction` (the grid's last if none does)."""
        i = bisect.bisect_left(list(self.deferral), fraction)
        return self.thresholds[min(i, len(self.thresholds) - 1)]


@dataclass(frozen=True)
class CascadeSettings:
    """The cascade entry's settings (its config.pbtxt parameters), checked at load."""

    routing: Routing = Routing.CONTROLLED
    threshold: float = 0.5  # static routing's threshold; the controlled cascade's until its first decision
    defer_fraction: float = 0.3  # random routing's share deferred
    light_steps: int = 4  # steps the light pipeline runs (the request's `steps` are the heavy pipeline's)
    control_s: float = 2.0  # seconds between controller decisions
    seed: int = 0  # random routing's draws

    def __post_init__(self) -> None:
        object.__setattr__(self, "routing", Routing.parse("routing", self.routing))
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold: must be in [0, 1] (a probability of real), got {self.threshold}")
        if not 0.0 <= self.defer_fraction <= 1.0:
            raise ConfigError(f"defer_fraction: must be in [0, 1], got {self.defer_fraction}")
        if self.light_steps < 1:
            raise ConfigError(f"light_steps: must be >= 1, got {self.light_steps}")
        if self.control_s <= 0:
            raise ConfigError(f"control_s: must be > 0 seconds, got {self.control_s}")

    @classmethod
    def from_parameters(cls, params: dict[str, str], others: frozenset[str] = frozenset()) -> CascadeSettings:
        """The settings among `params`; `others` are the entry's other parameters (model names, costs, bounds):
        any other name is a ConfigError listing the allowed ones (a mistyped setting never loads as a default)."""
        known = {"routing": str, "threshold": float, "defer_fraction": float, "light_steps": int, "control_s": float,
                 "seed": int}
        unknown = sorted(set(params) - set(known) - others)
        if unknown:
            raise ConfigError(f"{unknown[0]}: not a cascade setting; allowed {', '.join(sorted({*known, *others}))}")
        out = {}
        for k, v in params.items():
            if k not in known:
                continue
            try:
                out[k] = known[k](v)
            except ValueError:
                raise ConfigError(f"{k}: expected {known[k].__name__}, got {v!r}") from None
        return cls(**out)


ENTRY_PARAMETERS = frozenset({"light", "heavy", "discriminator", "max_in_flight", "light_s", "heavy_s", "cores",
                              "light_max_cores", "heavy_max_cores"})


class Router:
    """The routing decision, per mode. `threshold` is the controller's current one for CONTROLLED, the
    setting for STATIC; confidences at or above it are answered by the light image."""

    def __init__(self, settings: CascadeSettings):
        self.settings = settings
        self.rng = random.Random(settings.seed)

    @property
    def runs_light(self) -> bool:
        return self.settings.routing is not Routing.HEAVY

    @property
    def scores(self) -> bool:
        """Whether the discriminator runs (every mode that answers from the light image by its confidence)."""
        return self.settings.routing in (Routing.CONTROLLED, Routing.STATIC)

    def route(self, confidence: float | None, threshold: float) -> Route:
        mode = self.settings.routing
        if mode is Routing.HEAVY:
            return Route(True, "heavy only")
        if mode is Routing.LIGHT:
            return Route(False, "light only")
        if mode is Routing.RANDOM:
            return Route(self.rng.random() < self.settings.defer_fraction, "random")
        if confidence is None:
            raise ValueError("confidence: required when routing by the discriminator")
        return Route(False, "confident") if confidence >= threshold else Route(True, "below threshold")
