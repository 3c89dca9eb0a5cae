"""LoRA on the ONNX Runtime denoiser (executors/lora_ort.py, lora_onnx.py): merged sessions per adapter set on
the tiny UNet's exported denoiser, checked against the torch executor (executors/denoise.torch_call, which
applies adapters per row) and against TorchLora's merge, weight by weight."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from tessera.executors.base import DENOISER_OUTPUT
from tessera.executors.denoise import ConcatDenoiser, torch_call
from tessera.executors.lora_onnx import LoraMappingError, OnnxWeights
from tessera.executors.lora_ort import OrtLora
from tessera.executors.lora_torch import LoraAdapter, LoraPlan, TorchLora, load_lora, lora_rows
from tessera.executors.ort import OrtModel
from tessera.options import Family

# every kind of layer PEFT can target in the UNet: in the ONNX graph Conv (3x3, 1x1, stride 2), Gemm
# (Linear on [B, C]) and MatMul with a constant-folded transposed weight (Linear on [B, S, C])
ALL = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
       "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "downsamplers.0.conv", "upsamplers.0.conv",
       "linear_1", "linear_2"]
# ORT's merged session vs the torch executor (per-row, unmerged) with the same adapter, outputs up to ~15 with
# these large random adapters (std 0.3 on every layer kind; they move the output by ~15). Measured: 1.7e-4
# (3.5e-4 over 6 rows at t = 10..999 in a probe). Torch's own two exact forms differ by as much on the same
# inputs (merged vs per row: 1.7e-4 here, 4.5e-4 in the probe; printed by the test): fp32 reassociation through
# 121 adapted layers, not a mapping error (the merged weights are compared bit for bit). 1e-3 is about 2x the
# largest seen and 1e-4 of the adapter's effect.
TOL = 1e-3


@pytest.fixture(scope="module")
def setup(tiny_pipelines, tmp_path_factory):
    from tessera_export.onnx_export import export_component, plan_components
    from tessera_export.tiny import load_pipeline, write_random_lora

    d = tmp_path_factory.mktemp("lora_ort")
    pipe = load_pipeline(tiny_pipelines["unet"])
    comp = next(c for c in plan_components(pipe, Family.SD, ((16, 16), (16, 24))) if c.name == "denoiser")
    export_component(comp, d / "unet.onnx", progress=lambda *_: None)
    unet = pipe.unet.eval()
    write_random_lora(unet, d / "X", seed=1, std=0.3, r=4, lora_alpha=8, target_modules=ALL)
    write_random_lora(unet, d / "Y", seed=2, metadata=False, std=0.3, r=2,
                      target_modules=["to_q", "to_v", "ff.net.2", "conv2", "proj_in", "time_emb_proj"])
    base = OrtModel(d / "unet.onnx")
    g = np.random.default_rng(3)
    inputs = {"sample": g.standard_normal((6, 4, 16, 16)).astype(np.float32),
              "timestep": np.array([10, 10, 500, 500, 999, 999], np.float32),
              "encoder_hidden_states": g.standard_normal((6, 77, 32)).astype(np.float32)}
    return dict(dir=d, onnx=d / "unet.onnx", unet=unet, X=load_lora(d / "X", "X"), Y=load_lora(d / "Y", "Y"),
                base=lambda feeds: base.run(feeds)[DENOISER_OUTPUT], inputs=inputs)


def _rows(inputs, rows):
    return {k: v[rows] for k, v in inputs.items()}


def test_lora_ort_merged_weights_are_the_torch_merge_bit_for_bit(setup):
    """Every targeted weight found in the graph (Conv, Gemm, transposed MatMul) and merged exactly as
    TorchLora.merge merges it: the mapping and the layout are right, not merely close."""
    X, unet = setup["X"], setup["unet"]
    weights = OnnxWeights(setup["onnx"])
    found = weights.resolve([X])
    assert set(found) == set(X.layers) and len(found) == 121
    kinds = {(w.transposed, len(w.shape)) for w in found.values()}
    assert kinds == {(True, 2), (False, 2), (False, 4)}  # MatMul W^T, Gemm W, Conv W
    merged = weights.merged([(X, 0.8)])
    modules = dict(unet.named_modules())
    TorchLora.of(unet).merge([(X, 0.8)])
    try:
        for module, w in found.items():
            got = merged[w.initializer].T if w.transposed else merged[w.initializer]
            assert np.array_equal(got, modules[module].weight.detach().numpy()), module
    finally:
        TorchLora.of(unet).unmerge()


def test_lora_ort_merged_equals_the_torch_executor(setup):
    X, inputs = setup["X"], _rows(setup["inputs"], slice(0, 2))
    ort_lora = OrtLora(setup["onnx"], setup["base"])
    reference = torch_call(setup["unet"], Family.SD)
    adapters = [(((X, 0.8),), 2)]  # one request, both CFG rows
    with lora_rows(setup["unet"], LoraPlan.for_items([[(X, 0.8)]], [2])):  # the per-row form
        want = reference(inputs)
    got = ort_lora(inputs, adapters)
    effect = np.abs(want - reference(inputs)).max()
    diff = np.abs(got - want).max()
    torch_merged = reference(inputs, adapters)  # one set for the whole call: torch_call merges it
    assert TorchLora.of(setup["unet"]).merged == (("X", 0.8),)
    reference(inputs)  # and unmerges for a call without adapters
    print(f"\nORT merged vs torch executor: max abs diff {diff:.2e} (tolerance {TOL:.0e}); torch merged vs torch "
          f"per row {np.abs(torch_merged - want).max():.2e}; the adapter moves the output by {effect:.2f} "
          f"(outputs up to {np.abs(want).max():.1f})")
    assert effect > 1.0  # the adapter matters: an unapplied or half-applied set fails below
    assert diff <= TOL
    assert np.array_equal(ort_lora(inputs), setup["base"](inputs))  # no adapters: the base call, untouched


def test_lora_ort_set_of_two_adapters_equals_the_torch_executor(setup):
    X, Y, inputs = setup["X"], setup["Y"], _rows(setup["inputs"], slice(0, 2))
    ort_lora = OrtLora(setup["onnx"], setup["base"])
    reference = torch_call(setup["unet"], Family.SD)
    for pair in (((X, 1.0), (Y, 1.5)), ((X, 0.4), (Y, -0.5))):
        with lora_rows(setup["unet"], LoraPlan.for_items([pair], [2])):  # the torch executor's per-row form
            want = reference(inputs)
        got = ort_lora(inputs, [(pair, 2)])
        with lora_rows(setup["unet"], LoraPlan.for_items([pair[:1]], [2])):
            one = reference(inputs)
        assert np.abs(want - one).max() > 0.1  # the second adapter matters
        assert np.abs(got - want).max() <= TOL, pair


def test_lora_ort_mixed_rows_equal_each_set_alone(setup):
    """Rows (X, Y, none, X+Y) in one call: one ORT call per set; each item's rows equal that set run alone
    (same session, same row count: bit for bit)."""
    X, Y, inputs = setup["X"], setup["Y"], setup["inputs"]
    ort_lora = OrtLora(setup["onnx"], setup["base"])
    items = [((X, 0.8),), ((Y, 1.0),), (), ((X, 0.4), (Y, -0.5))]
    mixed = ort_lora({k: np.concatenate([v, v[:2]]) for k, v in inputs.items()},
                     [(items[0], 2), (items[1], 2), (items[2], 2), (items[3], 2)])
    assert ort_lora.stats().builds == 3  # X, Y, X+Y; the rows without adapters went to the base call
    outs = [mixed[0:2], mixed[2:4], mixed[4:6], mixed[6:8]]
    own_rows = (slice(0, 2), slice(2, 4), slice(4, 6), slice(0, 2))
    for i, (item, rows) in enumerate(zip(items, own_rows, strict=True)):
        alone = ort_lora(_rows(inputs, rows), [(item, 2)])
        assert np.array_equal(outs[i], alone), i
    assert np.array_equal(outs[2], setup["base"](_rows(inputs, slice(4, 6))))
    assert not np.allclose(outs[0], outs[3], atol=0.1)  # X alone and X+Y differ: the sets were not mixed up


def test_lora_ort_session_cache_reuses_a_session_per_set(setup):
    X, Y, inputs = setup["X"], setup["Y"], _rows(setup["inputs"], slice(0, 2))
    ort_lora = OrtLora(setup["onnx"], setup["base"], max_sessions=2)
    first = ort_lora(inputs, [(((X, 0.8),), 2)])
    again = ort_lora(inputs, [(((X, 0.8), (Y, 0.0)), 2)])  # a scale-0 entry is no adapter
    assert ort_lora.stats().builds == 1 and ort_lora.stats().hits == 1 and np.array_equal(first, again)
    ort_lora(inputs, [(((X, 0.5),), 2)])  # another scale: another set
    assert ort_lora.stats().builds == 2
    ort_lora(inputs, [(((Y, 1.0), (X, 0.5)), 2)])
    ort_lora(inputs, [(((X, 0.5), (Y, 1.0)), 2)])  # the same set in another order
    stats = ort_lora.stats()
    assert (stats.builds, stats.evictions, stats.cached) == (3, 1, 2)  # X@0.8 evicted (least recently used)
    assert np.array_equal(ort_lora(inputs, [(((X, 0.8),), 2)]), first)  # rebuilt, same output
    assert ort_lora.stats().builds == 4


def test_lora_ort_unmappable_weight_errors_clearly(setup, tmp_path):
    """A graph whose nodes lost their scope names (rewritten by another tool): the constant-folded MatMul
    weights (`onnx::MatMul_<n>`) cannot be traced back to their modules. An adapter on them is refused,
    naming them; an adapter on convolutions (named initializers) still works there."""
    import onnx

    model = onnx.load(str(setup["onnx"]))
    for node in model.graph.node:
        node.name = ""
    onnx.save(model, str(tmp_path / "anon.onnx"))
    X, inputs = setup["X"], _rows(setup["inputs"], slice(0, 2))
    anon = OrtLora(tmp_path / "anon.onnx", setup["base"])
    with pytest.raises(LoraMappingError) as e:
        anon(inputs, [(((X, 0.8),), 2)])
    msg = str(e.value)
    print("\n" + msg.splitlines()[0] + "\n" + msg.splitlines()[1])
    assert "cannot be placed in the ONNX graph" in msg and "anon.onnx" in msg
    assert "X: down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q: no node in its scope" in msg
    assert "... and" in msg  # 60 MatMul weights: the first 20 named, the count of the rest
    convs = LoraAdapter("convs", {k: v for k, v in X.layers.items() if k.endswith(("conv1", "conv2", "conv_in"))})
    named = OrtLora(setup["onnx"], setup["base"])
    assert np.array_equal(anon(inputs, [(((convs, 0.8),), 2)]), named(inputs, [(((convs, 0.8),), 2)]))
    # a weight of the wrong shape is refused too (ORT itself would load it without a word)
    layer = X.layers["conv_in"]
    wrong = LoraAdapter("wrong", {"conv_in": type(layer)(layer.A[:, :2], layer.B, layer.scale)})
    match = r"wrong: conv_in: initializer 'model.conv_in.weight' is \[32, 4, 3, 3\]"
    with pytest.raises(LoraMappingError, match=match):
        named(inputs, [(((wrong, 1.0),), 2)])


def test_lora_ort_through_concat_denoiser_and_the_factory(setup, tmp_path):
    """`lora_dir` with denoiser_runtime=ort: the factory wraps the engine's denoise call in OrtLora, and
    ConcatDenoiser hands it each request's adapters with its rows; other modes are still refused."""
    from tessera.config import EngineConfig
    from tessera.errors import ConfigError
    from tessera.executors.factory import make_denoiser

    (tmp_path / "denoiser" / "1").mkdir(parents=True)
    (tmp_path / "denoiser" / "1" / "model.onnx").write_bytes(setup["onnx"].read_bytes())
    config = EngineConfig(denoiser_runtime="ort", lora_dir=str(setup["dir"]))
    components = types.SimpleNamespace(denoise=setup["base"])
    denoiser = make_denoiser(config, types.SimpleNamespace(denoiser="denoiser", controlnets=()), tmp_path, components)
    assert isinstance(denoiser, ConcatDenoiser) and isinstance(denoiser.call, OrtLora)
    X, inputs = setup["X"], setup["inputs"]
    items = [_rows(inputs, slice(0, 2)), _rows(inputs, slice(2, 4))]
    outs, _ = denoiser.run(items, [((X, 0.8),), ()])
    assert np.array_equal(outs[0], OrtLora(setup["onnx"], setup["base"])(items[0], [(((X, 0.8),), 2)]))
    assert np.array_equal(outs[1], setup["base"](items[1]))
    for mode in ("tiled", "patches"):
        with pytest.raises(ConfigError, match="allowed with denoise_mode=concat and denoiser_runtime=torch or ort"):
            EngineConfig(denoiser_runtime="torch" if mode == "patches" else "ort", denoise_mode=mode,
                         lora_dir=str(setup["dir"]))
    with pytest.raises(ConfigError, match="needs the denoiser's ONNX file"):
        make_denoiser(config, types.SimpleNamespace(denoiser="nope", controlnets=()), tmp_path, components)


def test_lora_ort_external_data_model_takes_external_initializers(setup, tmp_path):
    """A model with its weights in external data (how models over protobuf's 2 GB are exported): merged
    weights go in through add_external_initializers; same output as the embedded model."""
    import onnx

    model = onnx.load(str(setup["onnx"]))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.bin", size_threshold=0)
    ext = OrtLora(tmp_path / "ext.onnx", setup["base"])
    assert ext.weights.external  # every initializer is external there
    X, inputs = setup["X"], _rows(setup["inputs"], slice(0, 2))
    want = OrtLora(setup["onnx"], setup["base"])(inputs, [(((X, 0.8),), 2)])
    assert np.array_equal(ext(inputs, [(((X, 0.8),), 2)]), want)
    assert not np.allclose(want, setup["base"](inputs), atol=0.1)


def test_lora_ort_call_checks_the_rows(setup):
    from tessera.errors import ExecutorError

    ort_lora = OrtLora(setup["onnx"], setup["base"])
    with pytest.raises(ExecutorError, match="the call has 2 rows, its items 3"):
        ort_lora(_rows(setup["inputs"], slice(0, 2)), [(((setup["X"], 1.0),), 3)])


# ---- the TensorRT refit path (executors/lora_trt.py): TensorRT cannot be installed here


def test_lora_trt_without_tensorrt_says_it_needs_a_gpu_host(setup, monkeypatch):
    import sys

    from tessera.errors import RuntimeUnavailableError
    from tessera.executors.lora_trt import TrtLora

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on this host: `import tensorrt` fails
    with pytest.raises(RuntimeUnavailableError) as e:
        TrtLora(object(), setup["onnx"])
    print("\n" + str(e.value))
    assert "LoRA on TensorRT needs the tensorrt package and a CUDA GPU; it runs only on a GPU host" in str(e.value)


def test_lora_trt_refit_bookkeeping_with_a_stand_in_refitter(setup, monkeypatch):
    """The refit sequence against a stand-in for trt.Refitter (the API as TensorRT documents it: get_all_weights,
    set_named_weights, get_missing_weights, refit_cuda_engine): which weights are set to what, and back.
    Checks this module's bookkeeping only; TensorRT itself has not run it."""
    import sys

    from tessera.executors.lora_trt import TrtLora

    weights = OnnxWeights(setup["onnx"])
    engine = {n: weights.base(n) for n in weights.initializers}  # the engine's weights, by ONNX name
    refits = []

    class Refitter:
        def __init__(self, eng, logger):
            self.pending = {}

        def get_all_weights(self):
            return [n for n in engine if not n.endswith("conv_out.weight")]  # one weight folded at build

        def set_named_weights(self, name, array):
            self.pending[name] = array.copy()
            return array.shape == engine[name].shape

        def get_missing_weights(self):
            return []

        def refit_cuda_engine(self):
            engine.update(self.pending)
            refits.append(sorted(self.pending))
            self.pending = {}
            return True

    fake = types.SimpleNamespace(Refitter=Refitter, Logger=lambda *_: None)
    fake.Logger.WARNING = 0
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    X, Y = setup["X"], setup["Y"]
    base = dict(engine)
    trt_lora = TrtLora(object(), setup["onnx"])
    only_x = LoraAdapter("x", {k: v for k, v in X.layers.items() if "conv_out" not in k})
    trt_lora.apply([(only_x, 0.8)])
    want = weights.merged([(only_x, 0.8)])
    assert all(np.array_equal(engine[n], a) for n, a in want.items()) and len(refits) == 1
    trt_lora.apply([(only_x, 0.8)])  # already in: no refit
    assert len(refits) == 1 and trt_lora.current == (("x", 0.8),)
    trt_lora.apply([(Y, 1.0)])  # X's other weights back to W0, Y's merged, in one refit
    want_y = weights.merged([(Y, 1.0)])
    assert set(refits[-1]) == set(want) | set(want_y)
    assert all(np.array_equal(engine[n], want_y.get(n, base[n])) for n in engine)
    trt_lora.reset()
    assert all(np.array_equal(engine[n], base[n]) for n in engine) and trt_lora.current == ()
    with pytest.raises(LoraMappingError, match="not refittable in this engine.*conv_out.weight"):
        trt_lora.apply([(X, 0.8)])
    assert all(np.array_equal(engine[n], base[n]) for n in engine)  # refused before anything changed


def test_lora_onnx_layouts_of_a_hand_built_graph(tmp_path):
    """The layouts the tiny export does not have: a Linear weight kept as W behind a runtime Transpose (an
    export without constant folding), a Gemm with transB=0 (W^T stored), and a weight shared by two layers
    (refused: merging one would change the other). The merged session's output is checked against numpy."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tessera.executors.lora_torch import LoraLayer

    g = np.random.default_rng(0)
    w = {k: g.standard_normal((3, 4)).astype(np.float32) for k in "abc"}  # torch layout [out, in]
    nodes = [
        helper.make_node("Transpose", ["wa"], ["wa_t"], name="/model/a/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["sample", "wa_t"], ["ya"], name="/model/a/MatMul"),
        helper.make_node("Gemm", ["sample", "wb_t"], ["yb"], name="/model/b/Gemm", transB=0),
        helper.make_node("Gemm", ["sample", "wc"], ["yc"], name="/model/c/Gemm", transB=1),
        helper.make_node("Gemm", ["sample", "wc"], ["yd"], name="/model/d/Gemm", transB=1),
        helper.make_node("Sum", ["ya", "yb", "yc", "yd"], [DENOISER_OUTPUT], name="/model/Sum"),
    ]
    inits = [numpy_helper.from_array(w["a"], "wa"), numpy_helper.from_array(np.ascontiguousarray(w["b"].T), "wb_t"),
             numpy_helper.from_array(w["c"], "wc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info(DENOISER_OUTPUT, TensorProto.FLOAT, ["n", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # ORT 1.31 reads <= 13
    onnx.save(model, str(tmp_path / "g.onnx"))
    weights = OnnxWeights(tmp_path / "g.onnx")
    assert (weights.find("a").initializer, weights.find("a").transposed) == ("wa", False)
    assert (weights.find("b").initializer, weights.find("b").transposed) == ("wb_t", True)
    assert "also used by '/model/d/Gemm' outside 'c'" in weights.find("c")

    def layer():
        return LoraLayer(torch.from_numpy(g.standard_normal((2, 4)).astype(np.float32)),
                         torch.from_numpy(g.standard_normal((3, 2)).astype(np.float32)), 0.5)

    ab = LoraAdapter("ab", {"a": layer(), "b": layer()})
    base = OrtModel(tmp_path / "g.onnx")
    ort_lora = OrtLora(tmp_path / "g.onnx", lambda feeds: base.run(feeds)[DENOISER_OUTPUT])
    x = g.standard_normal((2, 4)).astype(np.float32)
    got = ort_lora({"sample": x}, [(((ab, 2.0),), 2)])
    delta = {k: 2.0 * 0.5 * (v.B @ v.A).numpy() for k, v in ab.layers.items()}
    want = x @ (w["a"] + delta["a"]).T + x @ (w["b"] + delta["b"]).T + 2 * x @ w["c"].T
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    with pytest.raises(LoraMappingError, match="c: initializer 'wc': also used by '/model/d/Gemm' outside 'c'"):
        ort_lora({"sample": x}, [(((LoraAdapter("c", {"c": layer()}), 1.0),), 2)])
