"""Denoiser workers the engine owns (issue 16): N processes, one torch thread (or one GPU) each, joined in one
`torch.distributed` world (gloo on CPU, NCCL on GPUs) with a process group for every aligned block of 2, 4, ...
workers. A step's placements say which workers run which requests: a request placed on k workers runs at degree
k (executors/sequence_parallel.py), requests sharing one worker are batched per resolution there, and groups on
disjoint workers run at the same time.

Why workers the engine owns rather than Triton instance groups (docs/instances.md): degree k > 1 needs the k
processes to exchange activations inside every attention layer, so they must share a communicator set up once,
and the scheduler must choose *which* processes run a request every round. Triton's instances of one model are
independent stubs with no communicator between them, and Triton (not the caller) chooses the instance a BLS call
lands on, so neither need can be met through instance groups.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..interfaces import CallStats, Inputs
from ..options import Family

log = logging.getLogger(__name__)

Place = tuple[int, ...]  # the workers a request runs on (its degree is the length)


def blocks(n: int) -> list[Place]:
    """The worker sets a request may be placed on: single workers, and aligned blocks of 2, 4, ... (<= n)."""
    out = [(i,) for i in range(n)]
    k = 2
    while k <= n:
        out += [tuple(range(s, s + k)) for s in range(0, n - k + 1, k)]
        k *= 2
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_key(members) -> str:
    return ",".join(map(str, members))


def _worker_main(rank: int, n: int, port: int, model_dir: str, family: str, device: str, threads: int, conn) -> None:
    """One worker: load the denoiser, join the world, then serve ("run", members, items) until ("stop",) or until
    the engine's end of the connection closes."""
    import torch
    import torch.distributed as dist

    from ..executors.denoise import to_host, to_model
    from ..executors.factory import load_denoiser_module
    from .sequence_parallel import parallel_forward

    torch.set_num_threads(threads)
    fam = Family(family)
    try:
        model = load_denoiser_module(Path(model_dir), fam)
        if device == "cuda":
            torch.cuda.set_device(rank)
            model = model.to(f"cuda:{rank}", torch.float16)
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
        groups = {_group_key(b): dist.new_group(list(b)) for b in blocks(n) if len(b) > 1}  # every rank, same order
        conn.send(("ready", rank, ""))
    except Exception as e:  # noqa: BLE001 - reported to the engine, which fails its start-up naming it
        conn.send(("error", rank, f"{type(e).__name__}: {e}"))
        return
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the engine is gone
            break
        if msg[0] == "stop":
            break
        _, members, items = msg
        k = len(members)
        group, me = groups.get(_group_key(members)), members.index(rank)
        try:
            t0 = time.perf_counter()
            outs = []
            with torch.no_grad():
                for it in items:  # the executor has already merged same-resolution requests into one item
                    t = to_model(model, {name: torch.from_numpy(v) for name, v in it.items()})
                    outs.append(to_host(parallel_forward(model, fam, t, group, k, me)))
            seconds = time.perf_counter() - t0
            conn.send(("ok", outs if me == 0 else None, seconds))
        except Exception as e:  # noqa: BLE001 - the engine fails the step naming it; the worker goes on
            conn.send(("error", f"{type(e).__name__}: {e}"))
    dist.destroy_process_group()


def main(argv: list[str]) -> None:
    from multiprocessing.connection import Client

    rank, n, port, model_dir, family, device, threads, address = argv
    conn = Client(address, family="AF_UNIX", authkey=bytes.fromhex(os.environ["TESSERA_WORKER_KEY"]))
    conn.send(int(rank))
    _worker_main(int(rank), int(n), int(port), model_dir, family, device, int(threads), conn)


def _python() -> str:
    """The interpreter for workers: this environment's python (a Triton Python-backend stub's sys.executable is
    the stub binary, not an interpreter)."""
    for cand in (Path(sys.prefix) / "bin" / "python3", Path(sys.prefix) / "bin" / "python"):
        if cand.exists():
            return str(cand)
    return sys.executable


class WorkerPool:
    """N denoiser worker processes; `run` sends each worker set its merged calls and waits for all of them.
    Workers are started as `python -m tessera.executors.workers` (not multiprocessing's spawn, which re-imports
    the parent's main module: a Triton stub has none) and connect back over an authenticated Unix socket."""

    def __init__(self, model_dir: str | Path, family: Family, n: int, device: str = "cpu", threads: int = 1,
                 start_timeout_s: float = 300.0):
        import subprocess
        from multiprocessing.connection import Listener

        if n < 1:
            raise ValueError(f"denoiser_workers: allowed >= 1, got {n}")
        self.n, self.family = n, family
        self._conns, self._procs = [None] * n, []
        key = os.urandom(16)
        # a Unix socket: over local TCP, a message sent as header + body met Nagle's delayed ACK (+40 ms a call)
        listener = Listener(family="AF_UNIX", authkey=key)
        port = _free_port()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TESSERA_WORKER_KEY=key.hex())
        try:
            for rank in range(n):
                cmd = [_python(), "-m", "tessera.executors.workers", str(rank), str(n), str(port), str(model_dir),
                       family.value, device, str(threads), listener.address]
                self._procs.append(subprocess.Popen(cmd, env=env))
            listener._listener._socket.settimeout(start_timeout_s)
            for _ in range(n):  # every worker says who it is first, then loads and joins the world
                conn = listener.accept()
                self._conns[conn.recv()] = conn
            for rank, conn in enumerate(self._conns):
                if not conn.poll(start_timeout_s):
                    raise OSError(f"worker {rank} not ready")
                status, _, detail = conn.recv()
                if status != "ready":
                    raise RuntimeError(f"denoiser_workers: worker {rank} failed to start: {detail}")
        except Exception as e:
            self.close()
            if isinstance(e, OSError):
                raise RuntimeError(f"denoiser_workers: workers did not start within {start_timeout_s:.0f} s: {e}") from e
            raise
        finally:
            listener.close()
        log.info("[tessera] %d denoiser workers ready (%s, %s)", n, family.value, device)

    def run(self, calls: list[tuple[Place, list[Inputs]]]) -> list[tuple[list[np.ndarray], float]]:
        """Every (workers, merged calls) at once; returns, per entry, the outputs and the compute seconds (the
        slowest member's). Raises if a worker failed (after collecting every reply, so the pool stays in step)."""
        for place, items in calls:
            for w in place:
                self._conns[w].send(("run", place, items))
        results, errors = [], []
        for place, _ in calls:
            outs, seconds = None, 0.0
            for w in place:
                reply = self._conns[w].recv()
                if reply[0] != "ok":
                    errors.append(f"worker {w}: {reply[1]}")
                    continue
                seconds = max(seconds, reply[2])
                outs = reply[1] if reply[1] is not None else outs
            results.append((outs, seconds))
        if errors:
            raise RuntimeError("denoiser workers failed: " + "; ".join(errors))
        return results

    def close(self) -> None:
        for c in self._conns:
            try:
                if c is not None:
                    c.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except Exception:  # noqa: BLE001 - a worker that does not stop is killed
                p.kill()
                p.wait()
        self._conns, self._procs = [], []


@dataclass(frozen=True, slots=True)
class PoolStats(CallStats):
    """CallStats plus, per call, its workers and the compute seconds the workers measured."""

    places: tuple[Place, ...] = ()
    seconds: tuple[float, ...] = ()


class PooledDenoiser:
    """The Denoiser over a WorkerPool: items placed on the same workers share calls (one per resolution); worker
    sets run at the same time. Unplaced items (None) go to worker 0."""

    mode = "concat"

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self.workers = pool.n

    def run(self, items: list[Inputs], adapters: list | None = None, controls: list | None = None,
            places: list[Place] | None = None) -> tuple[list[np.ndarray], PoolStats]:
        from .denoise import _concat, _split, no_controlnets

        no_controlnets(controls, "concat over denoiser workers")
        if adapters is not None and any(adapters):
            raise RuntimeError("adapters: denoiser workers cannot apply LoRA yet (needs denoiser_workers=1)")
        places = places or [(0,)] * len(items)
        calls: dict[tuple, list[int]] = {}
        for i, (it, place) in enumerate(zip(items, places, strict=True)):
            key = (tuple(place), it["sample"].shape[1:] + it["encoder_hidden_states"].shape[1:])
            calls.setdefault(key, []).append(i)
        by_place: dict[Place, list[list[int]]] = {}
        for (place, _), idxs in calls.items():
            by_place.setdefault(place, []).append(idxs)
        order = list(by_place)
        replies = self.pool.run([(p, [_concat([items[i] for i in idxs]) for idxs in by_place[p]]) for p in order])
        outs: list[np.ndarray | None] = [None] * len(items)
        batch, reqs, res, seconds = [], [], [], []
        for place, (merged_outs, secs) in zip(order, replies, strict=True):
            for idxs, out in zip(by_place[place], merged_outs, strict=True):
                for i, o in zip(idxs, _split(out, [items[i] for i in idxs]), strict=True):
                    outs[i] = o
                batch.append(sum(items[i]["sample"].shape[0] for i in idxs))
                reqs.append(len(idxs))
                res.append(1)
            seconds.append(secs)
        return outs, PoolStats(tuple(batch), tuple(res), tuple(reqs), tuple(order), tuple(seconds))


if __name__ == "__main__":
    main(sys.argv[1:])
