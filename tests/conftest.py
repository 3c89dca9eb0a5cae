"""Shared fixtures: tiny pipelines built once, one exported repository, one real tritonserver per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

PROMPT = "a red circle at top left"
SIZES = ((128, 128), (128, 192), (192, 128))  # (height, width): three resolutions, latents 16x16, 16x24, 24x16


def metric(server, name: str, model: str, **labels) -> float:
    """The value of one `tessera_*` sample of `model` (labels in export order), 0 when absent."""
    import urllib.request

    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    want = name + "{" + ",".join([f'model="{model}"'] + [f'{k}="{v}"' for k, v in labels.items()]) + "}"
    for line in text.splitlines():
        if line.startswith(want):
            return float(line.split()[-1])
    return 0.0


def wait_for(pred, timeout_s: float = 120.0, what: str = "condition") -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tessera")


@pytest.fixture(scope="session")
def tiny_pipelines(work_dir) -> dict[str, Path]:
    from tessera_export.tiny import build_tiny

    return {kind: build_tiny(work_dir / f"tiny-{kind}", kind=kind, progress=lambda *_: None) for kind in ("unet", "dit")}


@pytest.fixture(scope="session")
def repo(work_dir, tiny_pipelines) -> Path:
    """One repository serving both pipelines: `txt2img` -> `engine` (UNet, BLS, ORT, per-resolution
    batching) and `dit_txt2img` -> `dit_engine` (SD3-style DiT), plus `txt2img_local` -> `engine_local`
    (in-process ORT components) and `txt2img_patches` -> `engine_patches` (torch, exact patches)."""
    from tessera.config import EngineConfig
    from tessera_export.repository import add_engine, export_pipeline
    from tessera_export.tiny import write_random_lora

    path = work_dir / "repo"
    quiet = lambda *_: None  # noqa: E731
    fcfs = EngineConfig(policy="step-fcfs")  # plumbing tests: every request served (policies: test_faults.py)
    export_pipeline(tiny_pipelines["unet"], path, engine_config=fcfs, progress=quiet)
    export_pipeline(tiny_pipelines["dit"], path, prefix="dit_", engine_config=fcfs, progress=quiet)
    add_engine(path, "engine", "engine_local", entry="txt2img_local", executor="local")
    add_engine(path, "engine", "engine_cfg2", executor="local", cfg_parallel="on")  # CFG halves at once
    add_engine(path, "engine", "engine_piped", entry="txt2img_pipelined", executor="local", decode="pipelined")
    add_engine(path, "engine", "engine_patches", entry="txt2img_patches", denoiser_runtime="torch",
               denoise_mode="patches")
    # two denoiser worker processes (executors/workers.py): every request at degree 2 (sequence-parallel DiT), and
    # TetriServe's policy choosing degrees (tests/integration/test_instances_serving.py)
    add_engine(path, "dit_engine", "dit_engine_sp2", entry="dit_txt2img_sp2", executor="local", denoiser_runtime="torch",
               denoiser_workers=2, policy="fixed", fixed_degree=2)
    add_engine(path, "dit_engine", "dit_engine_tetris", entry="dit_txt2img_tetris", executor="local",
               denoiser_runtime="torch", denoiser_workers=2, policy="tetris")
    add_engine(path, "engine", "engine_wide", max_batch=128)  # room for 100+ requests in one step
    add_engine(path, "engine", "engine_faults", entry="txt2img_faults", fault_injection="on")  # test_faults.py
    for policy, extra in (("image-fcfs", {}), ("step-fcfs", {}), ("slack", {}), ("rounds", {}),
                          ("rounds", {"on_hopeless": "degrade"})):  # cold start under every policy
        name = "cold_" + policy.replace("-", "_") + ("_degrade" if extra else "")
        add_engine(path, "engine", name, policy=policy, **extra)
    # LoRA (tests/integration/test_lora_serving.py): three random adapters for the tiny UNet, a torch engine
    loras = work_dir / "loras"
    unet = load_unet(tiny_pipelines["unet"])
    for k, name in enumerate(("inky", "misty", "grainy")):
        write_random_lora(unet, loras / name, seed=k + 1, std=0.3,
                          target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"])
    add_engine(path, "engine", "engine_lora", executor="local", denoiser_runtime="torch", lora_dir=str(loras))
    add_engine(path, "engine", "engine_lora_ort", executor="local", denoiser_runtime="ort", lora_dir=str(loras))
    reference = Path(__file__).resolve().parents[1] / "quality_models" / "heavy"
    if reference.is_dir():  # the committed quality reference (tests/integration/test_quality_smoke.py)
        # with the committed reference ControlNets (tests/integration/test_controlnet_serving.py)
        nets = {k: reference.parent / "controlnet" / k for k in ("silhouette", "box")}
        # profiled at the sizes the tests use: the start-up profile's untimed step of max_batch requests at the
        # largest default size (256 px) grew each of these six engines' ONNX Runtime arenas to ~2.5 GB, and with
        # the multi-worker engines the test server ran out of this host's 24 GiB (the kernel killed a stub)
        export_pipeline(reference, path, prefix="ref_", progress=quiet,
                        engine_config=EngineConfig(executor="local", policy="step-fcfs", profile_sizes="64x64,128x128"),
                        controlnets={k: v for k, v in nets.items() if v.is_dir()})
        add_engine(path, "ref_engine", "ref_engine_cn_serial", control_parallel="off")
        add_engine(path, "ref_engine", "ref_engine_cn_async", control_mode="async")
        add_engine(path, "ref_engine", "ref_engine_cn_one", controlnet_cache=1)  # fewer resident than served
        add_engine(path, "ref_engine", "ref_engine_cn_bls", executor="bls")  # the ControlNet models over BLS
        # the same model with entropy early exit on by default (tests/integration/test_early_exit_serving.py)
        add_engine(path, "ref_engine", "ref_engine_ee", entry="ref_txt2img_ee", early_exit="on")
        discriminator = reference.parent / "discriminator"
        if discriminator.is_dir():  # DiffServe's cascade (tests/integration/test_cascade_serving.py): the light
            # pipeline is the reference at 1 step, so ref_engine serves both sides here
            from tessera_export.repository import add_cascade, add_discriminator

            add_discriminator(path, discriminator, "ref_discriminator")
            for name, settings in (("ref_cascade_light", {"routing": "static", "threshold": 0.0}),
                                   ("ref_cascade_defer", {"routing": "static", "threshold": 1.0}),
                                   ("ref_cascade", {"routing": "controlled", "light_s": 0.05, "heavy_s": 0.5,
                                                    "cores": 2, "control_s": 0.5})):
                add_cascade(path, name, "ref_engine", "ref_engine", "ref_discriminator", light_steps=1, **settings)
            student = reference.parent / "student"
            if student.is_dir():  # the committed 2-step student as its own light pipeline (student_engine)
                export_pipeline(student, path, prefix="student_", progress=quiet,
                                engine_config=EngineConfig(executor="local", policy="step-fcfs", profile_sizes="64x64"))
                add_cascade(path, "ref_cascade_student", "student_engine", "ref_engine", "ref_discriminator",
                            light_steps=2, routing="static", threshold=0.0)
            prompted = reference.parent / "discriminator_prompt"
            if prompted.is_dir():  # the image+prompt discriminator: the entry sends the prompt's tokens too
                add_discriminator(path, prompted, "ref_discriminator_prompt")
                add_cascade(path, "ref_cascade_prompt", "ref_engine", "ref_engine", "ref_discriminator_prompt",
                            light_steps=1, routing="static", threshold=0.0)
    return path


def load_unet(pipeline_dir: Path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(pipeline_dir / "unet").eval()


@pytest.fixture(scope="session")
def server(repo):
    from tessera.server import TritonServer

    srv = TritonServer(repo, exit_timeout_s=10)
    srv.start(timeout_s=600)  # ~30 engines, each warmed and profiled one after another (5 min on 2 cores)
    yield srv
    pgid = srv.proc.pid
    srv.stop()
    from tessera.server import _group_members

    assert _group_members(pgid) == [], "tritonserver or a Python stub survived stop()"


@pytest.fixture(scope="session")
def diffusers_pipes(tiny_pipelines):
    from tessera_export.tiny import load_pipeline

    pipes = {kind: load_pipeline(path) for kind, path in tiny_pipelines.items()}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    return pipes


def diffusers_image(pipe, prompt, height, width, steps, guidance, seed, negative=None):
    """The in-process diffusers pipeline's image as uint8 [H, W, 3] (its own PIL conversion)."""
    import numpy as np

    out = pipe(
        prompt,
        negative_prompt=negative,
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="pil",
    ).images[0]
    return np.asarray(out)
