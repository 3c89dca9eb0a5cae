"""Request scheduling policies. A policy reads an EngineView and returns a StepPlan; it never touches
request state, tensors or executors.

  step-fcfs   continuous batching, first come first served: everyone running advances every step;
              waiting requests join at the next step boundary while there is room.
  image-fcfs  the Triton tutorial's behaviour: one request's whole loop at a time, batching only
              requests of the same resolution that are waiting together; nobody joins mid-loop.
"""

from __future__ import annotations

from .engine import EngineView, StepPlan
from .errors import ConfigError


class StepFcfsPolicy:
    name = "step-fcfs"

    def __init__(self, max_batch: int = 16):
        self.max_batch = max_batch

    def schedule(self, view: EngineView, now_s: float) -> StepPlan:
        room = max(self.max_batch - len(view.running), 0)
        join = tuple(s.request_id for s in view.waiting[:room])
        return StepPlan(join, tuple(s.request_id for s in view.running) + join)


class ImageFcfsPolicy:
    name = "image-fcfs"

    def __init__(self, max_batch: int = 16):
        self.max_batch = max_batch

    def schedule(self, view: EngineView, now_s: float) -> StepPlan:
        if view.running:
            return StepPlan((), tuple(s.request_id for s in view.running))
        if not view.waiting:
            return StepPlan.make_empty()
        size = view.waiting[0].size
        join = tuple(s.request_id for s in view.waiting if s.size == size)[: self.max_batch]
        return StepPlan(join, join)


POLICIES = {p.name: p for p in (StepFcfsPolicy, ImageFcfsPolicy)}


def make_policy(name: str, **kw):
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ConfigError(f"policy: unknown policy; allowed {', '.join(POLICIES)}, got {name!r}") from None
    return cls(**kw)
