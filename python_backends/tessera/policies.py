"""The policy registry: every scheduling policy by its configured name (scheduler.py: one worker set at a time;
degrees.py: degrees over several denoiser workers)."""

from __future__ import annotations

from .cost import CostModel
from .degrees import FixedDegreePolicy, RsspPolicy, TetrisPolicy
from .options import EarlyRefusal, OnHopeless, PolicyName
from .scheduler import EdfMhPolicy, ImageFcfsPolicy, Policy, PolicySettings, SlackPolicy, StepFcfsPolicy


POLICIES: dict[PolicyName, type[Policy]] = {p.name: p for p in (ImageFcfsPolicy, StepFcfsPolicy, SlackPolicy, EdfMhPolicy,
                                                                TetrisPolicy, FixedDegreePolicy, RsspPolicy)}


def make_policy(name: PolicyName | str, max_batch: int = 16, cost: CostModel | None = None,
                on_hopeless: OnHopeless | str = OnHopeless.DROP, min_steps: int = 4, round_steps: int = 5,
                margin: float = 0.1, early_refusal: EarlyRefusal | str = EarlyRefusal.ON, workers: int | None = None,
                fixed_degree: int = 1, rssp: tuple = ()) -> Policy:
    """The policy registered as `name` (ConfigError naming `policy` and the allowed values otherwise).
    `workers`: the engine's denoiser workers (default: the cost model's, else 1)."""
    if workers is None:
        workers = cost.degrees.workers if cost is not None else 1
    settings = PolicySettings(max_batch, OnHopeless.parse("on_hopeless", on_hopeless), min_steps, round_steps, margin,
                              EarlyRefusal.parse("early_refusal", early_refusal), workers, fixed_degree, tuple(rssp))
    return POLICIES[PolicyName.parse("policy", name)].build(settings, cost)
