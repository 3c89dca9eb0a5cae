"""DiffServe's controller (issue 17): every few seconds, the demand of the last window (a moving average of the
arrival rate) and an MILP choose the highest threshold (the most deferrals to the heavy model, so the best
quality) whose light and heavy compute still meet the demand within the SLO, the split of the host's compute
between the two pipelines, and the in-flight caps that follow from Little's law. A frozen ControlPlan comes out;
the cascade entry applies it. Pure logic: the simulator and tests run it on hand-built demand.

The queueing model, per pipeline given c cores: processor sharing, service s / c, utilisation rho = lambda s / c,
mean time W = (s / c) / (1 - rho). W <= B (the pipeline's share of the SLO) is linear in c:
c >= s / B + lambda s. A deferred request pays both pipelines: B_light + B_heavy = SLO, split in proportion to
their service times. Little's law gives the requests in flight at that W: L = lambda W <= lambda B."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np

from .cascade import DeferralProfile
from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceCosts:
    """Core-seconds per request of each pipeline on this host, alone (the light one with its discriminator call)."""

    light_s: float
    heavy_s: float

    def __post_init__(self) -> None:
        for name in ("light_s", "heavy_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}: must be a finite number of seconds > 0, got {v!r}")


@dataclass(frozen=True)
class ControlPlan:
    threshold: float
    deferral: float  # f(threshold), the profile's expected fraction deferred
    light_cores: float  # the split of the host's compute the solution needs (not more than `cores`)
    heavy_cores: float
    light_cap: int  # requests in flight on each pipeline at the plan's latency (Little's law)
    heavy_cap: int
    feasible: bool  # False: even deferring nothing does not meet the demand (threshold at the grid's lowest)
    demand_rps: float
    solve_ms: float


def solve(demand_rps: float, profile: DeferralProfile, costs: ServiceCosts, slo_s: float, cores: float,
          units_per_core: int = 10, light_max: float | None = None, heavy_max: float | None = None) -> ControlPlan:
    """The MILP (scipy.optimize.milp, HiGHS): one-hot z over the profile's thresholds, integer compute units n_l,
    n_h (1 / units_per_core of a core each). Maximise the chosen threshold's rank in the grid (minus a tie-break on
    units used) subject to
        light:  n_l / u >= s_l / B_l + lambda s_l
        heavy:  n_h / u >= sum_i z_i ([f_i > 0] s_h / B_h + lambda f_i s_h)
        n_l + n_h <= cores x u,  sum z = 1,
    and each pipeline at most the cores it can use (`light_max`, `heavy_max`: an engine of one single-threaded
    process uses one core however many the host has; default: all of them)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    t0 = time.perf_counter()
    lam = max(float(demand_rps), 0.0)
    ts, fs = np.array(profile.thresholds), np.array(profile.deferral)
    n = len(ts)
    u = float(units_per_core)
    units = math.floor(cores * u + 1e-9)
    light_units = math.floor(min(cores, light_max or cores) * u + 1e-9)
    heavy_units = math.floor(min(cores, heavy_max or cores) * u + 1e-9)
    b_light = slo_s * costs.light_s / (costs.light_s + costs.heavy_s)
    b_heavy = slo_s - b_light
    heavy_need = (fs > 0) * costs.heavy_s / b_heavy + lam * fs * costs.heavy_s  # cores per threshold
    light_need = costs.light_s / b_light + lam * costs.light_s
    # variables: z_0 .. z_{n-1}, n_l, n_h. The objective ranks thresholds by grid position (a discriminator's
    # thresholds can all be tiny: their values would lose to the tie-break); the tie-break on units stays below
    # one grid step
    c = np.concatenate([-np.argsort(np.argsort(ts)).astype(float), [0.5 / (2 * units + 1)] * 2])
    rows = [
        (np.concatenate([np.ones(n), [0, 0]]), 1.0, 1.0),
        (np.concatenate([np.zeros(n), [1 / u, 0]]), light_need, np.inf),
        (np.concatenate([-heavy_need, [0, 1 / u]]), 0.0, np.inf),
        (np.concatenate([np.zeros(n), [1, 1]]), -np.inf, units),
    ]
    cons = LinearConstraint(np.array([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows])
    res = milp(c, constraints=cons, integrality=np.ones(n + 2), bounds=Bounds(0, np.concatenate([np.ones(n), [light_units, heavy_units]])))
    ms = 1e3 * (time.perf_counter() - t0)
    if res.status != 0 or res.x is None:  # overloaded: nothing deferred; the light pipeline gets everything
        i = int(np.argmin(ts))
        return ControlPlan(float(ts[i]), float(fs[i]), light_units / u, 0.0, max(1, math.ceil(lam * slo_s)), 0,
                           False, lam, ms)
    z = np.round(res.x[:n]).astype(int)
    i = int(np.argmax(z))
    n_l, n_h = round(res.x[n]) / u, round(res.x[n + 1]) / u
    return ControlPlan(float(ts[i]), float(fs[i]), n_l, n_h, max(1, math.ceil(lam * b_light)),
                       max(1, math.ceil(lam * fs[i] * b_heavy)) if fs[i] > 0 else 0, True, lam, ms)


class Controller:
    """Counts arrivals; every `period_s` closes the window, folds its rate into the demand's moving average and
    re-solves. Thread-safe (the cascade entry's forwarding threads call it)."""

    def __init__(self, profile: DeferralProfile, costs: ServiceCosts, cores: float, period_s: float = 2.0,
                 alpha: float = 0.5, start_threshold: float = 0.5, slo_s: float = 10.0, clock=time.monotonic,
                 light_max: float | None = None, heavy_max: float | None = None):
        import scipy.optimize  # noqa: F401 - at load, not under the lock on the first request's thread

        for name, v in (("cores", cores), ("light_max_cores", light_max), ("heavy_max_cores", heavy_max)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}: must be > 0, got {v!r}")
        self.profile, self.costs, self.cores, self.period_s, self.alpha = profile, costs, cores, period_s, alpha
        self.light_max, self.heavy_max = light_max, heavy_max
        self.clock = clock
        self.lock = threading.Lock()
        self.window_start = clock()
        self.arrivals = 0
        self.slo_sum, self.slo_n = 0.0, 0
        self.slo_s = slo_s  # the mean SLO of the last window that had any (until one does: this)
        self.demand_rps: float | None = None
        half = cores / 2
        self.plan = ControlPlan(start_threshold, profile.f(start_threshold), min(half, light_max or half),
                                min(half, heavy_max or half), 1, 1, True, 0.0, 0.0)
        self.history: list[tuple[float, ControlPlan]] = []

    def arrive(self, slo_s: float | None) -> ControlPlan:
        """One arrival (its SLO in seconds; None: none given, the last known mean is kept); returns the plan in
        force, re-solved first when a window closed."""
        with self.lock:
            now = self.clock()
            if now - self.window_start >= self.period_s:  # this arrival opens the next window
                self._decide(now)
            self.arrivals += 1
            if slo_s:
                self.slo_sum += slo_s
                self.slo_n += 1
            return self.plan

    def _decide(self, now: float) -> None:
        elapsed = now - self.window_start
        rate = self.arrivals / elapsed
        self.demand_rps = rate if self.demand_rps is None else self.demand_rps + self.alpha * (rate - self.demand_rps)
        if self.slo_n:
            self.slo_s = self.slo_sum / self.slo_n
        self.window_start, self.arrivals, self.slo_sum, self.slo_n = now, 0, 0.0, 0
        try:
            self.plan = solve(self.demand_rps, self.profile, self.costs, self.slo_s, self.cores,
                              light_max=self.light_max, heavy_max=self.heavy_max)
        except Exception as e:  # noqa: BLE001 - the plan in force stays; the next window tries again
            log.warning("[tessera] cascade controller: the MILP failed (%s); the plan in force stays", e)
            return
        self.history.append((now, self.plan))
