"""LoRA serving (issue 14): bounded asynchronous loading against a synchronous load, and requests with
different adapters in one step against one adapter set per step, through the real server.

Part 1, a lone request whose adapter is not in memory and whose load is slowed by `--delay-ms` (emulating
remote storage; the engines' `lora_load_delay_ms`, cache budget 0 so every request loads again), three ways,
interleaved round by round: no adapter, synchronous load (`lora_k=0`: the request waits before its first
step) and BAL (`lora_k=K`: it steps on the base model while the adapter loads and waits at step K only if
it is still missing). Reported as median latencies and ratios to no adapter.

Part 2, closed loop: `--clients` clients each send their next request when the last one is answered, for
`--duration-s` per mode, policy `rounds`, every request with an explicit deadline (`--slo-factor` x the lone
no-adapter latency at that size; a client whose request is refused or dropped waits one such latency before
its next). Adapters: 8 random LoRAs on the tiny UNet, drawn with Zipf popularity
(`--zipf`), loaded before timing (the cache holds them all). Modes: `mixed` (different adapters and none in
one step, per-row application), `one_set` (`lora_batching=one_set`: one adapter set per step, the most
urgent request's, as servers that merge adapters do), `none` (the same requests without adapters: the
ceiling). Reported: throughput, SLO attainment, p50/p99 latency, and the ratios mixed / one_set.

Writes perf/results/lora.json (+ .png). Run: python -m perf.lora
"""

from __future__ import annotations

import argparse
import queue
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from perf.common import RESULTS, parser, tiny_unet_repo, write_result

ADAPTERS = 8
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
PROMPT = "a red circle at top left"


def build_parser() -> argparse.ArgumentParser:
    ap = parser("lora", __doc__)
    ap.add_argument("--delay-ms", type=int, default=1000, help="part 1: emulated load time of the adapter")
    ap.add_argument("--k", type=int, default=10, help="part 1: BAL's K (SwiftDiffusion: 10 of 50)")
    ap.add_argument("--lone-size", type=int, default=256, help="part 1: image edge in pixels")
    ap.add_argument("--lone-steps", type=int, default=50, help="part 1: denoising steps")
    ap.add_argument("--runs", type=int, default=5, help="part 1: timed rounds (each variant once per round)")
    ap.add_argument("--clients", type=int, default=4, help="part 2: closed-loop clients")
    ap.add_argument("--duration-s", type=float, default=45.0, help="part 2: seconds per mode")
    ap.add_argument("--size", type=int, default=128, help="part 2: image edge in pixels")
    ap.add_argument("--steps", type=int, default=20, help="part 2: denoising steps")
    ap.add_argument("--zipf", type=float, default=1.1, help="part 2: Zipf exponent of adapter popularity")
    ap.add_argument("--slo-factor", type=float, default=4.0,
                    help="part 2: deadline = factor x the lone no-adapter latency")
    ap.add_argument("--guidance", type=float, default=5.0, help="guidance scale (> 1: CFG)")
    ap.add_argument("--seed", type=int, default=0, help="adapters and the clients' draws")
    return ap


class StreamClient:
    """One gRPC stream; `run` sends one request and waits for its final answer."""

    def __init__(self, url: str):
        from tessera.client import make_client

        self.client = make_client("grpc", url)
        self.answers: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.answers.put((result, error)))
        self.n = 0

    def run(self, model: str, arrays: dict) -> tuple[float, str | None, int | None]:
        """(seconds, error message or None, steps run)."""
        from tessera.client import infer_inputs

        self.n += 1
        t0 = time.perf_counter()
        self.client.async_stream_infer(model, infer_inputs("grpc", arrays, declared_types=False),
                                       request_id=str(self.n))
        result, error = self.answers.get(timeout=600)
        seconds = time.perf_counter() - t0
        if error is not None:
            return seconds, str(error.message() if hasattr(error, "message") else error), None
        steps = result.as_numpy("step")
        return seconds, None, None if steps is None else int(steps.reshape(-1)[0])

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


LORA_COUNTERS = ("tessera_lora_loads_total", "tessera_lora_joins_total", "tessera_lora_steps_before_join_total",
                 "tessera_lora_wait_steps_total")


def scrape(server, model: str) -> dict[str, float]:
    """The engine's adapter counters this benchmark reports (perf.slo.scrape reads Triton's metrics)."""
    from perf.slo import scrape as scrape_metric

    return {name: scrape_metric(server.metrics_url, name, model) or 0.0 for name in LORA_COUNTERS}


def zipf_weights(n: int, s: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from diffusers import UNet2DConditionModel

    from tessera.client import request_arrays
    from tessera.server import TritonServer
    from tessera_export.repository import add_engine
    from tessera_export.tiny import write_random_lora

    work, pipeline, repo = tiny_unet_repo("lora")
    unet = UNet2DConditionModel.from_pretrained(Path(pipeline) / "unet").eval()
    loras = work / "loras"
    names = [f"style{i}" for i in range(ADAPTERS)]
    for i, name in enumerate(names):
        write_random_lora(unet, loras / name, seed=args.seed + i + 1, std=0.3, target_modules=TARGETS)
    common = dict(executor="local", denoiser_runtime="torch", lora_dir=str(loras), policy="rounds")
    add_engine(repo, "engine", "lora_sync", lora_k=0, lora_load_delay_ms=args.delay_ms, lora_cache_mb=0, **common)
    add_engine(repo, "engine", "lora_bal", lora_k=args.k, lora_load_delay_ms=args.delay_ms, lora_cache_mb=0,
               **common)
    add_engine(repo, "engine", "lora_mixed", **common)
    add_engine(repo, "engine", "lora_one_set", lora_batching="one_set", **common)

    with TritonServer(repo, log_path=work / "server.log") as server:
        lone = part_lone(server, args, names, request_arrays)
        loop = part_closed_loop(server, args, names, request_arrays)

    config = vars(args) | {"adapters": ADAPTERS, "adapter_rank": 4, "adapter_targets": TARGETS,
                           "model": "tiny UNet pipeline (tessera build-tiny --kind unet), executor local, "
                                    "denoiser_runtime torch", "protocol": "grpc stream to the engine",
                           "policy": "rounds"}
    path = write_result("lora", config, {"lone": lone, "closed_loop": loop})
    _plot(lone, loop, RESULTS / "lora.png", args)
    print(f"lone ratios: {lone['ratio_vs_none']}")
    print("closed loop: " + ", ".join(f"{m} {r['throughput_rps']:.2f} req/s SLO {r['slo_attainment']:.2f}"
                                      for m, r in loop["modes"].items()))
    print(f"mixed / one_set: {loop['ratio_mixed_vs_one_set']}")
    print(f"wrote {path}")
    return 0


def part_lone(server, args, names, request_arrays) -> dict:
    client = StreamClient(server.grpc_url)
    variants = {"none": ("lora_bal", None), "sync": ("lora_sync", names[0]), "bal": ("lora_bal", names[0])}
    times: dict[str, list[float]] = {k: [] for k in variants}
    before = {m: scrape(server, m) for m in ("lora_sync", "lora_bal")}
    for i in range(1 + args.runs):  # round 0 warms up (not timed)
        for name, (model, lora) in variants.items():
            arrays = request_arrays(PROMPT, args.lone_size, args.lone_size, args.lone_steps, args.guidance, i,
                                    lora=lora)
            seconds, error, _ = client.run(model, arrays)
            if error is not None:
                raise RuntimeError(f"{name}: {error}")
            if i:
                times[name].append(seconds * 1e3)
        if i:
            print(f"lone round {i}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items()), flush=True)
    client.close()
    rounds = 1 + args.runs
    deadline = time.monotonic() + 10  # the metrics thread applies each answer's counters just after it
    while True:
        after = {m: scrape(server, m) for m in ("lora_sync", "lora_bal")}
        joined = [after[m].get("tessera_lora_joins_total", 0.0) - before[m].get("tessera_lora_joins_total", 0.0)
                  for m in after]
        if min(joined) >= rounds or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    med = {k: statistics.median(v) for k, v in times.items()}

    def delta(model: str, name: str) -> float:
        return after[model].get(name, 0.0) - before[model].get(name, 0.0)

    return {
        "latency_ms": times, "median_ms": med,
        "ratio_vs_none": {k: med[k] / med["none"] for k in med},
        "bal_vs_sync": med["bal"] / med["sync"],
        "metrics": {m: {"loads": delta(m, "tessera_lora_loads_total"),
                        "steps_before_join": delta(m, "tessera_lora_steps_before_join_total"),
                        "joins": delta(m, "tessera_lora_joins_total"),
                        "wait_steps": delta(m, "tessera_lora_wait_steps_total")}
                    for m in ("lora_sync", "lora_bal")},
    }


def part_closed_loop(server, args, names, request_arrays) -> dict:
    size, steps = args.size, args.steps
    warm = StreamClient(server.grpc_url)
    for model in ("lora_mixed", "lora_one_set"):
        for name in names:  # every adapter in memory before timing
            _, error, _ = warm.run(model, request_arrays(PROMPT, size, size, steps, args.guidance, 0, lora=name))
            if error is not None:
                raise RuntimeError(error)
    alone = []
    for i in range(3):
        seconds, _, _ = warm.run("lora_mixed", request_arrays(PROMPT, size, size, steps, args.guidance, i))
        alone.append(seconds * 1e3)
    warm.close()
    isolated_ms = statistics.median(alone)
    slo_ms = args.slo_factor * isolated_ms
    weights = zipf_weights(len(names), args.zipf)
    modes = {"mixed": ("lora_mixed", True), "one_set": ("lora_one_set", True), "none": ("lora_mixed", False)}
    out = {}
    for mode, (model, with_lora) in modes.items():
        out[mode] = closed_loop(server, model, args, names if with_lora else None, weights, slo_ms, request_arrays)
        r = out[mode]
        print(f"{mode}: {r['completed']} answered, {r['throughput_rps']:.2f} req/s, SLO {r['slo_attainment']:.2f}",
              flush=True)
    return {"isolated_ms": isolated_ms, "slo_ms": slo_ms, "zipf_weights": weights.tolist(), "modes": out,
            "ratio_mixed_vs_one_set": {
                "throughput": out["mixed"]["throughput_rps"] / max(out["one_set"]["throughput_rps"], 1e-9),
                "slo_attainment": out["mixed"]["slo_attainment"] / max(out["one_set"]["slo_attainment"], 1e-9)},
            "ratio_mixed_vs_none": {
                "throughput": out["mixed"]["throughput_rps"] / max(out["none"]["throughput_rps"], 1e-9)}}


def closed_loop(server, model, args, names, weights, slo_ms, request_arrays) -> dict:
    records: list[tuple[float, float, str | None, str | None, int | None]] = []  # (sent, ms, lora, error, steps)
    lock = threading.Lock()
    t0 = time.perf_counter()
    end = t0 + args.duration_s
    backoff_s = slo_ms / args.slo_factor / 1e3

    def client_loop(c: int) -> None:
        rng = np.random.default_rng([args.seed, c])
        client = StreamClient(server.grpc_url)
        n = 0
        while time.perf_counter() < end:
            lora = names[rng.choice(len(names), p=weights)] if names else None
            arrays = request_arrays(PROMPT, args.size, args.size, args.steps, args.guidance, 1000 * c + n,
                                    slo_ms=int(slo_ms), lora=lora)
            sent = time.perf_counter() - t0
            try:
                seconds, error, steps = client.run(model, arrays)
            except Exception as e:  # noqa: BLE001 - a lost answer is a failed request, not a lost record
                seconds, error, steps = time.perf_counter() - t0 - sent, f"client: {type(e).__name__}", None
            with lock:
                records.append((sent, seconds * 1e3, lora, error, steps))
            n += 1
            if error is not None:  # refused or dropped: the client comes back after one isolated latency,
                time.sleep(backoff_s)  # as a client retrying elsewhere would (not at once, in a tight loop)
        client.close()

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [ms for _, ms, _, e, _ in records if e is None]
    full = [(ms, steps) for _, ms, _, e, steps in records if e is None and steps == args.steps]
    met = sum(1 for ms, _ in full if ms <= slo_ms)  # on time with every step asked for (a degraded answer is not)
    errors = sorted({e.split(":")[0] for *_, e, _ in records if e is not None})
    return {"requests": len(records), "completed": len(ok), "degraded": len(ok) - len(full),
            "failed": len(records) - len(ok), "errors": errors,
            "wall_s": wall, "throughput_rps": len(ok) / wall, "goodput_rps": met / wall,
            "slo_attainment": met / len(records) if records else 0.0,
            "p50_ms": float(np.percentile(ok, 50)) if ok else None,
            "p99_ms": float(np.percentile(ok, 99)) if ok else None,
            "adapters_used": {n: sum(1 for r in records if r[2] == n) for n in (names or [])},
            "raw": {"sent_s": [r[0] for r in records], "latency_ms": [r[1] for r in records],
                    "lora": [r[2] for r in records], "error": [r[3] for r in records],
                    "steps_run": [r[4] for r in records]}}


def _plot(lone: dict, loop: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    keys = list(lone["median_ms"])
    a.bar(keys, [lone["median_ms"][k] for k in keys], color=["#888", "#c44", "#4a4"])
    for i, k in enumerate(keys):
        a.text(i, lone["median_ms"][k], f"{lone['ratio_vs_none'][k]:.2f}x", ha="center", va="bottom")
    a.set_ylabel("median latency (ms)")
    a.set_title(f"lone request, uncached adapter, load {args.delay_ms} ms, K={args.k}/{args.lone_steps}")
    modes = list(loop["modes"])
    x = np.arange(len(modes))
    b.bar(x - 0.2, [loop["modes"][m]["throughput_rps"] for m in modes], 0.4, label="throughput (req/s)")
    b.bar(x + 0.2, [loop["modes"][m]["slo_attainment"] for m in modes], 0.4, label="SLO attainment")
    b.set_xticks(x, modes)
    b.set_title(f"closed loop, {args.clients} clients, 8 adapters (Zipf {args.zipf}), rounds")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
