"""ControlNets (issue 15): the request inputs, the service add-on (on-demand loads, count-bounded LRU, pins),
and the executor on exported tiny components against diffusers' UNet taking ControlNet residuals."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from tessera.control_spec import parse_control
from tessera.controlnet import ControlCall, ControlNets, ControlState
from tessera.errors import InvalidInputError
from tessera.lora_cache import LoraCache, LoraLoader
from tessera.request import GenerationParams, RequestState

SERVED = frozenset({"silhouette", "box", "edges"})


# -- inputs ----------------------------------------------------------------------------------------------
def test_parse_control_maps_and_scales():
    grey = np.zeros((64, 128), np.uint8)
    grey[10:20, 30:40] = 255
    spec = parse_control(["silhouette", "box"], [0.5], grey, 64, 128, SERVED)
    assert spec.names == ("silhouette", "box") and spec.scales == (0.5, 0.5)
    assert spec.maps.shape == (2, 64, 128, 3) and spec.maps[1, 15, 35].tolist() == [255, 255, 255]
    cond = spec.condition(0)
    assert cond.shape == (1, 3, 64, 128) and cond.dtype == np.float32 and cond.max() == 1.0
    two = np.zeros((64, 64, 6), np.uint8)
    two[..., 3:] = 7
    spec = parse_control(["box", "edges"], [1.0, 0.25], two, 64, 64, SERVED)
    assert spec.maps[0].max() == 0 and spec.maps[1].min() == 7 and spec.scales == (1.0, 0.25)
    assert parse_control(None, None, None, 64, 64, SERVED) is None
    assert parse_control([""], None, None, 64, 64, SERVED) is None


@pytest.mark.parametrize("names,scales,image,field", [
    (["nope"], None, np.zeros((64, 64), np.uint8), "controlnet"),  # unknown name
    (["box", "box"], None, np.zeros((64, 64), np.uint8), "controlnet"),  # repeated
    (["box", "silhouette", "edges", "x"], None, np.zeros((64, 64), np.uint8), "controlnet"),  # more than 3
    (None, None, np.zeros((64, 64), np.uint8), "controlnet"),  # image without a name
    (None, [1.0], None, "controlnet"),  # scale without a name
    (["box"], None, None, "control_image"),  # name without an image
    (["box"], None, np.zeros((32, 64), np.uint8), "control_image"),  # wrong size
    (["box"], None, np.zeros((64, 64), np.float32), "control_image"),  # wrong dtype
    (["box", "edges"], None, np.zeros((64, 64, 4), np.uint8), "control_image"),  # channels not 1, 3, 3K
    (["box"], [2.5], np.zeros((64, 64), np.uint8), "control_scale"),  # out of range
    (["box"], [float("nan")], np.zeros((64, 64), np.uint8), "control_scale"),  # NaN
    (["box", "edges"], [1.0, 1.0, 1.0], np.zeros((64, 64), np.uint8), "control_scale"),  # wrong count
])
def test_parse_control_errors_name_the_field(names, scales, image, field):
    with pytest.raises(InvalidInputError) as e:
        parse_control(names, scales, image, 64, 64, SERVED)
    assert e.value.field == field and str(e.value).startswith(field + ":") and "allowed" in str(e.value)


def test_parse_request_reads_the_control_inputs():
    from tessera.inputs import Limits, parse_request

    base = {"prompt": np.array([[b"a red circle at top left"]], object), "height": np.array([[64]], np.int32),
            "width": np.array([[64]], np.int32), "steps": np.array([[4]], np.int32),
            "guidance_scale": np.array([[4.0]], np.float32), "seed": np.array([[1]], np.int64)}
    control = {"controlnet": np.array([[b"box,silhouette"]], object),
               "control_scale": np.array([[0.5, 1.5]], np.float32),
               "control_image": np.zeros((1, 64, 64, 1), np.uint8)}
    (p,) = parse_request(base | control, Limits(), controlnets=SERVED)
    assert p.control.names == ("box", "silhouette") and p.control.scales == (0.5, 1.5)
    with pytest.raises(InvalidInputError) as e:  # the engine serves none
        parse_request(base | control, Limits())
    assert e.value.field == "controlnet"
    with pytest.raises(InvalidInputError) as e:  # rank checked by the wire spec
        parse_request(base | control | {"control_image": np.zeros((1, 64, 64), np.uint8)}, Limits(), controlnets=SERVED)
    assert e.value.field == "control_image"
    with pytest.raises(InvalidInputError) as e:
        parse_request(base | control | {"lora": np.array([[b"x"]], object)}, Limits(), adapters={"x"},
                      controlnets=SERVED)
    assert e.value.field == "controlnet"


# -- the service add-on ----------------------------------------------------------------------------------
def _state(rid: str, names: tuple[str, ...]) -> RequestState:
    control = parse_control(list(names), None, np.zeros((64, 64), np.uint8), 64, 64, SERVED) if names else None
    return RequestState(rid, GenerationParams("p", "", 64, 64, 4, 4.0, 0, control=control), 0.0)


def _service(max_entries: int, gate_event: threading.Event | None = None):
    loaded = []

    def load(path):
        if gate_event is not None:
            gate_event.wait(5)
        loaded.append(path.name)
        return f"net:{path.name}", 10

    loader = LoraLoader(LoraCache(1 << 20, max_entries=max_entries), Path, load)
    return ControlNets(SERVED, loader, idle_wait_s=0.01), loaded


def test_service_steps_a_request_once_its_controlnets_are_loaded():
    release = threading.Event()
    service, loaded = _service(4, release)
    a, b = _state("a", ("box", "edges")), _state("b", ())
    service.admit(a)
    service.admit(b)
    gate = service.gate([a, b])
    assert [s.request_id for s in gate.step] == ["b"] and [s.request_id for s in gate.wait] == ["a"]
    assert gate.calls is None  # nobody stepping has a ControlNet
    release.set()
    service.loader.wait("controlnet_box", 5)
    service.loader.wait("controlnet_edges", 5)
    gate = service.gate([a, b])
    assert [s.request_id for s in gate.step] == ["a", "b"] and gate.calls[1] is None
    call = gate.calls[0]
    assert [net for net, _ in call.nets] == ["net:controlnet_box", "net:controlnet_edges"]
    assert [c.shape for c in call.conditions] == [(1, 3, 64, 64)] * 2
    assert service.gate([a]).calls[0].state is call.state  # one state per request across steps
    assert service.counters().wait_steps == 1 and service.counters().loads == 2
    service.release("a")
    service.release("b")
    assert service.loader.cache.stats().pinned == 0


def test_service_evicts_least_recently_used_unpinned_beyond_its_count():
    service, loaded = _service(2)
    for i, names in enumerate([("box",), ("edges",), ("silhouette",), ("box",)]):
        s = _state(f"r{i}", names)
        service.admit(s)
        service.loader.wait("controlnet_" + names[0], 5)
        assert service.gate([s]).step == (s,)
        service.release(s.request_id)
    # box, edges loaded; silhouette evicts box (LRU); box again evicts edges and loads box a second time
    assert loaded == ["controlnet_box", "controlnet_edges", "controlnet_silhouette", "controlnet_box"]
    c = service.counters()
    assert c.evictions == 2 and c.resident == 2 and c.cache_misses == 4


def test_service_never_evicts_a_controlnet_in_use():
    service, _ = _service(1)
    a, b = _state("a", ("box",)), _state("b", ("edges",))
    service.admit(a)
    service.loader.wait("controlnet_box", 5)
    service.admit(b)
    service.loader.wait("controlnet_edges", 5)
    assert [s.request_id for s in service.gate([a, b]).step] == ["a", "b"]  # both pinned: over the count
    assert service.counters().resident == 2
    service.release("a")
    assert service.counters().resident == 1 and service.counters().evictions == 1
    service.release("b")


# -- the executor on exported tiny components -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_control(tiny_pipelines, tmp_path_factory):
    """The tiny UNet's encoder/decoder parts and two ControlNets (random zero convolutions) exported."""
    import torch
    from diffusers import ControlNetModel

    from tessera.executors.ort import OrtModel
    from tessera_export.onnx_export import down_residuals, export_component, split_unet_components
    from tessera_export.tiny import load_pipeline

    torch.manual_seed(0)
    pipe = load_pipeline(tiny_pipelines["unet"])
    nets = {}
    for name in ("a", "b"):
        net = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
        with torch.no_grad():
            for p in (*net.controlnet_down_blocks.parameters(), *net.controlnet_mid_block.parameters()):
                p.normal_(0, 0.2)
        nets[name] = net
    out = tmp_path_factory.mktemp("control")
    models = {}
    for comp in split_unet_components(pipe.unet, 77, ((8, 8), (8, 16)), nets, 8):
        export_component(comp, out / f"{comp.name}.onnx", progress=lambda *_: None)
        models[comp.name] = OrtModel(out / f"{comp.name}.onnx")
    return pipe.unet, nets, models, down_residuals(pipe.unet)


def _torch_step(unet, nets, scales, inputs, conds):
    """diffusers: each ControlNet at its scale, residuals summed in order, the UNet taking them."""
    import torch

    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    down, mid = None, None
    with torch.no_grad():
        for net, scale, cond in zip(nets, scales, conds, strict=True):
            d, m = net(t["sample"], t["timestep"], encoder_hidden_states=t["encoder_hidden_states"],
                       controlnet_cond=torch.from_numpy(cond), conditioning_scale=scale, return_dict=False)
            down = d if down is None else [x + y for x, y in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        return unet(t["sample"], t["timestep"], encoder_hidden_states=t["encoder_hidden_states"],
                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample.numpy()


def _item(g, n: int, h: int, w: int):
    return {"sample": g.standard_normal((n, 4, h, w)).astype(np.float32),
            "timestep": np.full(n, 501.0, np.float32),
            "encoder_hidden_states": g.standard_normal((n, 77, 32)).astype(np.float32)}


@pytest.mark.parametrize("parallel", [True, False])
def test_control_denoiser_equals_diffusers_with_one_and_two_controlnets(tiny_control, parallel):
    from tessera.executors.control import ControlDenoiser

    unet, nets, models, n_down = tiny_control
    whole = lambda feeds: None  # noqa: E731 - every group here has a ControlNet
    den = ControlDenoiser(whole, models["denoiser_encoder"], models["denoiser_decoder"], n_down, parallel)
    g = np.random.default_rng(1)
    items = [_item(g, 2, 8, 8), _item(g, 2, 8, 8), _item(g, 2, 8, 16), _item(g, 2, 8, 8)]
    conds = [g.random((1, 3, h * 8, w * 8), dtype=np.float32) for h, w in ((8, 8), (8, 8), (8, 16), (8, 8))]
    calls = [ControlCall(((models["controlnet_a"], 0.7),), (conds[0],), ControlState()),
             ControlCall(((models["controlnet_a"], 1.0), (models["controlnet_b"], 0.4)), (conds[1], conds[1]),
                         ControlState()),
             ControlCall(((models["controlnet_b"], 1.2),), (conds[2],), ControlState()),
             None]
    outs, stats = den.run(items, None, calls)
    assert stats.batch == (6, 2) and stats.requests == (3, 1)  # one call per latent size
    refs = [_torch_step(unet, [nets["a"]], [0.7], items[0], [np.repeat(conds[0], 2, 0)]),
            _torch_step(unet, [nets["a"], nets["b"]], [1.0, 0.4], items[1], [np.repeat(conds[1], 2, 0)] * 2),
            _torch_step(unet, [nets["b"]], [1.2], items[2], [np.repeat(conds[2], 2, 0)])]
    import torch

    with torch.no_grad():
        plain = unet(*(torch.from_numpy(items[3][k]) for k in ("sample", "timestep")),
                     encoder_hidden_states=torch.from_numpy(items[3]["encoder_hidden_states"])).sample.numpy()
    for got, want in zip(outs, [*refs, plain], strict=True):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert np.abs(refs[0] - plain).max() > 1e-2  # the ControlNet changes the prediction
    assert den.counters()[0] == 3  # a and b at 8x8, b at 8x16


def test_control_denoiser_async_uses_the_previous_steps_residuals(tiny_control):
    from tessera.executors.control import ControlDenoiser
    from tessera.options import ControlMode

    unet, nets, models, n_down = tiny_control
    den_sync = ControlDenoiser(None, models["denoiser_encoder"], models["denoiser_decoder"], n_down)
    den_async = ControlDenoiser(None, models["denoiser_encoder"], models["denoiser_decoder"], n_down,
                                mode=ControlMode.ASYNC)
    g = np.random.default_rng(2)
    steps = [_item(g, 2, 8, 8), _item(g, 2, 8, 8)]
    cond = g.random((1, 3, 64, 64), dtype=np.float32)
    state = ControlState()
    call = ControlCall(((models["controlnet_a"], 1.0),), (cond,), state)
    first_async = den_async.run([steps[0]], None, [call])[0][0]
    first_sync = den_sync.run([steps[0]], None, [ControlCall(call.nets, call.conditions, ControlState())])[0][0]
    assert np.array_equal(first_async, first_sync)  # the first step runs synchronously
    second = den_async.run([steps[1]], None, [call])[0][0]
    # step 2 with step 1's residuals: diffusers' UNet on step 2's input, the ControlNet on step 1's
    import torch

    t0 = {k: torch.from_numpy(v) for k, v in steps[0].items()}
    t1 = {k: torch.from_numpy(v) for k, v in steps[1].items()}
    with torch.no_grad():
        d, m = nets["a"](t0["sample"], t0["timestep"], encoder_hidden_states=t0["encoder_hidden_states"],
                         controlnet_cond=torch.from_numpy(np.repeat(cond, 2, 0)), return_dict=False)
        want = unet(t1["sample"], t1["timestep"], encoder_hidden_states=t1["encoder_hidden_states"],
                    down_block_additional_residuals=d, mid_block_additional_residual=m).sample.numpy()
    assert np.abs(second - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert len(state.residuals) == n_down + 1


# -- export ----------------------------------------------------------------------------------------------
def test_one_controlnet_model_serves_pipelines_of_several_prefixes(tiny_pipelines, tiny_control, tmp_path):
    import json

    from tessera.spec import PipelineSpec
    from tessera_export.repository import export_pipeline

    _, nets, _, n_down = tiny_control
    nets["a"].save_pretrained(tmp_path / "edges")
    repo = tmp_path / "repo"
    for prefix in ("one_", "two_"):
        export_pipeline(tiny_pipelines["unet"], repo, prefix=prefix, progress=lambda *_: None,
                        controlnets={"edges": tmp_path / "edges"})
    models = sorted(p.name for p in repo.iterdir())
    assert [m for m in models if "controlnet" in m] == ["controlnet_edges"]  # shared, not prefixed
    for prefix in ("one_", "two_"):
        spec = PipelineSpec.load(repo / f"{prefix}engine" / "1" / "manifest.json")
        assert spec.controlnets == ("edges",) and spec.down_residuals == n_down
        assert (spec.denoiser_encoder, spec.denoiser_decoder) == (f"{prefix}denoiser_encoder", f"{prefix}denoiser_decoder")
    manifest = json.loads((repo / "controlnet_edges" / "1" / "manifest.json").read_text())
    assert manifest["component"] == "controlnet_edges" and manifest["max_abs_diff_vs_torch"] <= 1e-3
    config = (repo / "controlnet_edges" / "config.pbtxt").read_text()
    assert "instance_group" in config and 'name: "controlnet_cond"' in config


def test_export_refuses_a_controlnet_of_another_unet(tiny_pipelines, tmp_path):
    from diffusers import ControlNetModel

    from tessera.errors import ExportError
    from tessera_export.repository import export_pipeline

    ControlNetModel(block_out_channels=(8, 8), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    cross_attention_dim=16, layers_per_block=1, norm_num_groups=8, attention_head_dim=2,
                    conditioning_embedding_out_channels=(8, 8)).save_pretrained(tmp_path / "other")
    with pytest.raises(ExportError, match="does not fit this UNet"):
        export_pipeline(tiny_pipelines["unet"], tmp_path / "repo", progress=lambda *_: None,
                        controlnets={"other": tmp_path / "other"})
    with pytest.raises(ExportError, match="controlnet: name allowed"):
        export_pipeline(tiny_pipelines["unet"], tmp_path / "repo", progress=lambda *_: None,
                        controlnets={"Bad Name": tmp_path / "other"})


def test_export_refuses_other_weights_under_a_shared_name(tiny_pipelines, tiny_control, tmp_path):
    from tessera.errors import ExportError
    from tessera_export.repository import export_pipeline

    _, nets, _, _ = tiny_control
    nets["a"].save_pretrained(tmp_path / "edges")
    nets["b"].save_pretrained(tmp_path / "edges2")
    repo = tmp_path / "repo"
    export_pipeline(tiny_pipelines["unet"], repo, prefix="one_", progress=lambda *_: None,
                    controlnets={"edges": tmp_path / "edges"})
    with pytest.raises(ExportError, match="already holds another ControlNet"):
        export_pipeline(tiny_pipelines["unet"], repo, prefix="two_", progress=lambda *_: None,
                        controlnets={"edges": tmp_path / "edges2"})
