"""Open-loop load generator: replays a trace against a Triton model with tritonclient's asynchronous
gRPC client (sends never wait for answers), records each request's outcome against its deadline."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import DeadlineUnreachableError, OverloadedError, RefusedError, from_message
from .traces import Trace


@dataclass
class Record:
    arrival_s: float  # send time, from the run start
    height: int
    width: int
    deadline_ms: float
    latency_ms: float | None = None
    status: str = "pending"  # ok | refused (at admission) | dropped (hopeless later) | rejected (full) | error
    message: str = ""
    steps_run: int | None = None  # the response's `step` output
    image: np.ndarray | None = field(default=None, repr=False)  # kept with replay(keep_images=True)
    served_by: str | None = None  # a cascade entry's `model` output: "light" or "heavy"
    confidence: float | None = None  # a cascade entry's `confidence` output (the discriminator's P(real))
    prompt: str = ""

    @property
    def met(self) -> bool:
        return self.status == "ok" and self.latency_ms is not None and self.latency_ms <= self.deadline_ms


STATUS = {RefusedError: "refused", DeadlineUnreachableError: "dropped", OverloadedError: "rejected"}


def classify(message: str) -> str:
    """A failed request's status from the error class its message is tagged with (errors.wire_message)."""
    return STATUS.get(from_message(message), "error")


_ID = re.compile(r"\[request id: (\d+)\]")


def replay(url: str, model: str, trace: Trace, slo_ms: dict[tuple[int, int], float], guidance: float = 5.0,
           send_slo: bool = True, progress: bool = True, drain_s: float = 120.0, stream: bool = False,
           keep_images: bool = False) -> list[Record]:
    """Send every request at its trace time. stream=False: one async unary call each (any model, e.g.
    txt2img); stream=True: one gRPC stream to a decoupled model (the engine), answers matched by id."""
    from ..client import infer_inputs, make_client, request_arrays

    client = make_client("grpc", url)
    records: list[Record] = []
    sent_at: list[float] = []
    done = threading.Semaphore(0)
    t0 = time.perf_counter()

    def finish(rec: Record, sent: float, error, result=None) -> None:
        if rec.status != "pending":
            return
        rec.latency_ms = (time.perf_counter() - sent) * 1e3
        if error is None:
            rec.status = "ok"
            if result is not None:
                steps = result.as_numpy("step")
                rec.steps_run = int(steps.reshape(-1)[0]) if steps is not None else None
                if keep_images:
                    rec.image = result.as_numpy("image")[0]
                by, conf = result.as_numpy("model"), result.as_numpy("confidence")
                if by is not None:
                    b = by.reshape(-1)[0]
                    rec.served_by = b.decode() if isinstance(b, bytes) else str(b)
                if conf is not None:
                    rec.confidence = float(conf.reshape(-1)[0])
        else:
            rec.message = str(error.message() if hasattr(error, "message") else error)[:300]
            rec.status = classify(rec.message)
        done.release()

    def callback(rec: Record, sent: float, result, error) -> None:
        finish(rec, sent, error, result)

    def stream_callback(result, error) -> None:
        if error is not None:
            m = _ID.search(str(error.message() if hasattr(error, "message") else error))
            if m is None:
                return
            i = int(m.group(1))
        else:
            i = int(result.get_response().id)
        finish(records[i], sent_at[i], error, result)

    if stream:
        client.start_stream(callback=stream_callback)

    n = len(trace.requests)
    for i, r in enumerate(trace.requests):
        delay = t0 + r.t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        slo = slo_ms[(r.height, r.width)]
        arrays = request_arrays(r.prompt, r.height, r.width, r.steps, guidance, r.seed,
                                slo_ms=int(slo) if send_slo else None)
        sent = time.perf_counter()
        rec = Record(sent - t0, r.height, r.width, slo, prompt=r.prompt)
        records.append(rec)
        sent_at.append(sent)
        if stream:
            client.async_stream_infer(model, infer_inputs("grpc", arrays), request_id=str(i))
        else:
            client.async_infer(model, infer_inputs("grpc", arrays),
                               callback=lambda result, error, rec=rec, sent=sent: callback(rec, sent, result, error))
        if progress and (i + 1) % max(1, n // 20) == 0:
            print(f"\r[tessera] bench {model}: sent {i + 1}/{n}", end="", flush=True)
    deadline = time.perf_counter() + drain_s
    for _ in range(n):
        if not done.acquire(timeout=max(deadline - time.perf_counter(), 0.01)):
            break
    if stream:
        client.stop_stream()
    if progress:
        print(f"\r[tessera] bench {model}: {n} sent, {sum(r.status != 'pending' for r in records)} answered",
              flush=True)
    client.close()
    return records


def summarize(records: list[Record], duration_s: float | None = None) -> dict:
    n = len(records)
    lat = np.array([r.latency_ms for r in records if r.status == "ok"], dtype=float)
    per_res = {}
    for key in sorted({(r.height, r.width) for r in records}):
        sub = [r for r in records if (r.height, r.width) == key]
        per_res[f"{key[0]}x{key[1]}"] = {"n": len(sub), "slo_attainment": sum(r.met for r in sub) / len(sub)}
    return {
        "requests": n,
        "completed": int(sum(r.status == "ok" for r in records)),
        "dropped": int(sum(r.status == "dropped" for r in records)),
        "refused": int(sum(r.status == "refused" for r in records)),
        "rejected": int(sum(r.status == "rejected" for r in records)),
        "failed": int(sum(r.status in ("error", "pending") for r in records)),
        "slo_attainment": sum(r.met for r in records) / n if n else None,
        "goodput_rps": sum(r.met for r in records) / duration_s if duration_s else None,
        "p50_latency_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_latency_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "per_resolution": per_res,
        "raw": {k: [getattr(r, k) for r in records] for k in ("arrival_s", "latency_ms", "deadline_ms", "status")},
    }
