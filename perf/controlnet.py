"""ControlNet and CFG (latent) parallelism through the real server (issue 15), heavy reference + the
reference ControlNets, one run:

1. Lone requests (one at a time, interleaved round by round): 0, 1 and 2 ControlNets with the ControlNets
   run after the UNet encoder (serial, `control_parallel=off`), beside it (parallel, the default) and one
   step behind (async); CFG in one call against its two halves at once (`cfg_parallel=on`).
2. Each ratio next to its ideal from the component times measured in the same run (the exported ONNX
   parts, in-process, at the request's shape), Amdahl-style: the rest of a request (text encoder, decode,
   serving) is the no-ControlNet latency minus its denoiser time; per step, serial = encoder + sum of
   ControlNets + decoder; parallel = span(encoder, each ControlNet) + decoder and async = span(encoder +
   decoder, each ControlNet), where span is the shortest time the machine's cores (2 here) run those
   independent tasks in: max(longest, total / cores); CFG: two one-row calls at once = one one-row call
   (`cfg_parallel=on` splits every call, `auto` only calls of at most 2 rows: a lone latent).
3. Throughput at saturation: a closed loop of `--concurrency` clients per setting (requests batched
   into shared steps), images/s, so what parallelism costs per instance shows once the cores are full.

Writes perf/results/controlnet.json (+ .png). Run: python -m perf.controlnet
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from perf.common import RESULTS, parser, write_result

MODELS = Path(__file__).resolve().parents[1] / "quality_models"
PROMPT = "a red circle at top left"
# variant -> (entry model, ControlNets)
VARIANTS = {
    "cn0": ("txt2img", ()),
    "cn1_serial": ("txt2img_serial", ("silhouette",)),
    "cn1_parallel": ("txt2img", ("silhouette",)),
    "cn1_async": ("txt2img_async", ("silhouette",)),
    "cn2_serial": ("txt2img_serial", ("silhouette", "box")),
    "cn2_parallel": ("txt2img", ("silhouette", "box")),
    "cn2_async": ("txt2img_async", ("silhouette", "box")),
    "cfg_two_halves": ("txt2img_cfg2", ()),
    "cfg_auto": ("txt2img_cfgauto", ()),
}


def build_parser() -> argparse.ArgumentParser:
    ap = parser("controlnet", __doc__)
    ap.add_argument("--runs", type=int, default=5, help="timed rounds of lone requests (each variant once a round)")
    ap.add_argument("--size", type=int, default=256, help="image edge, pixels")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps")
    ap.add_argument("--guidance", type=float, default=4.0, help="guidance scale (> 1: CFG, two rows a request)")
    ap.add_argument("--concurrency", type=int, default=2, help="closed-loop clients for the throughput part")
    ap.add_argument("--requests", type=int, default=8, help="requests per setting in the throughput part")
    ap.add_argument("--component-calls", type=int, default=15, help="timed calls per component (median)")
    return ap


def control_inputs(names: tuple[str, ...], size: int) -> dict:
    if not names:
        return {}
    from tessera.quality.shapes import Label
    from tessera.quality.train_controlnet import scene

    maps = [scene(Label(0, 0, 3), size, size, np.random.default_rng(1), k)[1] for k in names]
    return {"controlnet": ",".join(names),
            "control_image": np.concatenate([np.repeat(m[..., None], 3, axis=2) for m in maps], axis=2)}


def component_ms(repo: Path, size: int, calls: int, rows: int = 2) -> dict[str, float]:
    """Median ms of each exported part at the request's shape (`rows` latents), in-process ORT, one thread."""
    from tessera.executors.ort import OrtModel

    g = np.random.default_rng(0)
    h = size // 8
    base = {"sample": g.standard_normal((rows, 4, h, h)).astype(np.float32),
            "timestep": np.full(rows, 500.0, np.float32),
            "encoder_hidden_states": g.standard_normal((rows, 77, 64)).astype(np.float32)}
    models = {"unet": "denoiser", "encoder": "denoiser_encoder", "decoder": "denoiser_decoder",
              "controlnet_silhouette": "controlnet_silhouette", "controlnet_box": "controlnet_box"}
    out = {}
    enc_out = None
    for key, name in models.items():
        model = OrtModel(repo / name / "1" / "model.onnx")
        feeds = dict(base)
        if key.startswith("controlnet"):
            feeds["controlnet_cond"] = g.random((rows, 3, size, size), dtype=np.float32)
        if key == "decoder":
            feeds = {k: v for k, v in enc_out.items() if k != "emb"} | {"emb": enc_out["emb"],
                                                                        "encoder_hidden_states": base["encoder_hidden_states"]}
        times = []
        for i in range(calls + 3):
            t0 = time.perf_counter()
            res = model.run(feeds)
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1e3)
        if key == "encoder":
            enc_out = res
        out[key] = statistics.median(times)
    one = OrtModel(repo / "denoiser" / "1" / "model.onnx")
    half = {k: v[:1] for k, v in base.items()}
    times = []
    for i in range(calls + 3):
        t0 = time.perf_counter()
        one.run(half)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    out["unet_one_row"] = statistics.median(times)
    return out


def span(chains: list[float], cores: int) -> float:
    """The shortest time `cores` cores can run independent tasks of these lengths in (each task on one core
    at a time, preemption allowed): the longest task, or the total shared out evenly, whichever is longer."""
    return max(max(chains), sum(chains) / cores)


def ideals(comp: dict[str, float], lone: dict[str, float], steps: int, cores: int = 2) -> dict[str, dict]:
    """Amdahl-style ideal speed-ups from the component times (module docstring), on `cores` cores."""
    other = max(lone["cn0"] - steps * comp["unet"], 0.0)
    enc, dec = comp["encoder"], comp["decoder"]
    nets = {1: [comp["controlnet_silhouette"]], 2: [comp["controlnet_silhouette"], comp["controlnet_box"]]}
    out = {}
    for k in (1, 2):
        serial = other + steps * (enc + sum(nets[k]) + dec)
        out[f"cn{k}_parallel_vs_serial"] = {"measured": lone[f"cn{k}_serial"] / lone[f"cn{k}_parallel"],
                                            "ideal": serial / (other + steps * (span([enc, *nets[k]], cores) + dec))}
        out[f"cn{k}_async_vs_serial"] = {"measured": lone[f"cn{k}_serial"] / lone[f"cn{k}_async"],
                                         "ideal": serial / (other + steps * span([enc + dec, *nets[k]], cores))}
        out[f"cn{k}_serial_vs_cn0"] = {"measured": lone[f"cn{k}_serial"] / lone["cn0"],
                                       "predicted": serial / (other + steps * comp["unet"])}
    cfg_ideal = (other + steps * comp["unet"]) / (other + steps * comp["unet_one_row"])
    out["cfg_two_halves_vs_one_call"] = {"measured": lone["cn0"] / lone["cfg_two_halves"], "ideal": cfg_ideal}
    out["cfg_auto_vs_one_call"] = {"measured": lone["cn0"] / lone["cfg_auto"], "ideal": cfg_ideal}
    for v in out.values():
        v.update({k: round(x, 3) for k, x in v.items()})
        if "ideal" in v:
            v["of_ideal"] = round((v["measured"] - 1) / (v["ideal"] - 1), 3) if v["ideal"] > 1 else None
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from tessera.client import infer, make_client, request_arrays
    from tessera.config import EngineConfig
    from tessera.quality.harness import generate_served
    from tessera.quality.shapes import all_labels
    from tessera.server import TritonServer
    from tessera_export.repository import add_engine, export_pipeline

    t_start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="tessera-controlnet-"))
    repo = work / "repo"
    served = EngineConfig(executor="local", policy="step-fcfs")  # every request served; latency, not deadlines
    export_pipeline(MODELS / "heavy", repo, engine_config=served, progress=lambda *_: None,
                    controlnets={k: MODELS / "controlnet" / k for k in ("silhouette", "box")})
    add_engine(repo, "engine", "engine_serial", entry="txt2img_serial", control_parallel="off")
    add_engine(repo, "engine", "engine_async", entry="txt2img_async", control_mode="async")
    add_engine(repo, "engine", "engine_cfg2", entry="txt2img_cfg2", cfg_parallel="on")
    add_engine(repo, "engine", "engine_cfgauto", entry="txt2img_cfgauto", cfg_parallel="auto")
    comp = component_ms(repo, args.size, args.component_calls)
    print(f"[tessera] controlnet: component ms at {args.size}px, 2 rows: {comp}", flush=True)
    lone_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    throughput = {}
    with TritonServer(repo, log_path=work / "server.log") as server:
        client = make_client("grpc", server.grpc_url)
        for i in range(2 + args.runs):  # 2 warm-up rounds
            for variant, (model, names) in VARIANTS.items():
                arrays = request_arrays(PROMPT, args.size, args.size, args.steps, args.guidance, i,
                                        **control_inputs(names, args.size))
                t0 = time.perf_counter()
                infer(client, "grpc", arrays, model=model)
                if i >= 2:
                    lone_ms[variant].append((time.perf_counter() - t0) * 1e3)
            if i >= 2:
                print(f"[tessera] controlnet round {i - 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in lone_ms.items()),
                      flush=True)
        client.close()
        labels = all_labels()
        for variant, (model, names) in VARIANTS.items():
            jobs = [(labels[j % len(labels)], 100 + j, (args.size, args.size)) for j in range(args.requests)]
            extra = control_inputs(names, args.size)
            t0 = time.monotonic()
            generate_served(server, model, jobs, args.steps, args.concurrency, extra=lambda i: extra)
            wall = time.monotonic() - t0
            throughput[variant] = {"images_per_s": round(args.requests / wall, 4), "wall_s": round(wall, 2)}
            print(f"[tessera] controlnet throughput {variant}: {throughput[variant]}", flush=True)
    lone = {k: statistics.median(v) for k, v in lone_ms.items()}
    ratios = ideals(comp, lone, args.steps, os.cpu_count() or 1)
    tput = {k: v["images_per_s"] for k, v in throughput.items()}
    saturation = {
        "cn1_parallel_vs_serial": round(tput["cn1_parallel"] / tput["cn1_serial"], 3),
        "cn2_parallel_vs_serial": round(tput["cn2_parallel"] / tput["cn2_serial"], 3),
        "cn1_async_vs_serial": round(tput["cn1_async"] / tput["cn1_serial"], 3),
        "cn2_async_vs_serial": round(tput["cn2_async"] / tput["cn2_serial"], 3),
        "cfg_two_halves_vs_one_call": round(tput["cfg_two_halves"] / tput["cn0"], 3),
        "cfg_auto_vs_one_call": round(tput["cfg_auto"] / tput["cn0"], 3),
    }
    result = {"component_ms": comp, "lone_median_ms": lone, "lone_ms": lone_ms, "lone_ratios": ratios,
              "throughput": throughput, "throughput_ratios": saturation}
    config = vars(args) | {"model": "heavy reference (quality_models/heavy) + quality_models/controlnet, executor "
                           "local, ORT one intra-op thread per part", "cores": os.cpu_count(),
                           "wall_s": round(time.monotonic() - t_start)}
    path = write_result("controlnet", config, result)
    _plot(lone, ratios, saturation, RESULTS / "controlnet.png")
    print(f"[tessera] controlnet: lone ratios {ratios}; saturation {saturation}; wrote {path}")
    return 0


def _plot(lone: dict, ratios: dict, saturation: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(list(lone), list(lone.values()), color=["#888", "#c84", "#4a4", "#48c", "#c84", "#4a4", "#48c", "#a4a", "#a4a"])
    a.set_ylabel("lone request, median ms")
    a.tick_params(axis="x", rotation=45)
    keys = [k for k in ratios if "ideal" in ratios[k]]
    x = np.arange(len(keys))
    b.bar(x - 0.27, [ratios[k]["measured"] for k in keys], 0.27, label="lone, measured", color="#4a4")
    b.bar(x, [ratios[k]["ideal"] for k in keys], 0.27, label="lone, ideal (Amdahl)", color="#ccc")
    b.bar(x + 0.27, [saturation.get(k, np.nan) for k in keys], 0.27, label="at saturation", color="#48c")
    b.axhline(1.0, color="k", lw=0.8)
    b.set_xticks(x, keys, rotation=30, ha="right", fontsize=8)
    b.set_ylabel("speed-up")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
