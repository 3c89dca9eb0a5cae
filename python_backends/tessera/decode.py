"""Where finished requests are decoded (issue 16, QoS-Diff's pipelining). The engine hands each finished request
to its decoder in step (5) and answers whatever the decoder has ready: at once on the loop, or at the first step
boundary after its own thread is done.

  loop       decode on the step loop, earliest deadline first, answered at once (the default): every decode
             holds the next step.
  pipelined  decode on a thread of its own (ONNX Runtime and torch release the GIL: a core of its own on a CPU
             host, a stream beside the denoiser's on a GPU), concurrently with the next denoising steps; the
             step loop only answers.

The simulator runs VirtualPipelinedDecode: one decode lane on the virtual clock.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from .options import Decode
from .request import RequestState


@dataclass(frozen=True, slots=True)
class Decoded:
    """A finished request's decode: its image or the error it raised, its seconds, and when it was done."""

    state: RequestState
    image: Any
    error: Exception | None
    seconds: float
    done_s: float


def _decode(pipeline, clock, s: RequestState) -> Decoded:
    t0 = clock()
    try:
        image, error = pipeline.finish(s.run), None
    except Exception as e:  # noqa: BLE001 - the engine fails this request alone, naming the decode
        image, error = None, e
    end = clock()
    return Decoded(s, image, error, end - t0, end)


class LoopDecode:
    """Decode at once, on the caller's (the step loop's) thread."""

    def __init__(self, pipeline, clock):
        self.pipeline, self.clock = pipeline, clock
        self._ready: list[Decoded] = []

    def submit(self, s: RequestState) -> None:
        self._ready.append(_decode(self.pipeline, self.clock, s))

    def collect(self, wait_s: float = 0.0) -> list[Decoded]:
        out, self._ready = self._ready, []
        return out

    def close(self) -> None:
        pass


class PipelinedDecode:
    """Decode on `threads` threads of its own; collect() hands back what is done."""

    def __init__(self, pipeline, clock, threads: int = 1):
        self.pipeline, self.clock = pipeline, clock
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tessera-decode")
        self._futures: deque = deque()

    def submit(self, s: RequestState) -> None:
        self._futures.append(self._pool.submit(_decode, self.pipeline, self.clock, s))

    def collect(self, wait_s: float = 0.0) -> list[Decoded]:
        """The decodes done by now (waiting up to `wait_s` for the first when none is), in submission order."""
        if wait_s > 0 and self._futures and not any(f.done() for f in self._futures):
            wait(list(self._futures), timeout=wait_s, return_when=FIRST_COMPLETED)
        out, left = [], deque()
        for f in self._futures:
            (out if f.done() else left).append(f)
        self._futures = left
        return [f.result() for f in out]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class VirtualPipelinedDecode:
    """PipelinedDecode on the simulator's virtual clock: one decode lane, each decode the cost model's finish
    time, started when the lane is free; waiting moves the clock to the next one done."""

    def __init__(self, clock, cost):
        self.clock, self.cost = clock, cost
        self._free_s = 0.0
        self._queue: deque[Decoded] = deque()

    def submit(self, s: RequestState) -> None:
        seconds = self.cost.finish_s(s)
        self._free_s = max(self._free_s, self.clock.t) + seconds
        self._queue.append(Decoded(s, None, None, seconds, self._free_s))

    def collect(self, wait_s: float = 0.0) -> list[Decoded]:
        if wait_s > 0 and self._queue and self._queue[0].done_s > self.clock.t:
            self.clock.t = self._queue[0].done_s
        out = []
        while self._queue and self._queue[0].done_s <= self.clock.t:
            out.append(self._queue.popleft())
        return out

    def close(self) -> None:
        pass


def make_decoder(mode: Decode | str, pipeline, clock):
    if Decode.parse("decode", mode) is Decode.PIPELINED:
        return PipelinedDecode(pipeline, clock)
    return LoopDecode(pipeline, clock)
