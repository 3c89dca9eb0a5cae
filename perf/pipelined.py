"""Pipelined decode (issue 16, QoS-Diff): throughput at saturation with finished requests decoded on the step
loop (`decode=loop`) against decoded on a thread of their own beside the next steps (`decode=pipelined`), one
server, the same requests, rounds interleaved.

Two engines over the tiny UNet (in-process ONNX Runtime, one thread per session, step-level batching), a
closed loop of `--clients` clients sending back to back until `--requests` are answered; throughput = images /
wall time. On this 2-core host the step loop holds one core; a pipelined decode runs on the other.
Writes perf/results/pipelined.json (+ .png). Run: python -m perf.pipelined
"""

from __future__ import annotations

import random
import statistics

from perf.batching import closed_loop
from perf.common import RESULTS, parser, tiny_unet_repo, write_result
from perf.slo import served_state

SIZES = ((128, 128), (256, 256))
MODES = ("loop", "pipelined")


def build_parser():
    ap = parser("pipelined", __doc__)
    ap.add_argument("--requests", type=int, default=48, help="requests per round")
    ap.add_argument("--clients", type=int, default=8, help="closed-loop clients, each sending back to back")
    ap.add_argument("--steps", type=int, default=8, help="denoising steps per request")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per mode")
    ap.add_argument("--seed", type=int, default=0, help="seed of the requests' sizes")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tessera.server import TritonServer
    from tessera_export.repository import add_engine

    work, _, repo = tiny_unet_repo("pipelined")
    common = dict(executor="local", policy="step-fcfs", max_batch=8, profile_sizes="128x128,256x256")
    for mode in MODES:
        add_engine(repo, "engine", f"engine_{mode}", entry=f"txt2img_{mode}", decode=mode, **common)
    rng = random.Random(args.seed)
    jobs = [(*rng.choice(SIZES), rng.randrange(1 << 30)) for _ in range(args.requests)]
    rounds: dict[str, list[dict]] = {m: [] for m in MODES}
    with TritonServer(repo, log_path=work / "server.log") as server:
        for mode in MODES:
            closed_loop(server, f"txt2img_{mode}", jobs[:4], 2, 2)  # warm-up
        for r in range(args.rounds):
            for mode in MODES if r % 2 == 0 else MODES[::-1]:
                res = closed_loop(server, f"txt2img_{mode}", jobs, args.clients, args.steps)
                res.pop("latency_s")
                rounds[mode].append(res)
                print(f"round {r} {mode:9s} {res['throughput_img_s']:.3f} img/s ({res['completed']} done, "
                      f"{len(res['errors'])} errors)", flush=True)
        terms = {m: served_state(server.metrics_url, f"engine_{m}")["terms"] for m in MODES}
    mean = {m: statistics.mean(x["throughput_img_s"] for x in rounds[m]) for m in MODES}
    per_round = [p["throughput_img_s"] / q["throughput_img_s"]
                 for p, q in zip(rounds["pipelined"], rounds["loop"], strict=True)]
    config = vars(args) | {"sizes": SIZES, "engine": common, "model": "tiny UNet"}
    write_result("pipelined", config, {
        "rounds": rounds, "throughput_img_s": mean, "ratio_pipelined_over_loop": mean["pipelined"] / mean["loop"],
        "ratio_per_round": per_round, "served_cost_terms": terms,
        "all_answered": all(x["completed"] == args.requests and not x["errors"] for m in MODES for x in rounds[m])})
    _plot(rounds)
    print(f"pipelined / loop throughput: {mean['pipelined'] / mean['loop']:.3f} (rounds {[round(x, 3) for x in per_round]})")
    return 0


def _plot(rounds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, m in enumerate(MODES):
        vals = [x["throughput_img_s"] for x in rounds[m]]
        ax.bar(i, statistics.mean(vals), color=f"C{i}", alpha=0.6)
        ax.plot([i] * len(vals), vals, "k.")
    ax.set_xticks(range(len(MODES)), [f"decode={m}" for m in MODES])
    ax.set_ylabel("images / s (closed loop, saturated)")
    ax.set_title("Decode on the step loop vs pipelined (tiny UNet, CPU)", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "pipelined.png", dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
