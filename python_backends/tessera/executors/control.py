"""The denoiser executor for engines that serve ControlNets (issue 15; SwiftDiffusion §3.2).

Per latent size, one step of every request:
- nobody in the group has a ControlNet: one whole-UNet call, as ConcatDenoiser;
- otherwise the UNet runs as its two exported parts, `denoiser_encoder` (time embedding, down and mid
  blocks) and `denoiser_decoder` (up blocks over the skips), for every row of the group at once, and each
  ControlNet the group uses runs once over the rows of the requests that use it. A request's residuals are
  its ControlNets' outputs, each times its scale, summed in the request's order (as diffusers'
  MultiControlNetModel), and added to the encoder's skips and mid output before the decoder runs
  (UNet2DConditionModel.forward adds them at the same point); rows without a ControlNet get none.
  `parallel`: the ControlNet calls are issued on a thread pool before the encoder runs on this thread, so
  they run beside it (ONNX Runtime releases the GIL; one intra-op thread each), and the decoder waits for
  them; otherwise encoder, ControlNets and decoder run one after another.
  `async` (ControlMode.ASYNC): the decoder takes the residuals a request's ControlNets gave at its
  *previous* step, so this step's ControlNet calls run beside the encoder and the decoder and are kept for
  the next step (the request's first step runs synchronously). Not exact: measured in
  perf/results/controlnet_quality.json.
Counters: ControlNet calls, the seconds the decoder waited for residuals after the encoder finished.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..control_spec import MAX_CONTROLNETS
from ..controlnet import ControlCall
from ..interfaces import CallStats, Inputs
from ..options import ControlMode
from .base import DENOISER_OUTPUT
from .denoise import ConcatDenoiser, _concat, _split

ENCODER_INPUTS = ("sample", "timestep", "encoder_hidden_states")


class ControlDenoiser:
    mode = "concat"

    def __init__(self, whole: Callable[[Inputs], np.ndarray], encoder, decoder, n_down: int, parallel: bool = True,
                 mode: ControlMode = ControlMode.SYNC):
        """`encoder`, `decoder` and each ControlNet: `run(feeds) -> {output: array}` (executors.ort.OrtModel)."""
        self.plain = ConcatDenoiser(whole)
        self.encoder, self.decoder, self.n_down = encoder, decoder, n_down
        self.parallel, self.async_mode = parallel, mode is ControlMode.ASYNC
        self.residual_names = (*(f"down_{i}" for i in range(n_down)), "mid")
        self._pool = ThreadPoolExecutor(max_workers=MAX_CONTROLNETS, thread_name_prefix="tessera-controlnet")
        self._lock = threading.Lock()
        self.calls = 0  # ControlNet calls
        self.decoder_wait_s = 0.0  # decoder waiting for residuals after the encoder finished

    def counters(self) -> tuple[int, float]:
        with self._lock:
            return self.calls, self.decoder_wait_s

    def run(self, items: list[Inputs], adapters: list | None = None,
            controls: list[ControlCall | None] | None = None,
            places: list | None = None) -> tuple[list[np.ndarray], CallStats]:
        if adapters is not None and any(adapters):
            raise RuntimeError("adapters: LoRA together with ControlNets is not served yet")
        if controls is None or not any(c is not None for c in controls):
            return self.plain.run(items)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it["sample"].shape[1:] + it["encoder_hidden_states"].shape[1:], []).append(i)
        outs: list[np.ndarray | None] = [None] * len(items)
        batch, reqs = [], []
        for idxs in groups.values():
            group = [items[i] for i in idxs]
            calls = [controls[i] for i in idxs]
            if any(c is not None for c in calls):
                res = self._controlled(group, calls)
            else:
                res = _split(self.plain.call(_concat(group)), group)
            for i, o in zip(idxs, res, strict=True):
                outs[i] = o
            batch.append(sum(it["sample"].shape[0] for it in group))
            reqs.append(len(idxs))
        return outs, CallStats(tuple(batch), (1,) * len(batch), tuple(reqs))  # type: ignore[return-value]

    # -- one latent size with ControlNets --------------------------------------------------------------
    def _controlled(self, group: list[Inputs], calls: list[ControlCall | None]) -> list[np.ndarray]:
        merged = _concat(group)
        rows, start = [], 0
        for it in group:
            n = it["sample"].shape[0]
            rows.append(np.arange(start, start + n))
            start += n
        jobs, uses = self._jobs(merged, rows, calls)
        need_now = [i for i, c in enumerate(calls) if c is not None and not (self.async_mode and c.state.residuals)]
        enc_in = {k: merged[k] for k in ENCODER_INPUTS}
        if self.parallel:
            futures = [self._pool.submit(net.run, feeds) for net, feeds in jobs]
            enc = self.encoder.run(enc_in)
            t_enc = time.perf_counter()
            results = [f.result() for f in futures] if need_now else None
        else:
            enc = self.encoder.run(enc_in)
            t_enc = time.perf_counter()
            results = [net.run(feeds) for net, feeds in jobs] if need_now else None
        fresh = self._sum(enc, results, uses, rows) if results is not None else None
        wait_s = time.perf_counter() - t_enc
        skips = [enc[name].copy() for name in self.residual_names]
        for i, call in enumerate(calls):
            if call is None:
                continue
            use = fresh if i in need_now else None
            for k in range(len(skips)):
                skips[k][rows[i]] += use[k][rows[i]] if use is not None else call.state.residuals[k]
        feeds = {"emb": enc["emb"], "encoder_hidden_states": merged["encoder_hidden_states"]}
        feeds |= {name: skips[k] for k, name in enumerate(self.residual_names)}
        out = self.decoder.run(feeds)[DENOISER_OUTPUT]
        if self.async_mode:  # this step's residuals serve the next step
            if fresh is None:
                results = [f.result() for f in futures] if self.parallel else [net.run(f) for net, f in jobs]
                fresh = self._sum(enc, results, uses, rows)
            for i, call in enumerate(calls):
                if call is not None:
                    call.state.residuals = [r[rows[i]].copy() for r in fresh]
        with self._lock:
            self.calls += len(jobs)
            self.decoder_wait_s += wait_s
        return _split(out, group)

    def _jobs(self, merged: Inputs, rows: list[np.ndarray], calls: list[ControlCall | None]):
        """One call per distinct ControlNet over the rows that use it: [(net, feeds)], and per request its
        [(job, first row in the job's output, last + 1, scale)] in the request's own ControlNet order."""
        users: dict[int, tuple[object, list[np.ndarray], list[np.ndarray]]] = {}
        order: dict[int, int] = {}
        uses: list[list[tuple[int, int, int, float]]] = []
        for i, call in enumerate(calls):
            mine = []
            if call is not None:
                n = len(rows[i])
                for (net, scale), cond in zip(call.nets, call.conditions, strict=True):
                    job = order.setdefault(id(net), len(order))
                    _, r, c = users.setdefault(id(net), (net, [], []))
                    start = sum(len(x) for x in r)
                    r.append(rows[i])
                    c.append(np.repeat(cond, n, axis=0))
                    mine.append((job, start, start + n, float(scale)))
            uses.append(mine)
        jobs = []
        for net, r, c in users.values():
            idx = np.concatenate(r)
            jobs.append((net, {k: merged[k][idx] for k in ENCODER_INPUTS} | {"controlnet_cond": np.concatenate(c)}))
        return jobs, uses

    def _sum(self, enc: dict, results, uses, rows: list[np.ndarray]) -> list[np.ndarray]:
        """Per skip (then mid): each request's ControlNet outputs times their scales, summed in the request's
        order (diffusers' MultiControlNetModel), at its rows; zero for rows without a ControlNet."""
        total = [np.zeros_like(enc[name]) for name in self.residual_names]
        for i, mine in enumerate(uses):
            for job, a, b, scale in mine:
                out = results[job]
                for k, name in enumerate(self.residual_names):
                    total[k][rows[i]] += out[name][a:b] * np.float32(scale)
        return total
