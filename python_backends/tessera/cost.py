"""The cost model the deadline policies plan with (PatchedServe's online latency predictor, plus joins,
finishes and the loop's own time): predicted step, join and finish times of one engine. Seeded by the
start-up profile; the engine keeps every term current from what it serves."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .predictor import STEP_FEATURES, BatchShape, LatencyPredictor
from .request import RequestState


@dataclass
class CostModel:
    """Predicted time of steps, joins (prompt encoding) and finishes (VAE decode) on one engine. Seeded by
    the start-up profile; the engine keeps every term current from what it serves (the predictor is
    refit from served steps, joins and finishes from served joins and decodes, the loop gap measured)."""

    predictor: LatencyPredictor
    vae_factor: int
    start_s: float = 0.0  # per joining request
    finish_base_s: float = 0.0  # per finishing request
    finish_s_per_cell: float = 0.0
    gap_s: float = 0.0  # loop time between engine steps (responses, admissions, cancellation checks),
    # measured by the engine while it is busy; part of every step as the policies plan it
    gaps: int = 0  # gaps observed, and their total (for the long-run mean)
    gap_total_s: float = 0.0
    finishes: deque = field(default_factory=lambda: deque(maxlen=64))  # recent (latent cells, seconds)

    def observe_gap(self, seconds: float, alpha: float = 0.05) -> None:
        seconds = max(seconds, 0.0)
        self.gap_s += alpha * (seconds - self.gap_s)
        self.gaps += 1
        self.gap_total_s += seconds

    def observe_start(self, seconds: float, alpha: float = 0.05) -> None:
        self.start_s += alpha * (max(seconds, 0.0) - self.start_s)

    def cells(self, s: RequestState) -> int:
        return (s.params.height // self.vae_factor) * (s.params.width // self.vae_factor)

    def observe_finishes(self, samples) -> None:
        """(latent cells, seconds) of decodes; finish = base + per_cell x cells, least squares over the
        recent window (one size only in the window: the line is rescaled to it)."""
        self.finishes.extend(samples)
        cells = np.array([c for c, _ in self.finishes], dtype=np.float64)
        secs = np.array([t for _, t in self.finishes], dtype=np.float64)
        if len(cells) == 0:
            return
        if len(set(cells.tolist())) > 1:
            per_cell = max(float(np.polyfit(cells, secs, 1)[0]), 0.0)
            self.finish_s_per_cell = per_cell
            self.finish_base_s = max(float(np.mean(secs - per_cell * cells)), 0.0)
        else:
            now = self.finish_base_s + self.finish_s_per_cell * cells[0]
            if now > 0:
                k = float(np.mean(secs)) / now
                self.finish_base_s, self.finish_s_per_cell = self.finish_base_s * k, self.finish_s_per_cell * k
            else:
                self.finish_s_per_cell = float(np.mean(secs)) / max(cells[0], 1.0)

    def terms(self) -> dict[str, float]:
        """Every number the policies plan with (exported as metrics; the simulator can replay them)."""
        return {"start_s": self.start_s, "finish_base_s": self.finish_base_s,
                "finish_s_per_cell": self.finish_s_per_cell, "gap_s": self.gap_s,
                **{f"step_{n}": float(c) for n, c in zip(STEP_FEATURES, self.predictor.coef, strict=True)}}

    @classmethod
    def from_terms(cls, terms: dict[str, float], vae_factor: int) -> CostModel:
        pred = LatencyPredictor()
        # step_adapter_cells / step_control_cells are absent from terms recorded before adapters / ControlNets
        # existed: no such cost then
        late = ("adapter_cells", "control_cells")
        pred.coef = np.array([terms.get(f"step_{n}", 0.0) if n in late else terms[f"step_{n}"] for n in STEP_FEATURES],
                             dtype=np.float64)
        return cls(pred, vae_factor, terms["start_s"], terms["finish_base_s"], terms["finish_s_per_cell"],
                   terms["gap_s"])

    def shape(self, states, adapted: Sequence[bool] | None = None) -> BatchShape:
        """The step's batch makeup. `adapted[i]`: whether request i steps with its adapters (the engine
        knows, at the step); None: every request that asked for adapters has them (planning ahead)."""
        f = self.vae_factor
        adapted = [bool(s.params.lora) for s in states] if adapted is None else adapted
        requests = tuple((s.params.height // f, s.params.width // f, 2 if s.params.do_cfg else 1) for s in states)
        control = sum(h * w * r * len(s.params.control.names)
                      for (h, w, r), s in zip(requests, states, strict=True) if s.params.control is not None)
        return BatchShape(requests, adapter_cells=sum(h * w * r for (h, w, r), a in zip(requests, adapted, strict=True)
                                                      if a), control_cells=control)

    def step_s(self, states) -> float:
        return self.predictor.predict(self.shape(states)) + self.gap_s if states else 0.0

    def finish_s(self, s: RequestState) -> float:
        return self.finish_base_s + self.finish_s_per_cell * self.cells(s)

    def alone_s(self, s: RequestState, steps: int | None = None) -> float:
        """Remaining time if `s` ran alone from now (join included if it has not started)."""
        steps = s.steps_left if steps is None else steps
        step_s = self.step_s([s])
        start_s = self.start_s + self.adapter_wait_s(s, step_s) if s.run is None else 0.0
        return start_s + steps * step_s + self.finish_s(s)

    @staticmethod
    def adapter_wait_s(s: RequestState, step_s: float) -> float:
        """Predicted time a request sits out at its K waiting for adapters still loading at admission
        (bounded asynchronous loading: the first K steps hide the load)."""
        return max(0.0, s.adapter_load_s - s.adapter_k * step_s) if s.adapter_load_s > 0 else 0.0

    def isolated_s(self, s: RequestState) -> float:
        return self.start_s + s.params.num_steps * self.step_s([s]) + self.finish_s(s)

    def finish_times(self, states, now_s: float) -> dict[str, float]:
        """Predicted finish of each request if `states` run together from now, nobody else joining:
        the batch shrinks as members finish; joins and decodes hold the (single) loop (the engine decodes
        requests finishing together earliest deadline first)."""
        t = now_s + sum(self.start_s for s in states if s.run is None)
        active = sorted(states, key=lambda s: (s.steps_left, s.deadline_s))  # decodes: earliest deadline first
        done_steps = 0
        out = {}
        while active:
            k = active[0].steps_left - done_steps
            t += k * self.step_s(active)
            done_steps += k
            while active and active[0].steps_left - done_steps <= 0:
                s = active.pop(0)
                t += self.finish_s(s)
                out[s.request_id] = t
        return out
