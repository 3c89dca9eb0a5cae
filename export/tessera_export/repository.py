"""`tessera export`: a local diffusers pipeline -> a Triton model repository.

One Triton model per component (text encoder(s), denoiser, VAE decoder) plus the entry model `txt2img`.
`--target cpu` writes Python-backend models running ONNX Runtime (the embedded server has no ORT
backend); `--target gpu` writes `tensorrt_plan` models built with optimisation profiles, and stops with
a clear message where TensorRT or a GPU is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import struct
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from tessera.errors import ExportError, RuntimeUnavailableError
from tessera.inputs import Limits
from tessera.options import Executor, Family
from tessera.spec import PipelineSpec
from tessera.config import EngineConfig
from tessera.wire import (
    WARMUP_SAMPLE,
    ENGINE_MODEL, ENTRY_INPUTS, ENTRY_MAX_BATCH, ENTRY_MODEL, OUTPUT_CONFIDENCE, OUTPUT_IMAGE, OUTPUT_MODEL,
    OUTPUT_PREVIEW, OUTPUT_STEPS, STREAM_INPUTS,
)

from .onnx_export import OPSET, ComponentExport, down_residuals, export_component, plan_components, split_unet_components
from .tiny import load_pipeline

TARGETS = ("cpu", "gpu")
COMPONENT_MAX_BATCH = 16
SHIM_COMPONENT = "from tessera.triton.ort_model import TritonPythonModel  # noqa: F401\n"
SHIM_ENTRY = "from tessera.triton.txt2img_model import TritonPythonModel  # noqa: F401\n"
SHIM_ENGINE = "from tessera.triton.engine_model import TritonPythonModel  # noqa: F401\n"
SHIM_CASCADE = "from tessera.triton.cascade_model import TritonPythonModel  # noqa: F401\n"
_NP_TO_TRITON = {np.float32: "TYPE_FP32", np.int64: "TYPE_INT64", np.int32: "TYPE_INT32"}


def check_tensorrt() -> None:
    """Raise RuntimeUnavailableError unless TensorRT imports and a CUDA GPU is visible."""
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # ImportError, or a missing libnvinfer behind the bindings
        raise RuntimeUnavailableError(
            f"--target gpu: TensorRT is not available on this host ({type(e).__name__}: {e}). "
            "Build TensorRT plans on a GPU host with the tensorrt package installed, or use --target cpu."
        ) from e
    import torch

    if not torch.cuda.is_available():
        raise RuntimeUnavailableError(
            "--target gpu: no CUDA GPU is visible (torch.cuda.is_available() is False); "
            "TensorRT plans must be built on the GPU they will run on. Use --target cpu here."
        )


def _family(pipe) -> Family:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        return Family.SD
    if isinstance(getattr(pipe, "transformer", None), SD3Transformer2DModel):
        return Family.SD3
    raise ExportError(
        f"pipeline: unsupported pipeline class {type(pipe).__name__}; allowed StableDiffusionPipeline-style "
        "(UNet2DConditionModel) or StableDiffusion3Pipeline-style (SD3Transformer2DModel, no T5)"
    )


def _config_hash(model) -> str:
    cfg = getattr(model, "config", None)
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _io_block(kind: str, entries: list[tuple[str, str, list[int], bool, bool]]) -> str:
    rows = []
    for name, dtype, dims, optional, scalar in entries:
        extra = " optional: true" if optional else ""
        extra += " reshape: { shape: [ ] }" if scalar else ""
        rows.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{extra} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _component_inputs(comp: ComponentExport, trt: bool) -> list[tuple[str, str, list[int], bool, bool]]:
    """Triton dims (batch dim dropped, dynamic axes -1) from the example shapes and dynamic axes."""
    ins = []
    for name in comp.input_names:
        shape, dtype, _ = comp.example_shapes[0][name]
        dyn = comp.dynamic_axes.get(name, {})
        dims = [-1 if i in dyn else s for i, s in enumerate(shape)][1:]
        scalar = not dims
        ins.append((name, _NP_TO_TRITON[np.dtype(dtype).type], dims or [1], False, scalar and trt))
    return ins


def _component_config(name: str, comp: ComponentExport, out_dims: dict[str, list[int]], trt: bool) -> str:
    ins = _component_inputs(comp, trt)
    outs = [(o, "TYPE_FP32", out_dims[o], False, False) for o in comp.output_names]
    head = f'name: "{name}"\n'
    head += 'platform: "tensorrt_plan"\n' if trt else 'backend: "python"\n'
    head += f"max_batch_size: {COMPONENT_MAX_BATCH}\n"
    body = _io_block("input", ins) + _io_block("output", outs)
    kind = "KIND_GPU" if trt else "KIND_CPU"
    # Queue delay 0: a delay is charged in full to a lone per-step call (feasibility §5.3).
    tail = "dynamic_batching { max_queue_delay_microseconds: 0 }\n"
    tail += f"instance_group [ {{ count: 1 kind: {kind} }} ]\n"
    if not trt:
        tail += 'parameters: { key: "intra_op_threads" value: { string_value: "1" } }\n'
    return head + body + tail


def _parameters(params: dict) -> str:
    return "".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in params.items())


def _warmup_block(limits: Limits) -> str:
    """One valid 1-step request at the smallest size: Triton runs it after initialize and before the model
    is ready, when BLS to the components is allowed; the engine profiles its cost model first."""
    inputs = "".join(
        f'    inputs {{ key: "{n}" value: {{ data_type: TYPE_{t} dims: [ 1 ] input_data_file: "{n}" }} }}\n'
        for n, t in (("prompt", "STRING"), ("height", "INT32"), ("width", "INT32"), ("steps", "INT32"),
                     ("guidance_scale", "FP32"), ("seed", "INT64"))
    )
    return f'model_warmup [\n  {{\n    name: "{WARMUP_SAMPLE}"\n    batch_size: 1\n{inputs}  }}\n]\n'


def _warmup_files(directory: Path, limits: Limits) -> None:
    """The warmup sample's raw inputs (Triton's input_data_file format: little-endian values; a string is a
    4-byte length, then its bytes)."""
    directory.mkdir(parents=True, exist_ok=True)
    prompt = b"warm-up"
    (directory / "prompt").write_bytes(struct.pack("<I", len(prompt)) + prompt)
    for name, value in (("height", limits.min_size), ("width", limits.min_size), ("steps", 1)):
        (directory / name).write_bytes(struct.pack("<i", value))
    (directory / "guidance_scale").write_bytes(struct.pack("<f", 1.0))
    (directory / "seed").write_bytes(struct.pack("<q", 0))


def _engine_config(name: str, config: EngineConfig, limits: Limits) -> str:
    """The decoupled engine: the entry inputs plus optional streaming flags; image, step, preview out; warmed
    up and profiled before it reports ready."""
    ins = [(s.name, f"TYPE_{s.triton_type}", list(s.dims), s.optional, False) for s in ENTRY_INPUTS]
    ins += [(n, "TYPE_BOOL", [1], True, False) for n in STREAM_INPUTS]
    outs = [(OUTPUT_IMAGE, "TYPE_UINT8", [-1, -1, 3], False, False), (OUTPUT_STEPS, "TYPE_INT32", [1], False, False),
            (OUTPUT_PREVIEW, "TYPE_UINT8", [-1, -1, 3], False, False)]
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {ENTRY_MAX_BATCH}\n'
        + "model_transaction_policy { decoupled: true }\n"
        + _io_block("input", ins) + _io_block("output", outs)
        + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        + _parameters({f.name: getattr(config, f.name) for f in fields(config)})
        + _warmup_block(limits)
    )


def _entry_config(name: str, engine: str, max_in_flight: int) -> str:
    """The non-decoupled facade for plain clients: same inputs, one image out."""
    ins = [(s.name, f"TYPE_{s.triton_type}", list(s.dims), s.optional, False) for s in ENTRY_INPUTS]
    outs = [(OUTPUT_IMAGE, "TYPE_UINT8", [-1, -1, 3], False, False), (OUTPUT_STEPS, "TYPE_INT32", [1], False, False)]
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {ENTRY_MAX_BATCH}\n'
        + _io_block("input", ins) + _io_block("output", outs)
        + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        + _parameters({"engine": engine, "max_in_flight": max_in_flight})
    )


def write_engine(repo: Path, name: str, spec_json: str, tokenizer_src: Path | None, config: EngineConfig,
                 entry: str | None = None) -> None:
    """Write engine model `name` (and, if `entry` is given, a txt2img facade forwarding to it)."""
    vdir = repo / name / "1"
    if tokenizer_src is not None:
        src = Path(tempfile.mkdtemp(prefix="tessera-engine-"))
        shutil.copytree(tokenizer_src, src / "1")
        tokenizer_src = src / "1"
    shutil.rmtree(repo / name, ignore_errors=True)
    if tokenizer_src is not None:
        shutil.copytree(tokenizer_src, vdir)
        shutil.rmtree(tokenizer_src.parent, ignore_errors=True)
        for stale in ("model.py", "manifest.json"):
            (vdir / stale).unlink(missing_ok=True)
    vdir.mkdir(parents=True, exist_ok=True)
    (vdir / "manifest.json").write_text(spec_json)
    (vdir / "model.py").write_text(SHIM_ENGINE)
    limits = PipelineSpec.from_json(spec_json).limits
    (repo / name / "config.pbtxt").write_text(_engine_config(name, config, limits))
    _warmup_files(repo / name / "warmup", limits)
    if entry is not None:
        shutil.rmtree(repo / entry, ignore_errors=True)
        (repo / entry / "1").mkdir(parents=True)
        (repo / entry / "1" / "model.py").write_text(SHIM_ENTRY)
        (repo / entry / "config.pbtxt").write_text(_entry_config(entry, name, config.max_in_flight))


def add_engine(repo: str | Path, src: str, name: str, entry: str | None = None, **overrides) -> EngineConfig:
    """Add engine `name` over the same components as engine `src`, with config overrides (another
    policy, executor or denoise mode), and optionally its txt2img facade `entry`."""
    repo = Path(repo)
    spec_json = (repo / src / "1" / "manifest.json").read_text()
    base = _read_engine_config(repo / src / "config.pbtxt")
    config = EngineConfig(**{**base, **{k: v for k, v in overrides.items() if v is not None}})
    write_engine(repo, name, spec_json, repo / src / "1", config, entry)
    return config


def _read_engine_config(path: Path) -> dict:
    params = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', path.read_text()))
    return dataclasses.asdict(EngineConfig.from_parameters(params))


def _output_dims(comp: ComponentExport, path: Path) -> dict[str, list[int]]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {}
    for out in model.graph.output:
        shape = out.type.tensor_type.shape.dim
        dims[out.name] = [d.dim_value if d.dim_value > 0 and not d.dim_param else -1 for d in shape][1:]
    return dims


def _build_plan(onnx_path: Path, plan_path: Path, comp: ComponentExport, limits: Limits, vae_factor: int) -> None:
    """Build a TensorRT engine with one optimisation profile spanning the served sizes."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{comp.name}: TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    lo, hi = limits.min_size // vae_factor, limits.max_size // vae_factor
    for name in comp.input_names:
        shape, _, _ = comp.example_shapes[0][name]
        dyn = comp.dynamic_axes.get(name, {})
        mins, opts, maxs = [], [], []
        for axis, size in enumerate(shape):
            if axis == 0:
                mins.append(1), opts.append(2), maxs.append(COMPONENT_MAX_BATCH)
            elif axis in dyn and dyn[axis] in ("height", "width"):
                mins.append(lo), opts.append((lo + hi) // 2), maxs.append(hi)
            else:
                mins.append(size), opts.append(size), maxs.append(size)
        profile.set_shape(name, mins, opts, maxs)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"{comp.name}: TensorRT failed to build an engine from {onnx_path}")
    plan_path.write_bytes(bytes(engine))


CONTROLNET_PREFIX = "controlnet_"
_CONTROLNET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_CONTROLNET_MATCH = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block",
                     "cross_attention_dim", "attention_head_dim", "norm_num_groups", "conv_in_kernel")


def _load_controlnets(pipe, family: Family, dirs: dict[str, str | Path], target: str, repo: Path) -> dict:
    """Each ControlNet (fp32), checked against the UNet whose encoder it mirrors."""
    if not dirs:
        return {}
    if family is not Family.SD:
        raise ExportError(f"controlnet: ControlNets are exported for UNet pipelines; allowed with family sd, got {family}")
    if target != "cpu":
        raise ExportError("controlnet: the UNet encoder/decoder split is not built as TensorRT plans yet; allowed "
                          "with --target cpu")
    from diffusers import ControlNetModel

    nets = {}
    for name, path in dirs.items():
        if not _CONTROLNET_NAME.fullmatch(name):
            raise ExportError(f"controlnet: name allowed [a-z0-9][a-z0-9_-]{{0,31}}, got {name!r}")
        try:
            net = ControlNetModel.from_pretrained(path).float().eval()
        except Exception as e:  # noqa: BLE001 - a wrong directory is the operator's error
            raise ExportError(f"controlnet: {name}={path} is not a diffusers ControlNetModel directory: {e}") from e
        for key in _CONTROLNET_MATCH:
            ours, theirs = pipe.unet.config.get(key), net.config.get(key)
            if key in net.config and list(np.atleast_1d(ours)) != list(np.atleast_1d(theirs)):
                raise ExportError(f"controlnet: {name} does not fit this UNet: {key} is {theirs!r}, the UNet's "
                                  f"{ours!r}")
        _check_shared(name, path, repo)
        nets[name] = net
    return nets


def weights_digest(directory: str | Path) -> str:
    """sha256 over a model directory's weight files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for f in sorted(Path(directory).iterdir()):
        if f.suffix in (".safetensors", ".bin"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _check_shared(name: str, path: str | Path, repo: Path) -> None:
    """controlnet_<name> is shared by every pipeline of the repository: another export may rewrite it with
    the same weights, never replace them with others under the same name."""
    manifest = repo / f"{CONTROLNET_PREFIX}{name}" / "1" / "manifest.json"
    if not manifest.exists():
        return
    held = json.loads(manifest.read_text()).get("weights_sha256")
    if held is not None and held != weights_digest(path):
        raise ExportError(f"controlnet: {CONTROLNET_PREFIX}{name} in {repo} already holds another ControlNet "
                          f"(from {json.loads(manifest.read_text()).get('source')}); allowed: the same weights, or "
                          "another name")


def export_pipeline(
    pipeline_dir: str | Path,
    repo: str | Path,
    target: str = "cpu",
    prefix: str = "",
    executor: str = "bls",
    engine_config: EngineConfig | None = None,
    limits: Limits | None = None,
    tolerance: float = 1e-3,
    progress=print,
    controlnets: dict[str, str | Path] | None = None,
) -> PipelineSpec:
    """Export every component and write the repository; returns the engine's PipelineSpec. `controlnets`
    (name -> diffusers ControlNetModel directory, issue 15): each becomes the shared model
    `controlnet_<name>` (no prefix: several base pipelines of one repository use it), and the UNet is also
    exported as `denoiser_encoder` + `denoiser_decoder` (prefixed) that take the ControlNets' residuals."""
    if target not in TARGETS:
        raise ExportError(f"target: unknown target; allowed {', '.join(TARGETS)}, got {target!r}")
    engine_config = engine_config or EngineConfig(executor=executor)
    if target == "gpu":
        if engine_config.executor is Executor.LOCAL:
            raise ExportError("executor: 'local' runs ONNX Runtime in-process; allowed with --target gpu: bls")
        check_tensorrt()
    import torch

    torch.set_num_threads(1)
    t0 = time.monotonic()
    pipeline_dir, repo = Path(pipeline_dir), Path(repo)
    progress(f"[tessera] export: loading {pipeline_dir}")
    pipe = load_pipeline(pipeline_dir)
    family = _family(pipe)
    vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if family is Family.SD:
        den_factor = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        patch = 1
    else:
        patch = pipe.transformer.config.patch_size
        den_factor = patch
    multiple = vae_factor * den_factor
    limits = limits or Limits()
    limits = replace(limits, size_multiple=multiple, min_size=max(limits.min_size, multiple))
    m = multiple // vae_factor
    comps = plan_components(pipe, family, ((4 * m, 4 * m), (6 * m, 4 * m)))
    nets = _load_controlnets(pipe, family, controlnets or {}, target, repo)
    if nets:
        comps += split_unet_components(pipe.unet, pipe.tokenizer.model_max_length, ((4 * m, 4 * m), (6 * m, 4 * m)),
                                       nets, vae_factor)
    names = {c.name: (c.name if c.name.startswith(CONTROLNET_PREFIX) else prefix + c.name) for c in comps}
    repo.mkdir(parents=True, exist_ok=True)
    for i, comp in enumerate(comps, 1):
        name = names[comp.name]
        vdir = repo / name / "1"
        shutil.rmtree(repo / name, ignore_errors=True)
        vdir.mkdir(parents=True)
        progress(f"[tessera] export [{i}/{len(comps)}] {comp.name} -> {name} (ONNX opset {OPSET})")
        onnx_path = vdir / "model.onnx"
        diff = export_component(comp, onnx_path, tolerance, progress)
        out_dims = _output_dims(comp, onnx_path)
        trt = target == "gpu"
        if trt:
            progress(f"[tessera] export [{i}/{len(comps)}] {comp.name}: building TensorRT plan")
            _build_plan(onnx_path, vdir / "model.plan", comp, limits, vae_factor)
            onnx_path.rename(repo / name / "model.onnx")
        else:
            (vdir / "model.py").write_text(SHIM_COMPONENT)
        (repo / name / "config.pbtxt").write_text(_component_config(name, comp, out_dims, trt))
        module = getattr(comp.module, "model", None) or getattr(comp.module, "vae", None)
        source, extra = pipeline_dir, {}
        if comp.name.startswith(CONTROLNET_PREFIX):
            module.save_pretrained(vdir / "torch")  # the diffusers ControlNet beside its ONNX file
            source = Path(controlnets[comp.name[len(CONTROLNET_PREFIX):]])
            extra = {"weights_sha256": weights_digest(source)}  # what another export may share it with
        if comp.name == "denoiser":  # the diffusers module too: the engine's torch runtime (exact patches)
            module.save_pretrained(vdir / "torch")
        (vdir / "manifest.json").write_text(
            json.dumps(
                {
                    "component": comp.name,
                    **extra,
                    "source": str(source.resolve()),
                    "source_class": type(module).__name__,
                    "config_sha256": _config_hash(module),
                    "opset": OPSET,
                    "inputs": list(comp.input_names),
                    "outputs": list(comp.output_names),
                    "max_abs_diff_vs_torch": diff,
                    "target": target,
                },
                indent=2,
            )
        )
    entry = prefix + ENTRY_MODEL
    engine = prefix + ENGINE_MODEL
    staging = tempfile.TemporaryDirectory(prefix="tessera-tokenizers-")
    edir = Path(staging.name)
    encoders = [c.name for c in comps if c.name.startswith("text_encoder")]
    tokenizer_dirs = []
    for enc in encoders:
        tok_attr = "tokenizer" if enc == "text_encoder" else "tokenizer" + enc[len("text_encoder") :]
        getattr(pipe, tok_attr).save_pretrained(edir / tok_attr)
        tokenizer_dirs.append(tok_attr)
    vae_cfg = pipe.vae.config
    spec = PipelineSpec(
        family=family,
        latent_channels=int(vae_cfg.latent_channels),
        vae_scale_factor=vae_factor,
        scaling_factor=float(vae_cfg.scaling_factor),
        shift_factor=float(getattr(vae_cfg, "shift_factor", None) or 0.0),
        text_encoders=tuple(names[e] for e in encoders),
        tokenizers=tuple(tokenizer_dirs),
        denoiser=names["denoiser"],
        vae_decoder=names["vae_decoder"],
        sampler_config=json.loads(json.dumps(dict(pipe.scheduler.config), default=str))
        | {"_class_name": type(pipe.scheduler).__name__},
        joint_attention_dim=int(pipe.transformer.config.joint_attention_dim) if family is Family.SD3 else 0,
        t5_tokens=256 if family is Family.SD3 else 0,
        patch_size=patch,
        denoiser_multiple=den_factor,
        torch_denoiser=f"{names['denoiser']}/1/torch",
        component_max_batch=COMPONENT_MAX_BATCH,
        denoiser_encoder=names.get("denoiser_encoder", ""),
        denoiser_decoder=names.get("denoiser_decoder", ""),
        controlnets=tuple(sorted(nets)),
        down_residuals=down_residuals(pipe.unet) if nets else 0,
        limits=limits,
        source={"pipeline_dir": str(pipeline_dir.resolve()), "class": type(pipe).__name__, "target": target},
    )
    write_engine(repo, engine, spec.to_json(), edir, engine_config, entry)
    staging.cleanup()
    progress(
        f"[tessera] export: wrote {entry} -> {engine} + {len(comps)} components ({family}, sizes "
        f"{limits.min_size}..{limits.max_size} step {limits.size_multiple}) to {repo} in {time.monotonic() - t0:.1f}s"
    )
    return spec


def add_discriminator(repo: str | Path, src: str | Path, name: str = "discriminator") -> Path:
    """The cascade's discriminator as its own model (ONNX Runtime in the Python backend, as every CPU component):
    `src` holds discriminator.json (its training record and deferral profile) and model.onnx or, in a clone (ONNX
    files are not committed), discriminator.pt to export it from, as tessera.quality.discriminator.train_discriminator
    writes them. uint8 image [H, W, 3] in (and, for a discriminator of inputs image+prompt, int64 input_ids [L]: the
    prompt's tokens), p_real [1] out."""
    from tessera.options import DiscriminatorInput
    from tessera.quality.discriminator import IDS, INPUT, OUTPUT, export_checkpoint

    repo, src = Path(repo), Path(src)
    weights = "model.onnx" if (src / "model.onnx").exists() else "discriminator.pt"
    missing = [f for f in (weights, "discriminator.json") if not (src / f).exists()]
    if missing:
        raise ExportError(f"discriminator: {src} has no {missing[0]} (train one with `tessera train-discriminator`)")
    record = json.loads((src / "discriminator.json").read_text())
    inputs = [(INPUT, "TYPE_UINT8", [-1, -1, 3], False, False)]
    if DiscriminatorInput.parse("inputs", record.get("inputs", "image")) is DiscriminatorInput.IMAGE_PROMPT:
        inputs.append((IDS, "TYPE_INT64", [-1], False, False))
    vdir = repo / name / "1"
    shutil.rmtree(repo / name, ignore_errors=True)
    vdir.mkdir(parents=True)
    shutil.copy2(src / "discriminator.json", vdir / "discriminator.json")
    if weights == "model.onnx":
        shutil.copy2(src / "model.onnx", vdir / "model.onnx")
    else:  # a clone holds the weights, not the ONNX build output
        export_checkpoint(src, vdir / "model.onnx")
    (vdir / "model.py").write_text(SHIM_COMPONENT)
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {COMPONENT_MAX_BATCH}\n'
        + _io_block("input", inputs) + _io_block("output", [(OUTPUT, "TYPE_FP32", [1], False, False)])
        + "dynamic_batching { max_queue_delay_microseconds: 0 }\ninstance_group [ { count: 1 kind: KIND_CPU } ]\n"
        + _parameters({"intra_op_threads": 1}))
    return vdir


def add_cascade(repo: str | Path, name: str, light: str, heavy: str, discriminator: str = "discriminator",
                max_in_flight: int = 64, **settings) -> Path:
    """The cascade entry `name` (DiffServe): `light` and `heavy` are engine models of this repository,
    `discriminator` the model add_discriminator wrote. `settings`: the CascadeSettings fields (routing, threshold,
    defer_fraction, light_steps, control_s, seed) and, for routing controlled, light_s / heavy_s (seconds per
    request alone), cores (the host's, shared by both pipelines) and light_max_cores / heavy_max_cores (the most each
    pipeline's engine can use). Checked here, as the model checks them."""
    from tessera.cascade import ENTRY_PARAMETERS, CascadeSettings
    from tessera.cascade_control import ServiceCosts

    repo = Path(repo)
    for model in (light, heavy, discriminator):
        if not (repo / model / "config.pbtxt").exists():
            raise ExportError(f"cascade: model {model!r} is not in {repo}")
    known = {f.name for f in dataclasses.fields(CascadeSettings)} | {"light_s", "heavy_s", "cores", "light_max_cores",
                                                                     "heavy_max_cores"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ExportError(f"{unknown[0]}: not a cascade setting; allowed {', '.join(sorted(known))}")
    CascadeSettings.from_parameters({k: str(v) for k, v in settings.items()}, ENTRY_PARAMETERS)
    if str(settings.get("routing", "controlled")) == "controlled":
        if not {"light_s", "heavy_s"} <= set(settings):
            raise ExportError("light_s, heavy_s: required for routing controlled (seconds per request, alone)")
        ServiceCosts(float(settings["light_s"]), float(settings["heavy_s"]))  # ConfigError naming a bad one
    for k in ("cores", "light_max_cores", "heavy_max_cores"):
        try:
            ok = k not in settings or (math.isfinite(float(settings[k])) and float(settings[k]) > 0)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ExportError(f"{k}: must be a finite number of cores > 0, got {settings[k]!r}")
    ins = [(s.name, f"TYPE_{s.triton_type}", list(s.dims), s.optional, False) for s in ENTRY_INPUTS]
    outs = [(OUTPUT_IMAGE, "TYPE_UINT8", [-1, -1, 3], False, False), (OUTPUT_STEPS, "TYPE_INT32", [1], False, False),
            (OUTPUT_MODEL, "TYPE_STRING", [1], False, False), (OUTPUT_CONFIDENCE, "TYPE_FP32", [1], False, False)]
    shutil.rmtree(repo / name, ignore_errors=True)
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(SHIM_CASCADE)
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {ENTRY_MAX_BATCH}\n'
        + _io_block("input", ins) + _io_block("output", outs)
        + "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
        + _parameters({"light": light, "heavy": heavy, "discriminator": discriminator, "max_in_flight": max_in_flight,
                       **{k: str(v) for k, v in settings.items()}}))
    return repo / name
