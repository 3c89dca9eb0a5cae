"""The cost model the deadline policies plan with (PatchedServe's online latency predictor, plus joins,
finishes and the loop's own time): predicted step, join and finish times of one engine. Seeded by the
start-up profile; the engine keeps every term current from what it serves."""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .predictor import STEP_FEATURES, BatchShape, LatencyPredictor
from .request import RequestState


@dataclass
class DegreeTable:
    """TetriServe's cost table, as ratios: T(size, k) / T(size, 1) for k = 2, 4, ... workers, per profiled size
    (rows x latent cells), interpolated in log cells between them and held flat beyond; profiled at start-up
    (profile.profile_degrees) and refit online from served steps at degree k. Degree 1 is the predictor itself."""

    workers: int = 1
    ratios: dict[int, list[list[float]]] = field(default_factory=dict)  # k -> sorted [[cells, ratio], ...]

    def degrees(self) -> list[int]:
        return [1] + sorted(k for k in self.ratios if k <= self.workers)

    def ratio(self, k: int, cells: float) -> float:
        if k == 1:
            return 1.0
        points = self.ratios.get(k)
        if not points:
            return float("inf")  # not profiled: never planned
        xs = np.log([max(c, 1.0) for c, _ in points])
        return float(np.interp(np.log(max(cells, 1.0)), xs, [r for _, r in points]))

    def observe(self, k: int, cells: float, measured_s: float, base_s: float, alpha: float = 0.1,
                totals: dict[str, float] | None = None) -> None:
        """A served step at degree k: its measured time over the predictor's degree-1 time `base_s`, into the
        nearest point (moving average); `totals` gains both times under that point (the run's mean ratio)."""
        points = self.ratios.get(k)
        if not points or not (math.isfinite(measured_s) and base_s > 0 and measured_s > 0):
            return
        near = min(points, key=lambda p: abs(math.log(max(p[0], 1.0)) - math.log(max(cells, 1.0))))
        near[1] += alpha * (measured_s / base_s - near[1])
        if totals is not None:
            name = f"degree_{k}_{int(near[0])}"
            totals[f"{name}_measured_s"] = totals.get(f"{name}_measured_s", 0.0) + measured_s
            totals[f"{name}_base_s"] = totals.get(f"{name}_base_s", 0.0) + base_s

    def to_json(self) -> dict:
        return {"workers": self.workers, "ratios": {str(k): v for k, v in self.ratios.items()}}

    @classmethod
    def from_json(cls, data: dict) -> DegreeTable:
        return cls(int(data["workers"]), {int(k): [list(p) for p in v] for k, v in data["ratios"].items()})


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
    degrees: DegreeTable = field(default_factory=DegreeTable)  # denoiser workers and T(size, k) (issue 16)
    multi_set: float = 1.0  # several worker sets stepping at once: measured step / the slowest set's predicted
    # time (the sets share the host's cores, caches and memory bandwidth with each other and the engine), learned
    served: dict[str, float] = field(default_factory=dict)  # seconds summed since start behind the moving
    # averages multi_set and degree_<k>_<cells> (<term>_measured_s, <term>_predicted_s / _base_s): a window's
    # mean ratio from two readings (served_means), which is what the simulator replays, not the last average

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
                "finish_s_per_cell": self.finish_s_per_cell, "gap_s": self.gap_s, "multi_set": self.multi_set,
                **{f"step_{n}": float(c) for n, c in zip(STEP_FEATURES, self.predictor.coef, strict=True)},
                # T(size, k) / T(size, 1) as refit from served steps: degree_<k>_<cells>; the workers it is over
                "workers": float(self.degrees.workers),
                **{f"degree_{k}_{int(c)}": float(r) for k, pts in sorted(self.degrees.ratios.items()) for c, r in pts}}

    @classmethod
    def from_terms(cls, terms: dict[str, float], vae_factor: int) -> CostModel:
        pred = LatencyPredictor()
        # step_adapter_cells / step_control_cells are absent from terms recorded before adapters / ControlNets
        # existed: no such cost then
        late = ("adapter_cells", "control_cells")
        pred.coef = np.array([terms.get(f"step_{n}", 0.0) if n in late else terms[f"step_{n}"] for n in STEP_FEATURES],
                             dtype=np.float64)
        ratios: dict[int, list[list[float]]] = {}
        for name, value in terms.items():  # degree_<k>_<cells>: absent before served tables were exported
            if name.startswith("degree_"):
                _, k, cells = name.split("_")
                ratios.setdefault(int(k), []).append([float(cells), float(value)])
        workers = int(terms.get("workers", max(ratios, default=1)))  # absent before it was exported
        degrees = DegreeTable(workers, {k: sorted(v) for k, v in ratios.items()})
        return cls(pred, vae_factor, terms["start_s"], terms["finish_base_s"], terms["finish_s_per_cell"],
                   terms["gap_s"], multi_set=terms.get("multi_set", 1.0),  # absent before issue 16's refit
                   degrees=degrees)

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
        """One engine step of `states`: with several denoiser workers, each at degree 1 on the worker the
        least-work placement gives it (the step lasts as long as its slowest worker)."""
        if not states:
            return 0.0
        if self.degrees.workers == 1 or len(states) == 1:
            return self.predictor.predict(self.shape(states)) + self.gap_s
        sets = [g for g in balance(states, self.degrees.workers, self.group_s) if g]
        return max(self.group_s(g) for g in sets) * (self.multi_set if len(sets) > 1 else 1.0) + self.gap_s

    def sets_s(self, groups) -> float:
        """The denoiser time of one step of worker sets `groups` = [(states, adapted, k)] stepping together: the
        slowest set's, slowed by `multi_set` when several run at once."""
        slowest = max(self.group_s(g, k, a) for g, a, k in groups)
        return slowest * (self.multi_set if len(groups) > 1 else 1.0)

    def group_s(self, states, k: int = 1, adapted: Sequence[bool] | None = None) -> float:
        """The denoiser time of `states` batched on one set of k workers (no loop gap); `adapted` as in shape."""
        return self.predictor.predict(self.shape(states, adapted)) * self.degrees.ratio(k, self.row_cells(states))

    def step_at(self, s: RequestState, k: int) -> float:
        """One step of `s` alone at degree k (TetriServe's T_i(k)), loop gap included."""
        return self.group_s([s], k) + self.gap_s

    def row_cells(self, states) -> int:
        return sum(h * w * r for h, w, r in self.shape(states).requests)

    def observe_step(self, groups, measured_s: float, alpha: float = 0.05) -> None:
        """Learn from a served step: `groups` = [(states, adapted, k)], one per worker set that ran. One group at
        degree 1 refits the predictor; one group at degree k > 1 the degree table; several groups ran at once:
        the step over their slowest set's prediction refits `multi_set` (moving average)."""
        if len(groups) > 1:
            slowest = max(self.group_s(g, k, a) for g, a, k in groups)
            if slowest > 0 and math.isfinite(slowest) and measured_s > 0:
                self.multi_set += alpha * (min(max(measured_s / slowest, 0.5), 4.0) - self.multi_set)
                self.served["multi_set_measured_s"] = self.served.get("multi_set_measured_s", 0.0) + measured_s
                self.served["multi_set_predicted_s"] = self.served.get("multi_set_predicted_s", 0.0) + slowest
            return
        states, adapted, k = groups[0]
        shape = self.shape(states, adapted)
        if k == 1:
            self.predictor.observe(shape, measured_s)
        else:
            self.degrees.observe(k, self.row_cells(states), measured_s, self.predictor.predict(shape),
                                 totals=self.served)

    def served_means(self, before: dict[str, float], after: dict[str, float]) -> CostModel:
        """A copy whose multi_set and degree ratios are the means over a window of served steps, from two readings
        of `served` (as exported): sum measured / sum predicted per term; a term no step of the window taught keeps
        this model's value. The simulator replays a run with these, not with the moving averages at its end."""
        out = copy.deepcopy(self)

        def mean(name: str, denominator: str) -> float | None:
            num = after.get(f"{name}_measured_s", 0.0) - before.get(f"{name}_measured_s", 0.0)
            den = after.get(f"{name}_{denominator}", 0.0) - before.get(f"{name}_{denominator}", 0.0)
            return num / den if den > 0 and num > 0 else None

        out.multi_set = mean("multi_set", "predicted_s") or self.multi_set
        for k, points in out.degrees.ratios.items():
            for p in points:
                p[1] = mean(f"degree_{k}_{int(p[0])}", "base_s") or p[1]
        return out

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


def balance(states, workers: int, time_of) -> list[list]:
    """Least predicted work: requests longest first, each onto the worker whose predicted time is least so far
    (LPT); returns one list per worker. `time_of(list of states)` predicts a worker's batch."""
    groups: list[list] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for s in sorted(states, key=lambda s: -time_of([s])):
        w = min(range(workers), key=lambda i: (loads[i], i))
        groups[w].append(s)
        loads[w] = time_of(groups[w])
    return groups
