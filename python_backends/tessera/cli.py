"""`tessera` command line: build-tiny, export, serve, generate."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from .errors import TesseraError
from .options import (CfgParallel, ControlMode, Decode, DenoiseMode, DiscriminatorInput, EarlyRefusal, Executor,
                      OnHopeless, Placement, PolicyName, Routing, Runtime, Switch)


def _cmd_build_tiny(a: argparse.Namespace) -> int:
    from tessera_export.tiny import build_tiny

    _single_thread()
    build_tiny(a.dir, kind=a.kind, seed=a.seed)
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from tessera_export.repository import export_pipeline

    from .inputs import Limits

    _single_thread()
    from .config import EngineConfig

    limits = Limits(min_size=a.min_size, max_size=a.max_size, max_steps=a.max_steps)
    if a.executor is None:
        a.executor = Executor.LOCAL.value if a.target == "cpu" else Executor.BLS.value
    config = EngineConfig(
        policy=a.policy, max_batch=a.max_batch, max_in_flight=a.max_in_flight, executor=a.executor,
        denoiser_runtime=a.denoiser_runtime, denoise_mode=a.denoise_mode, patch_size=a.patch_size,
        tile_size=a.tile_size, tile_overlap=a.tile_overlap, on_hopeless=a.on_hopeless, early_refusal=a.early_refusal,
        cfg_parallel=a.cfg_parallel, control_parallel=a.control_parallel, control_mode=a.control_mode,
        controlnet_cache=a.controlnet_cache, controlnet_cache_mb=a.controlnet_cache_mb,
        denoiser_workers=a.denoiser_workers, placement=a.placement, fixed_degree=a.fixed_degree, rssp=a.rssp,
        decode=a.decode,
    )
    controlnets = {}
    for item in a.controlnet:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--controlnet: allowed NAME=DIR (a diffusers ControlNetModel directory), got {item!r}")
        controlnets[name] = path
    export_pipeline(
        a.pipeline_dir, a.repo, target=a.target, prefix=a.prefix, executor=a.executor,
        engine_config=config, limits=limits, tolerance=a.tolerance, controlnets=controlnets,
    )
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    from .server import TritonServer

    server = TritonServer(
        Path(a.repo), http_port=a.http_port, grpc_port=a.grpc_port, metrics_port=a.metrics_port, address=a.address,
        log_path=Path(a.log) if a.log else None,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"[tessera] starting tritonserver on {a.address} (log: {server.log_path})", flush=True)
    server.start(timeout_s=a.ready_timeout)
    print(
        f"[tessera] ready: http {server.http_url}  grpc {server.grpc_url}  metrics {server.metrics_url}",
        flush=True,
    )
    try:
        while not stop.is_set():
            if server.proc.poll() is not None:
                print(f"[tessera] tritonserver exited with code {server.proc.returncode}:\n{server.errors()}",
                      file=sys.stderr)
                return 1
            stop.wait(0.5)
    finally:
        print("[tessera] stopping tritonserver", flush=True)
        server.stop()
    return 0


def _cmd_generate(a: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from .client import infer, make_client, request_arrays

    client = make_client(a.protocol, a.url)
    early_exit = {"on": True, "off": False, "server": None}[a.early_exit]
    control = None
    if a.control_image:  # one PNG per ControlNet, stacked along channels (RGB each)
        maps = [np.asarray(Image.open(p).convert("RGB"), np.uint8) for p in a.control_image]
        control = np.concatenate(maps, axis=2)
    arrays = request_arrays(
        a.prompt, a.height, a.width, a.steps, a.guidance_scale, a.seed, a.negative_prompt, a.slo_ms, early_exit,
        lora=a.lora, controlnet=a.controlnet, control_image=control, control_scale=a.control_scale,
    )
    t0 = time.perf_counter()
    image, ran = infer(client, a.protocol, arrays, model=a.model)
    ms = (time.perf_counter() - t0) * 1e3
    Image.fromarray(image[0]).save(a.out)
    print(f"[tessera] {a.width}x{a.height} {ran[0]} of {a.steps} steps via {a.protocol}: {ms:.0f} ms -> {a.out}")
    return 0


def _cmd_train_reference(a: argparse.Namespace) -> int:
    from .quality.train import train_reference

    report = train_reference(a.out, a.work, minutes=a.minutes, seed=a.seed, stages=tuple(a.stages.split(",")))
    print(f"[tessera] train-reference: {report}")
    return 0


def _cmd_train_style_evaluator(a: argparse.Namespace) -> int:
    from .quality.style_eval import train_style_evaluator

    report = train_style_evaluator(a.out, a.work, minutes=a.minutes, steps=a.steps, seed=a.seed,
                                   vae_dir=a.vae or None, n_test=a.test_images, roundtrip=a.roundtrip)
    print(f"[tessera] train-style-evaluator: {report}")
    return 0


def _cmd_train_lora(a: argparse.Namespace) -> int:
    from .quality.train_lora import LoraSettings, train_lora

    settings = LoraSettings(rank=a.rank, alpha=a.alpha, lr=a.lr, batch=a.batch, steps=a.steps,
                            per_res=a.images_per_res)
    command = "tessera train-lora " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["train-lora"] else ""
    report = train_lora(a.out, a.base, a.work, styles=tuple(a.styles.split(",")), minutes=a.minutes, seed=a.seed,
                        settings=settings, eval_images=a.eval_images, eval_steps=a.eval_steps,
                        evaluators_dir=a.evaluators, command=command)
    print(f"[tessera] train-lora: {report['styles']}")
    return 0


def _cmd_train_controlnet(a: argparse.Namespace) -> int:
    from .quality.train_controlnet import ControlSettings, train_controlnet

    settings = ControlSettings(lr=a.lr, batch=a.batch, steps=a.steps, per_res=a.scenes_per_res, mismatch=a.mismatch)
    command = "tessera train-controlnet " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["train-controlnet"] else ""
    report = train_controlnet(a.out, a.base, a.work, kinds=tuple(a.kinds.split(",")), minutes=a.minutes,
                              seed=a.seed, settings=settings, eval_images=a.eval_images, eval_steps=a.eval_steps,
                              evaluator_path=a.evaluator or None, command=command)
    print(f"[tessera] train-controlnet: {report['kinds']}")
    return 0


def _cmd_train_discriminator(a: argparse.Namespace) -> int:
    from .quality.discriminator import train_discriminator

    _single_thread()
    record = train_discriminator(a.out, a.light, a.heavy, a.evaluator, light_steps=a.light_steps,
                                 heavy_steps=a.heavy_steps, per_kind=a.images, held_out=a.held_out, steps=a.steps,
                                 seed=a.seed, inputs=a.inputs, generated_share=a.generated_share,
                                 ablate=tuple(a.ablate))
    print(f"[tessera] train-discriminator: {record['held_out']}")
    return 0


def _cmd_train_student(a: argparse.Namespace) -> int:
    from .quality.distill import train_student

    _single_thread()
    record = train_student(a.out, a.teacher, a.evaluator, steps=a.steps, teacher_steps=a.teacher_steps,
                           pairs=a.pairs, held_out=a.held_out, train_steps=a.train_steps, minutes=a.minutes,
                           seed=a.seed, init_dir=a.init or None, adversarial=a.adversarial,
                           curve_every=a.curve_every)
    print(f"[tessera] train-student: {record['held_out']}")
    return 0


def _cmd_cascade(a: argparse.Namespace) -> int:
    from tessera_export.repository import add_cascade, add_discriminator, add_engine

    if a.light_from:
        add_engine(a.repo, a.light_from, a.light)
    add_discriminator(a.repo, a.discriminator_dir, a.discriminator)
    settings = {"routing": a.routing, "threshold": a.threshold, "defer_fraction": a.defer_fraction,
                "light_steps": a.light_steps, "control_s": a.control_s}
    if a.light_s is not None and a.heavy_s is not None:
        settings |= {"light_s": a.light_s, "heavy_s": a.heavy_s}
    for k in ("cores", "light_max_cores", "heavy_max_cores"):
        if getattr(a, k) is not None:
            settings[k] = getattr(a, k)
    add_cascade(a.repo, a.name, a.light, a.heavy, a.discriminator, max_in_flight=a.max_in_flight, **settings)
    print(f"[tessera] cascade: {a.name} in {a.repo} ({a.light} -> {a.heavy}, routing {a.routing})")
    return 0


def _cmd_lora_profile(a: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .quality.lora_profile import lora_profile

    _single_thread()
    try:
        steps = [int(x) for x in a.steps.split(",")]
    except ValueError:
        raise ConfigError(f"--steps: allowed comma-separated step counts (50,20), got {a.steps!r}") from None
    names = [n for n in a.names.split(",") if n] if a.names else None
    profiles = lora_profile(a.lora_dir, a.base, names=names, steps_list=steps, threshold=a.threshold,
                            n_prompts=a.prompts, size=a.size, guidance=a.guidance, seed=a.seed)
    for name, profile in profiles.items():
        table = sorted(((int(s), k) for s, k in profile["k_by_steps"].items()), reverse=True)
        print(f"[tessera] lora-profile {name}: " + ", ".join(f"{s} steps K={k}" for s, k in table))
    return 0


def _cmd_quality(a: argparse.Namespace) -> int:
    from .quality.harness import RESULT_NAMES, SETS, run_quality

    run_quality(a.models, name=a.name, settings=SETS[a.set], out_dir=a.out, inception=not a.no_inception,
                feature_threads=a.feature_threads, result_name=a.result or RESULT_NAMES[a.set])
    return 0


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]  # type: ignore[misc]


def _cmd_bench(a: argparse.Namespace) -> int:
    import json

    from .bench.loadgen import replay, summarize
    from .bench.traces import Trace, bursty, poisson, write_perf_analyzer_inputs

    sizes = _parse_sizes(a.sizes)
    shares = [float(x) for x in a.shares.split(",")] if a.shares else [1.0] * len(sizes)
    if a.trace_in:
        trace = Trace.load(a.trace_in)
    elif a.bursty:
        lo, hi = (float(x) for x in a.bursty.split(","))
        trace = bursty(lo, hi, sizes, shares, a.steps, a.seed)
    else:
        trace = poisson(a.rate, a.duration, sizes, shares, a.steps, a.seed)
    if a.trace_out:
        trace.save(a.trace_out)
    slo = {s: float(a.slo_ms) for s in sizes}
    if a.perf_analyzer:
        paths = write_perf_analyzer_inputs(trace, a.perf_analyzer, slo)
        print(f"[tessera] perf_analyzer inputs: {paths[0]} {paths[1]}")
        return 0
    duration = max((r.t for r in trace.requests), default=0.0)
    records = replay(a.url, a.model, trace, slo, stream=a.stream)
    summary = summarize(records, duration)
    raw = summary.pop("raw")
    print(json.dumps(summary, indent=2))
    if a.out:
        from .results import write_result

        out = Path(a.out)
        config = {"model": a.model, "trace": trace.params, "kind": trace.kind, "slo_ms": a.slo_ms}
        write_result(out.stem, config, summary | {"raw": raw}, out.parent)
    return 0


def _shares(text: str) -> tuple[float, ...]:
    """'0.1,0.25' -> (0.1, 0.25): shares of a batch in [0, 0.5]."""
    try:
        shares = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        shares = (-1.0,)
    if any(not 0.0 <= v <= 0.5 for v in shares):
        raise argparse.ArgumentTypeError(f"comma-separated shares in [0, 0.5], got {text!r}")
    return shares


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)


class _Parser(argparse.ArgumentParser):
    """Every `--help` lists each option's choices and default; subcommands' parsers are of this class too
    (add_subparsers makes them with the parent's class), so a new subcommand gets it without asking."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tessera", description="SLO-aware text-to-image serving on Triton")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("build-tiny", help="build a tiny random-weight diffusers pipeline offline")
    b.add_argument("dir", help="where the pipeline is written (save_pretrained)")
    b.add_argument("--kind", choices=["unet", "dit"], default="unet",
                   help="unet: Stable-Diffusion-style UNet; dit: SD3-style transformer")
    b.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    b.set_defaults(fn=_cmd_build_tiny)

    e = sub.add_parser("export", help="export a local diffusers pipeline into a Triton model repository")
    e.add_argument("pipeline_dir", help="a local diffusers pipeline directory")
    e.add_argument("--repo", required=True, help="the Triton model repository to write")
    e.add_argument("--target", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: ONNX Runtime components; gpu: TensorRT plans (needs TensorRT and a CUDA GPU)")
    e.add_argument("--prefix", default="", help="prefix for every model name (several pipelines in one repo)")
    e.add_argument("--executor", choices=[m.value for m in Executor], default=None,
                   help="engine calls components over BLS, or runs their ONNX files in-process (default: local "
                        "for --target cpu, where it saves the components' IPC (perf/results/overhead.json); bls "
                        "for --target gpu, where the components are TensorRT models)")
    e.add_argument("--policy", choices=[m.value for m in PolicyName], default=PolicyName.EDF_MH.value,
                   help="request scheduling policy (default: %(default)s, the best full-step policy measured)")
    e.add_argument("--on-hopeless", choices=[m.value for m in OnHopeless], default=OnHopeless.DROP.value,
                   help="slack/rounds: a request that cannot meet its deadline is dropped, or degraded to fewer "
                        "steps (default: %(default)s)")
    e.add_argument("--early-refusal", choices=[m.value for m in EarlyRefusal], default=EarlyRefusal.ON.value,
                   help="slack/rounds: refuse at admission a request the plan sets aside (on), or also one that "
                        "would push an admitted request out (strict), or only once hopeless (off) "
                        "(default: %(default)s)")
    e.add_argument("--denoiser-runtime", choices=[m.value for m in Runtime], default=Runtime.ORT.value,
                   help="runtime of the engine's denoiser calls (patches needs torch)")
    e.add_argument("--denoise-mode", choices=[m.value for m in DenoiseMode], default=DenoiseMode.CONCAT.value,
                   help="per-step batching: per resolution, exact patches (torch), or fixed tiles")
    e.add_argument("--cfg-parallel", choices=[m.value for m in CfgParallel], default=CfgParallel.OFF.value,
                   help="local executor, ORT: each denoiser call's rows as two halves at once (CFG halves in "
                        "parallel; perf/results/cfg_parallel.json); auto: only calls of at most 2 rows (a lone "
                        "latent) (default: %(default)s)")
    e.add_argument("--controlnet", action="append", default=[], metavar="NAME=DIR",
                   help="serve a diffusers ControlNetModel as NAME (repeatable; the shared model controlnet_NAME, and "
                        "the UNet also as encoder + decoder parts; UNet pipelines, --target cpu)")
    e.add_argument("--control-parallel", choices=[m.value for m in Switch], default=Switch.ON.value,
                   help="ControlNets beside the UNet encoder (on) or one after another (off) "
                        "(default: %(default)s)")
    e.add_argument("--control-mode", choices=[m.value for m in ControlMode], default=ControlMode.SYNC.value,
                   help="sync: each step's residuals (exact); async: the previous step's (default: %(default)s)")
    e.add_argument("--controlnet-cache", type=int, default=4,
                   help="ControlNets kept resident, LRU (default: %(default)s)")
    e.add_argument("--controlnet-cache-mb", type=int, default=1024,
                   help="... and the bytes they may hold (default: %(default)s)")
    e.add_argument("--denoiser-workers", type=int, default=1,
                   help="denoiser worker processes the engine owns (torch.distributed; one GPU each where there are "
                        "enough): degree k > 1 runs a request on k of them (sequence-parallel DiT, CFG-split UNet); "
                        "> 1 needs --denoiser-runtime torch (docs/instances.md) (default: %(default)s)")
    e.add_argument("--placement", choices=[m.value for m in Placement], default=Placement.LEAST_WORK.value,
                   help="several workers, policies without degrees: each request on the worker with the least "
                        "predicted work, or round-robin (default: %(default)s)")
    e.add_argument("--fixed-degree", type=int, default=1,
                   help="policy fixed: every request's degree (default: %(default)s)")
    e.add_argument("--rssp", default="", help="policy rssp: degrees per resolution, 'HxW:k,...' (others at 1)")
    e.add_argument("--decode", choices=[m.value for m in Decode], default=Decode.LOOP.value,
                   help="decode finished requests on the step loop, or pipelined on their own thread beside the "
                        "next steps (default: %(default)s)")
    e.add_argument("--patch-size", type=int, default=0, help="latent cells; 0 = GCD of the step's sizes")
    e.add_argument("--tile-size", type=int, default=16, help="tiled: tile edge in latent cells")
    e.add_argument("--tile-overlap", type=int, default=4,
                   help="tiled: overlap of neighbouring tiles in latent cells")
    e.add_argument("--max-batch", type=int, default=16, help="requests per engine step")
    e.add_argument("--max-in-flight", type=int, default=256, help="admission bound")
    e.add_argument("--min-size", type=int, default=64, help="smallest height/width served, pixels")
    e.add_argument("--max-size", type=int, default=512, help="largest height/width served, pixels")
    e.add_argument("--max-steps", type=int, default=200, help="most denoising steps a request may ask for")
    e.add_argument("--tolerance", type=float, default=1e-3, help="max abs diff ONNX vs torch")
    e.set_defaults(fn=_cmd_export)

    s = sub.add_parser("serve", help="run the embedded tritonserver on a repository")
    s.add_argument("--repo", required=True, help="the Triton model repository to serve")
    s.add_argument("--address", default="127.0.0.1", help="address the server listens on")
    s.add_argument("--http-port", type=int, default=0, help="0: a free port")
    s.add_argument("--grpc-port", type=int, default=0, help="0: a free port")
    s.add_argument("--metrics-port", type=int, default=0, help="0: a free port")
    s.add_argument("--log", default=None,
                   help="server log file (none: tritonserver-PORT.log beside the repository, printed)")
    s.add_argument("--ready-timeout", type=float, default=300.0,
                   help="seconds to wait until the server is ready")
    s.set_defaults(fn=_cmd_serve)

    g = sub.add_parser("generate", help="generate one image through a running server")
    g.add_argument("--url", default="127.0.0.1:8000", help="server address, HOST:PORT of the chosen protocol")
    g.add_argument("--protocol", choices=["http", "grpc"], default="http", help="Triton client protocol")
    g.add_argument("--model", default="txt2img", help="entry model to call")
    g.add_argument("--prompt", required=True, help="UTF-8 text, at most 77 CLIP tokens")
    g.add_argument("--negative-prompt", default=None, help="text to steer away from (none: not sent)")
    g.add_argument("--height", type=int, default=128, help="pixels, a multiple of 16 within the served range")
    g.add_argument("--width", type=int, default=128, help="pixels, a multiple of 16 within the served range")
    g.add_argument("--steps", type=int, default=20, help="denoising steps")
    g.add_argument("--guidance-scale", type=float, default=5.0,
                   help="classifier-free guidance; > 1 enables it")
    g.add_argument("--seed", type=int, default=0, help="noise seed")
    g.add_argument("--slo-ms", type=int, default=None,
                   help="deadline after arrival (none: the engine's slo_scale x profiled latency)")
    g.add_argument("--out", default="image.png", help="PNG file to write")
    g.add_argument("--lora", default=None, help="LoRA adapters, 'name[:scale]' comma-separated (none: not sent)")
    g.add_argument("--controlnet", default=None, help="ControlNet names, comma-separated (none: not sent)")
    g.add_argument("--control-image", action="append", default=[], metavar="PNG",
                   help="the condition map at the image's size, one per ControlNet (repeat the flag)")
    g.add_argument("--control-scale", type=float, action="append", default=None,
                   help="ControlNet scale in [0, 2], one for all or one per ControlNet (repeat the flag; none: 1)")
    g.add_argument("--early-exit", default="server", choices=("server", "on", "off"),
                   help="entropy early exit for this request (server: the engine's default)")
    g.set_defaults(fn=_cmd_generate)
    t = sub.add_parser("train-reference", help="train the quality reference models (resumable, time-bounded)")
    t.add_argument("out", help="where the heavy/light pipelines and evaluator.pt are written")
    t.add_argument("--work", default=".tessera_cache/train", help="checkpoints to resume from")
    t.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget shared by the stages")
    t.add_argument("--stages", default="evaluator,vae,heavy,light",
                   help="comma-separated subset of evaluator, vae, heavy, light (run in that order)")
    t.add_argument("--seed", type=int, default=0, help="seed of every stage")
    t.set_defaults(fn=_cmd_train_reference)

    bn = sub.add_parser("bench", help="open-loop load generator (Poisson or bursty), SLO attainment report")
    bn.add_argument("--url", default="127.0.0.1:8001", help="gRPC address")
    bn.add_argument("--model", default="txt2img", help="model to call (engine with --stream)")
    bn.add_argument("--stream", action="store_true", help="one gRPC stream to a decoupled model (the engine)")
    bn.add_argument("--rate", type=float, default=1.0, help="Poisson arrivals per second")
    bn.add_argument("--duration", type=float, default=30.0, help="seconds of Poisson arrivals")
    bn.add_argument("--bursty", default=None, help="LOW,HIGH QPS band: Azure-shaped bursty trace instead")
    bn.add_argument("--sizes", default="128x128,128x256,256x256", help="HxW,...")
    bn.add_argument("--shares", default=None, help="relative shares of the sizes, A,B,... (none: equal)")
    bn.add_argument("--steps", type=int, default=20, help="denoising steps per request")
    bn.add_argument("--slo-ms", type=float, default=5000.0, help="deadline sent with every request")
    bn.add_argument("--seed", type=int, default=0, help="trace seed")
    bn.add_argument("--trace-out", default=None, help="save the trace to this JSON file")
    bn.add_argument("--trace-in", default=None, help="replay this saved trace instead of generating one")
    bn.add_argument("--perf-analyzer", default=None, help="write perf_analyzer input files to DIR and exit")
    bn.add_argument("--out", default=None, help="result JSON path")
    bn.set_defaults(fn=_cmd_bench)

    q = sub.add_parser("quality", help="quality metrics of served settings vs the heavy full-step reference")
    q.add_argument("--models", default="quality_models", help="heavy/, light/, evaluator.pt")
    q.add_argument("--name", default="baseline", help="label of the run (server models, logs)")
    q.add_argument("--set", default="baseline", choices=("baseline", "early-exit"),
                   help="baseline: heavy/light x steps; early-exit: epsilon x window x last step on heavy")
    q.add_argument("--result", default=None, help="result file name (none: per set)")
    q.add_argument("--out", default="perf/results", help="directory of the result file")
    q.add_argument("--no-inception", action="store_true", help="skip Inception FID/KID (slowest features)")
    q.add_argument("--feature-threads", type=int, default=1, help="torch threads for feature extraction")
    q.set_defaults(fn=_cmd_quality)

    from . import openai_front

    o = sub.add_parser("openai", help="OpenAI-compatible images API (/v1/images/generations) in front of a server")
    openai_front.add_arguments(o)
    o.set_defaults(fn=openai_front.run)

    se = sub.add_parser("train-style-evaluator",
                        help="train the style evaluator (style_evaluator.pt + .json; resumable, time-bounded)")
    se.add_argument("out", help="where style_evaluator.pt and style_evaluator.json are written")
    se.add_argument("--work", default=".tessera_cache/train", help="checkpoints to resume from")
    se.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget")
    se.add_argument("--steps", type=int, default=1500, help="training steps (batch 32) to reach")
    se.add_argument("--vae", default="quality_models/heavy/vae",
                    help="VAE directory: also report accuracy after its encode/decode round trip ('' to skip)")
    se.add_argument("--roundtrip", type=float, default=0.5,
                    help="share of training batches passed through the VAE first (needs --vae; 0: clean only)")
    se.add_argument("--test-images", type=int, default=50, help="test images per style and resolution")
    se.add_argument("--seed", type=int, default=0, help="seed of the weights and the data")
    se.set_defaults(fn=_cmd_train_style_evaluator)

    tl = sub.add_parser("train-lora", help="train one reference LoRA per style on the heavy reference "
                                           "(diffusers format; resumable, time-bounded)")
    tl.add_argument("out", help="adapters go to OUT/<style>/pytorch_lora_weights.safetensors, metadata to "
                                "OUT/training.json")
    tl.add_argument("--base", default="quality_models/heavy", help="the reference pipeline the adapters are for")
    tl.add_argument("--work", default=".tessera_cache/train-lora", help="checkpoints and datasets to resume from")
    tl.add_argument("--styles", default="outlined,striped,dark",
                    help="comma-separated styles to train (of outlined, striped, dark), in that order")
    tl.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget shared evenly by the styles")
    tl.add_argument("--steps", type=int, default=1500, help="training steps per style to reach")
    tl.add_argument("--rank", type=int, default=4, help="LoRA rank r")
    tl.add_argument("--alpha", type=float, default=None, help="LoRA alpha (none: alpha = rank, scale 1)")
    tl.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (linear warmup first)")
    tl.add_argument("--batch", type=int, default=32, help="batch at 64x64 (other resolutions: half)")
    tl.add_argument("--images-per-res", type=int, default=500,
                    help="rendered training images per resolution (x4 at 64x64), VAE-encoded once per style")
    tl.add_argument("--eval-images", type=int, default=48,
                    help="generated 64x64 images per style for adherence in training.json (0: skip)")
    tl.add_argument("--eval-steps", type=int, default=20, help="denoising steps of the adherence images")
    tl.add_argument("--evaluators", default="quality_models",
                    help="directory holding evaluator.pt and style_evaluator.pt (either may be missing)")
    tl.add_argument("--seed", type=int, default=0, help="seed of the adapters' init, the data and the evaluation")
    tl.set_defaults(fn=_cmd_train_lora)

    tc = sub.add_parser("train-controlnet", help="train one reference ControlNet per kind of control map on the "
                                                 "heavy reference (diffusers format; resumable, time-bounded)")
    tc.add_argument("out", help="ControlNets go to OUT/<kind>/ (save_pretrained), metadata to OUT/training.json")
    tc.add_argument("--base", default="quality_models/heavy", help="the reference pipeline the ControlNets are for")
    tc.add_argument("--work", default=".tessera_cache/train-controlnet",
                    help="checkpoints and the dataset to resume from")
    tc.add_argument("--kinds", default="silhouette,box",
                    help="comma-separated control kinds to train (of silhouette, box), in that order")
    tc.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget shared evenly by the kinds")
    tc.add_argument("--steps", type=int, default=1500, help="training steps per kind to reach")
    tc.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (linear warmup first)")
    tc.add_argument("--batch", type=int, default=32, help="batch at 64x64 (other resolutions: half)")
    tc.add_argument("--scenes-per-res", type=int, default=400,
                    help="rendered training scenes per resolution (x4 at 64x64), VAE-encoded once")
    tc.add_argument("--mismatch", type=float, default=0.5,
                    help="chance a training caption's position is redrawn at random, 3 in 4 times another position "
                         "than the map's (the map must win)")
    tc.add_argument("--eval-images", type=int, default=48,
                    help="generated 64x64 images per kind, prompt and map disagreeing on position (0: skip)")
    tc.add_argument("--eval-steps", type=int, default=20, help="denoising steps of the adherence images")
    tc.add_argument("--evaluator", default="quality_models/evaluator.pt", help="the main evaluator ('' to skip)")
    tc.add_argument("--seed", type=int, default=0, help="seed of the weights, the data and the evaluation")
    tc.set_defaults(fn=_cmd_train_controlnet)

    td = sub.add_parser("train-discriminator", help="train the cascade's discriminator (real rendered vs generated "
                                                    "images), export it to ONNX, measure its deferral profile")
    td.add_argument("out", help="model.onnx, discriminator.pt and discriminator.json (record + profile) go here")
    td.add_argument("--light", default="quality_models/student", help="the light pipeline (diffusers directory)")
    td.add_argument("--light-steps", type=int, default=2, help="the light pipeline's steps")
    td.add_argument("--heavy", default="quality_models/heavy", help="the heavy pipeline (diffusers directory)")
    td.add_argument("--heavy-steps", type=int, default=50, help="the heavy pipeline's steps")
    td.add_argument("--evaluator", default="quality_models/evaluator.pt", help="judges held-out images right/wrong")
    td.add_argument("--images", type=int, default=576, help="generated training images per pipeline (real: twice)")
    td.add_argument("--held-out", type=int, default=288, help="held-out images per pipeline for the profile")
    td.add_argument("--steps", type=int, default=600, help="training steps (batch 64)")
    td.add_argument("--seed", type=int, default=0, help="seed of the weights, data and held-out set")
    td.add_argument("--inputs", choices=[m.value for m in DiscriminatorInput], default="image",
                    help="image: P(real) of the image alone (DiffServe's); image+prompt: P(real and of this prompt), "
                         "trained against real images with near-miss prompts")
    td.add_argument("--generated-share", type=float, default=0.0,
                    help="image+prompt: share of each batch given to generated images labelled fake, in [0, 0.5]")
    td.add_argument("--ablate", type=_shares, default=(), help="image+prompt: comma-separated generated shares to "
                    "train as well and record how each routes (discriminator.json 'ablation')")
    td.set_defaults(fn=_cmd_train_discriminator)

    ts = sub.add_parser("train-student", help="distil a few-step student from the heavy reference (the cascade's "
                                              "light model): a diffusers pipeline and its training.json")
    ts.add_argument("out", help="the student pipeline (diffusers directory) and training.json go here")
    ts.add_argument("--teacher", default="quality_models/heavy", help="the teacher pipeline (diffusers directory)")
    ts.add_argument("--evaluator", default="quality_models/evaluator.pt", help="judges held-out images right/wrong")
    ts.add_argument("--steps", type=int, default=2, help="the student's DDIM steps")
    ts.add_argument("--teacher-steps", type=int, default=50, help="the teacher's DDIM steps (its default)")
    ts.add_argument("--pairs", type=int, default=1536, help="teacher (noise, latents) pairs to distil from")
    ts.add_argument("--held-out", type=int, default=288, help="held-out seeds (the 48 captions cycle) for the record")
    ts.add_argument("--train-steps", type=int, default=1500, help="training steps (batch 32)")
    ts.add_argument("--minutes", type=float, default=30.0, help="wall-clock bound, generation included")
    ts.add_argument("--seed", type=int, default=0, help="seed of the pairs, the batches and the held-out set")
    ts.add_argument("--init", default="", help="start the student from this pipeline's UNet (e.g. the light reference, "
                    "quality_models/light; default: a copy of the teacher's)")
    ts.add_argument("--adversarial", type=float, default=0.0, help="weight of an adversarial critic's loss beside the "
                    "regression (SD-Turbo's adversarial distillation: sharper, more real-looking images; 0: off)")
    ts.add_argument("--curve-every", type=int, default=0, help="record the held-out verdicts and FD every so many "
                    "training steps (training.json 'curve'; 0: only at the end)")
    ts.set_defaults(fn=_cmd_train_student)

    ca = sub.add_parser("cascade", help="add a DiffServe cascade entry (light engine -> discriminator -> heavy "
                                        "engine) and its discriminator model to a repository")
    ca.add_argument("repo", help="the model repository (holding both engines)")
    ca.add_argument("discriminator_dir", help="what train-discriminator wrote (model.onnx, discriminator.json)")
    ca.add_argument("--name", default="cascade", help="the cascade entry's model name")
    ca.add_argument("--light", default="light_engine", help="the light pipeline's engine model")
    ca.add_argument("--light-from", default="", help="first create --light as an engine over the same components "
                                                     "as this engine (the light pipeline: its weights at --light-steps)")
    ca.add_argument("--heavy", default="engine", help="the heavy pipeline's engine model")
    ca.add_argument("--discriminator", default="discriminator", help="the discriminator's model name")
    ca.add_argument("--routing", default="controlled", choices=[r.value for r in Routing],
                    help="controlled (MILP threshold from demand), static, random, light or heavy")
    ca.add_argument("--threshold", type=float, default=0.5, help="static threshold on P(real) (controlled: the first)")
    ca.add_argument("--defer-fraction", type=float, default=0.3, help="random routing's deferred share")
    ca.add_argument("--light-steps", type=int, default=2, help="steps the light engine runs each request (2: the "
                    "committed student's)")
    ca.add_argument("--control-s", type=float, default=2.0, help="seconds between the controller's decisions")
    ca.add_argument("--light-s", type=float, default=None, help="seconds per request of light + discriminator, alone "
                                                              "(required for controlled)")
    ca.add_argument("--heavy-s", type=float, default=None, help="seconds per request of the heavy engine, alone")
    ca.add_argument("--cores", type=float, default=None, help="cores both pipelines share (default: the host's)")
    ca.add_argument("--light-max-cores", type=float, default=None, help="the most cores the light engine can use (its "
                    "processes x threads; default: --cores)")
    ca.add_argument("--heavy-max-cores", type=float, default=None, help="the most cores the heavy engine can use")
    ca.add_argument("--max-in-flight", type=int, default=64, help="requests in flight before overload answers")
    ca.set_defaults(fn=_cmd_cascade)

    lp = sub.add_parser("lora-profile", help="profile each adapter's BAL step K per step count (cosine of "
                                             "latents with and without it), written beside the adapter")
    lp.add_argument("lora_dir", help="the adapter directory (lora_dir); profiles go to <name>.profile.json "
                                     "or <name>/profile.json")
    lp.add_argument("--base", default="quality_models/heavy",
                    help="the diffusers pipeline the adapters are for")
    lp.add_argument("--names", default=None,
                    help="comma-separated adapters to profile (none: every adapter of lora_dir)")
    lp.add_argument("--steps", default="50,20", help="comma-separated step counts to profile")
    lp.add_argument("--threshold", type=float, default=0.995,
                    help="K = leading steps whose mean latent cosine similarity stays >= this")
    lp.add_argument("--prompts", type=int, default=8, help="the first N shapes captions, seeds SEED+i")
    lp.add_argument("--size", type=int, default=64, help="image height and width, pixels")
    lp.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale")
    lp.add_argument("--seed", type=int, default=0, help="noise seed of the first prompt")
    lp.set_defaults(fn=_cmd_lora_profile)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except TesseraError as e:
        print(f"tessera {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # tritonclient errors carry the server's message
        if type(e).__name__ == "InferenceServerException":
            print(f"tessera {args.cmd}: server error: {e}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
