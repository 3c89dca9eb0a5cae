"""Which denoiser workers run each request this step (issue 16). Policies that choose degrees (tetris, fixed,
rssp) place requests themselves (StepPlan.place); for the others the engine's placer puts each request at degree
1 on a worker. One worker: nothing to place.

  least-work   QoS-Diff's load balancing, for an engine whose workers step together: requests longest first,
               each onto the worker with the least predicted work so far this step (the step lasts as long as its
               slowest worker). Latents live in the engine, so moving a request costs nothing.
  round-robin  each request on the next worker in turn in the order requests arrive at the engine (every
               arrival takes a turn, also one the policy then refuses or drops), and kept there: a load balancer's
               round robin, the baseline. Turns by arrival, not by first step, make the placement a function of the
               arrivals alone: on a trace of one image per request that stays under the entry's in-flight bound,
               the simulator places as the server does (a first-step turn depended on which requests happened to
               be refused or dropped before stepping). A request refused as overloaded still took its turn on the
               server; the simulator has no in-flight bound.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from .cost import CostModel, balance
from .options import Placement
from .request import RequestState

Place = tuple[int, ...]


class OneWorker:
    workers = 1

    def arrive(self, state: RequestState) -> None:
        """A request reached the engine (Engine.admit, on the submitting thread): round-robin takes its turn here."""

    def place(self, states: list[RequestState], given: dict[str, Place]) -> list[Place] | None:
        return None


class LeastWork:
    def __init__(self, workers: int, cost: CostModel | None):
        self.workers, self.cost = workers, cost

    def arrive(self, state: RequestState) -> None:
        pass

    def _time(self, states) -> float:
        if self.cost is not None:
            return self.cost.group_s(states)
        return float(sum(s.params.height * s.params.width * (2 if s.params.do_cfg else 1) for s in states))

    def place(self, states: list[RequestState], given: dict[str, Place]) -> list[Place] | None:
        free = [s for s in states if s.request_id not in given]
        busy = {w for p in given.values() for w in p}
        open_workers = [w for w in range(self.workers) if w not in busy] or list(range(self.workers))
        groups = balance(free, len(open_workers), self._time) if free else []
        mine = {s.request_id: (open_workers[i],) for i, g in enumerate(groups) for s in g}
        return [given.get(s.request_id) or mine[s.request_id] for s in states]


class RoundRobin:
    def __init__(self, workers: int, remember: int = 65_536):
        self.workers, self.remember = workers, remember
        self._next = 0
        self._placed: OrderedDict[str, Place] = OrderedDict()
        self._lock = threading.Lock()  # arrive() runs on the submitting thread, place() on the step loop

    def arrive(self, state: RequestState) -> None:
        with self._lock:
            self._turn(state.request_id)

    def _turn(self, request_id: str) -> Place:
        if request_id not in self._placed:
            self._placed[request_id] = (self._next % self.workers,)
            self._next += 1
            if len(self._placed) > self.remember:
                self._placed.popitem(last=False)
        return self._placed[request_id]

    def place(self, states: list[RequestState], given: dict[str, Place]) -> list[Place] | None:
        with self._lock:  # a request that never arrived through admit (a direct add) takes its turn here
            return [given[s.request_id] if s.request_id in given else self._turn(s.request_id) for s in states]


def make_placer(workers: int, placement: Placement | str, cost: CostModel | None):
    if workers <= 1:
        return OneWorker()
    if Placement.parse("placement", placement) is Placement.ROUND_ROBIN:
        return RoundRobin(workers)
    return LeastWork(workers, cost)


def groups_of(states: list[RequestState], adapted: list[bool], places: list[Place] | None):
    """[(states, adapted, degree)] per worker set, in first-seen order (one group when nothing is placed)."""
    if places is None:
        return [(states, adapted, 1)]
    out: dict[Place, tuple[list, list, int]] = {}
    for s, a, p in zip(states, adapted, places, strict=True):
        g = out.setdefault(tuple(p), ([], [], len(p)))
        g[0].append(s)
        g[1].append(a)
    return list(out.values())
