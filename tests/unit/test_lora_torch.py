"""LoRA on a torch UNet (executors/lora_torch.py): loading the diffusers/PEFT format, merged in place with
exact unmerge, and unmerged per-row application in one mixed batch -- each checked against diffusers' own
`load_lora_weights` + `set_adapters` (PEFT). Tiny random UNet (the `build_tiny` config), random adapters
written by PEFT + `save_lora_weights`."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from tessera.executors.lora_torch import (
    LoraPlan,
    TorchLora,
    load_lora,
    lora_from_state_dict,
    lora_rows,
    merge,
    unmerge,
)

# every kind of layer PEFT can target in the UNet: Linear, 1x1 conv, 3x3 conv, stride-2 conv
ALL = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
       "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "downsamplers.0.conv", "upsamplers.0.conv",
       "linear_1", "linear_2"]
ATOL = 2e-5  # outputs are O(1); fp32 reassociation differences measured <= 5e-6
# The base UNet itself is not bit-batch-invariant on CPU: a row run alone differs from the same row in a batch
# of 4 by up to 2.1e-6 (measured). A row with adapters in a mixed batch vs alone: the same order.
BATCH_ATOL = 1e-5


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    ).eval()


def _write_lora(base, out_dir, seed: int, metadata: bool, **config) -> None:
    """A random LoRA for `base` in the file format `save_lora_weights` writes (PEFT's state dict keys)."""
    from tessera_export.tiny import write_random_lora

    write_random_lora(base, out_dir, seed, metadata, **config)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    base = _tiny_unet()
    # X: config in the file (alpha != r, per-module rank and alpha patterns), every layer kind
    _write_lora(base, d / "X", 1, True, r=4, lora_alpha=8, target_modules=ALL, rank_pattern={"to_k": 2},
                alpha_pattern={"conv1": 3})
    # Y: no config in the file (diffusers then takes alpha = r), a few layers of each kind
    _write_lora(base, d / "Y", 2, False, r=2, lora_alpha=8,
                target_modules=["to_q", "to_v", "ff.net.2", "conv2", "conv_shortcut", "proj_in", "time_emb_proj"])
    X, Y = load_lora(d / "X", "X"), load_lora(d / "Y", "Y")
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(4, 4, 16, 16, generator=g), torch.tensor([10.0, 500.0, 999.0, 1.0]),
              torch.randn(4, 8, 32, generator=g))
    return dict(dir=d, base=base, X=X, Y=Y, inputs=inputs)


def _run(model, inputs, rows=slice(None), **kw):
    sample, t, ehs = inputs
    with torch.no_grad():
        return model(sample[rows], t[rows], encoder_hidden_states=ehs[rows], return_dict=False, **kw)[0]


@pytest.fixture(scope="module")
def reference(setup):
    """diffusers' own application: a pipeline around a copy of the UNet, both adapters loaded with
    `load_lora_weights` (applied by PEFT in the forward, not fused)."""
    from diffusers import StableDiffusionPipeline

    unet = copy.deepcopy(setup["base"])
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with warnings.catch_warnings():  # PEFT warns that a second adapter joins the first: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        pipe.load_lora_weights(setup["dir"] / "X", adapter_name="X")
        pipe.load_lora_weights(setup["dir"] / "Y", adapter_name="Y")

    def out(names, weights, **kw):
        pipe.set_adapters(names, weights)
        return _run(unet, setup["inputs"], **kw)

    return out


def test_lora_load_reads_the_diffusers_format(setup):
    X, Y, base = setup["X"], setup["Y"], setup["base"]
    modules = dict(base.named_modules())
    assert set(X.layers) <= set(modules) and len(X.layers) == 121 and len(Y.layers) == 67
    assert {n.rsplit(".", 1)[-1] for n in X.layers} >= {"conv_in", "conv_shortcut", "to_k", "proj_in", "linear_1"}
    # alpha / r with the file's patterns: 8/4 by default, to_k rank 2 -> 8/2, conv1 alpha 3 -> 3/4
    assert X.layers["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].scale == 2.0
    assert X.layers["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"].scale == 4.0
    assert X.layers["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"].rank == 2
    assert X.layers["down_blocks.0.resnets.0.conv1"].scale == 0.75
    assert {layer.scale for layer in Y.layers.values()} == {1.0}  # no config: alpha = r
    assert X.nbytes == sum(layer.A.nbytes + layer.B.nbytes for layer in X.layers.values()) > 0
    conv = X.layers["down_blocks.0.downsamplers.0.conv"]
    assert conv.A.shape == (4, 32, 3, 3) and conv.B.shape == (32, 4, 1, 1)
    TorchLora.of(base).check(X)


def test_lora_load_keeps_only_the_unet_and_refuses_what_it_cannot_apply(setup):
    X = setup["X"]
    state = {f"unet.{m}.lora_{ab}.weight": getattr(layer, ab) for m, layer in X.layers.items() for ab in "AB"}
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(2, 32)
    state["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 2)
    a = lora_from_state_dict(state, name="te")
    assert a.skipped == ("text_encoder",) and set(a.layers) == set(X.layers)
    dora = dict(state, **{"unet.conv_in.lora_magnitude_vector": torch.ones(32)})
    with pytest.raises(NotImplementedError, match="DoRA"):
        lora_from_state_dict(dora, name="d")
    nope = {"unet.nope.lora_A.weight": torch.zeros(2, 3), "unet.nope.lora_B.weight": torch.zeros(3, 2)}
    bad = lora_from_state_dict(nope, name="bad")
    with pytest.raises(ValueError, match="no module 'nope'"):
        TorchLora.of(setup["base"]).check(bad)


def test_lora_merged_equals_diffusers_load_lora_weights(setup, reference):
    model = copy.deepcopy(setup["base"])
    X, Y = setup["X"], setup["Y"]
    base_out = _run(model, setup["inputs"])
    for sets in ([(X, 0.7)], [(Y, 1.3)], [(X, 0.7), (Y, -0.5)]):
        want = reference([a.name for a, _ in sets], [s for _, s in sets])
        assert (want - base_out).abs().max() > 0.1  # the adapters change the output a lot
        merge(model, sets)
        assert TorchLora.of(model).merged == tuple((a.name, s) for a, s in sets)
        torch.testing.assert_close(_run(model, setup["inputs"]), want, atol=ATOL, rtol=0)
    # diffusers' other scale: cross_attention_kwargs={"scale": s} over set_adapters' weights
    want = reference(["X"], [1.0], cross_attention_kwargs={"scale": 0.6})
    merge(model, [(X, 0.6)])
    torch.testing.assert_close(_run(model, setup["inputs"]), want, atol=ATOL, rtol=0)
    unmerge(model)
    assert torch.equal(_run(model, setup["inputs"]), base_out)


def test_lora_kohya_file_reads_as_diffusers_reads_it(setup, reference, tmp_path):
    """lora_down / lora_up / alpha keys (kohya-ss) through diffusers' own conversion."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    state = {}
    for module, layer in setup["Y"].layers.items():
        k = "lora_unet_" + module.replace(".", "_")
        state[f"{k}.lora_down.weight"], state[f"{k}.lora_up.weight"] = layer.A, layer.B
        state[f"{k}.alpha"] = torch.tensor(3.0)  # alpha 3 on rank 2
    save_file(state, tmp_path / "k.safetensors")
    K = load_lora(tmp_path / "k.safetensors")
    assert set(K.layers) == set(setup["Y"].layers) and {layer.scale for layer in K.layers.values()} == {1.5}
    unet = copy.deepcopy(setup["base"])
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(tmp_path, weight_name="k.safetensors", adapter_name="k")
    pipe.set_adapters(["k"], [0.8])
    model = copy.deepcopy(setup["base"])
    merge(model, [(K, 0.8)])
    torch.testing.assert_close(_run(model, setup["inputs"]), _run(unet, setup["inputs"]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["grouped", "stacked"])
def test_lora_batched_rows_mixed_adapters(setup, reference, mode):
    """Rows (X, Y, none, X+Y) in one call: each row equals that row run alone with its adapters (unmerged
    and merged) and diffusers' output for its adapters."""
    model = copy.deepcopy(setup["base"])
    X, Y, inputs = setup["X"], setup["Y"], setup["inputs"]
    assign = [[(X, 0.7)], [(Y, 1.3)], [], [(X, 0.4), (Y, -0.5)]]
    plan = LoraPlan.for_items(assign, [1, 1, 1, 1])
    assert plan.adapters == (X, Y) and plan.rows[3] == ((0, 0.4), (1, -0.5))
    with lora_rows(model, plan, mode):
        mixed = _run(model, inputs)
    for r, sets in enumerate(assign):
        rows = slice(r, r + 1)
        with lora_rows(model, LoraPlan.for_items([sets], [1])):
            alone = _run(model, inputs, rows)
        torch.testing.assert_close(mixed[rows], alone, atol=BATCH_ATOL, rtol=0)
        merge(model, sets)
        merged = _run(model, inputs, rows)
        unmerge(model)
        torch.testing.assert_close(mixed[rows], merged, atol=ATOL, rtol=0)
        want = reference([a.name for a, _ in sets] or ["X"], [s for _, s in sets] or [0.0], rows=rows)
        torch.testing.assert_close(mixed[rows], want, atol=ATOL, rtol=0)
    assert torch.equal(mixed[2], _run(setup["base"], inputs)[2])  # no adapter: the base (same batch), exactly


def test_lora_plan_rows_follow_cfg_halves_and_patches(setup):
    """An item with CFG has two rows [uncond, cond]; both get its adapters."""
    X, Y = setup["X"], setup["Y"]
    plan = LoraPlan.for_items([[(X, 0.5)], [], [(Y, 1.0), (X, 0.2)]], [2, 1, 2])
    assert plan.rows == (((0, 0.5),), ((0, 0.5),), (), ((1, 1.0), (0, 0.2)), ((1, 1.0), (0, 0.2)))
    assert plan.groups == ((0, (0, 1, 3, 4), (0.5, 0.5, 0.2, 0.2)), (1, (3, 4), (1.0, 1.0)))
    assert plan.expand([0, 0, 2, 3]).rows == (plan.rows[0], plan.rows[0], (), plan.rows[3])
    model = copy.deepcopy(setup["base"])
    inputs = tuple(torch.cat([t[:1], t[:1], t[1:2], t[2:3], t[2:3]]) for t in setup["inputs"])
    with lora_rows(model, plan):
        out = _run(model, inputs)
        with lora_rows(model, LoraPlan.for_items([[(Y, 1.0), (X, 0.2)]], [2])):  # plans nest
            inner = _run(model, inputs, slice(3, 5))
        assert torch.equal(_run(model, inputs), out)  # the outer plan again
    assert torch.equal(out[0], out[1]) and torch.equal(out[3], out[4])
    torch.testing.assert_close(inner, out[3:], atol=BATCH_ATOL, rtol=0)
    with pytest.raises(ValueError, match="twice"):
        LoraPlan((X,), (((0, 1.0), (0, 2.0)),))
    with pytest.raises(RuntimeError, match="plan has 5"), lora_rows(model, plan):
        _run(model, setup["inputs"])


def test_lora_unmerged_all_rows_none_is_the_base_exactly(setup):
    model = copy.deepcopy(setup["base"])
    X, Y, inputs = setup["X"], setup["Y"], setup["inputs"]
    base_out = _run(setup["base"], inputs)
    with lora_rows(model, LoraPlan.for_items([[(X, 0.7)]], [4])):  # installs the hooks
        assert not torch.equal(_run(model, inputs), base_out)
    for plan in (LoraPlan((X, Y), ((),) * 4), LoraPlan.for_items([[], [], [(X, 0.0)], []], [1] * 4)):
        for mode in ("grouped", "stacked", "auto"):
            with lora_rows(model, plan, mode):
                assert torch.equal(_run(model, inputs), base_out)
    assert torch.equal(_run(model, inputs), base_out)  # hooks installed, no plan
    TorchLora.of(model).detach()


def test_lora_thousand_merge_unmerge_cycles_leave_the_base_bit_identical(setup):
    model = copy.deepcopy(setup["base"])
    X, Y, inputs = setup["X"], setup["Y"], setup["inputs"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base_out = _run(model, inputs)
    merge(model, [(X, 0.7), (Y, 0.3)])
    first = _run(model, inputs)
    for i in range(1000):
        if i % 100 == 0:  # the full set, and a switch from one merged set to another without an unmerge
            merge(model, [(X, 0.7), (Y, 0.3)])
            merge(model, [(Y, 1.0 + i / 1000)])
        else:
            merge(model, [(Y, 0.5 + i / 1000)])
        unmerge(model)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in before.items())
    assert torch.equal(_run(model, inputs), base_out)
    merge(model, [(X, 0.7), (Y, 0.3)])
    assert torch.equal(_run(model, inputs), first)  # a merge never builds on an earlier one
    unmerge(model)
    assert TorchLora.of(model).master_nbytes == sum(
        model.get_submodule(n).weight.nbytes for n in set(X.layers) | set(Y.layers))


def test_lora_merge_is_exact_in_half_precision():
    """Low-precision weights: the master is a bit-exact copy, the merge is computed in fp32 and rounded once."""
    lin = torch.nn.Sequential(torch.nn.Linear(16, 8)).to(torch.bfloat16)
    w0 = lin[0].weight.detach().clone()
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g)
    a = lora_from_state_dict({"unet.0.lora_A.weight": A, "unet.0.lora_B.weight": B}, name="h")
    for _ in range(50):
        merge(lin, [(a, 0.3)])
        unmerge(lin)
    assert torch.equal(lin[0].weight, w0)
    merge(lin, [(a, 0.3)])
    torch.testing.assert_close(lin[0].weight.float(), w0.float() + 0.3 * B @ A, atol=0, rtol=2**-8)


def test_torch_call_merges_a_step_that_shares_one_set_and_goes_per_row_otherwise(setup):
    """The denoiser call chooses per step: one set for every item -> merged (and kept merged for the next
    such step); different sets or some without -> unmerged exactly, per-row; none -> the base weights."""
    import numpy as np

    from tessera.executors.denoise import torch_call
    from tessera.executors.lora_torch import TorchLora
    from tessera.options import Family

    model = copy.deepcopy(setup["base"])
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    X, Y = setup["X"], setup["Y"]
    sample, t, ehs = (v.numpy() for v in setup["inputs"])
    inputs = {"sample": sample[:2], "timestep": t[:2], "encoder_hidden_states": ehs[:2]}
    call = torch_call(model, Family.SD)
    assert np.array_equal(call(inputs), call(inputs, [((), 2)]))
    same = call(inputs, [(((X, 0.7),), 1), (((X, 0.7),), 1)])
    assert TorchLora.attached(model).merged == (("X", 0.7),)  # merged, and still merged after the call
    per_row = call(inputs, [(((X, 0.7),), 1), (((Y, 1.3),), 1)])
    assert TorchLora.attached(model).merged == ()
    alone = call(inputs, [(((X, 0.7),), 1), ((), 1)])  # X on row 0 per row, the base on row 1
    assert np.abs(same[0] - alone[0]).max() <= ATOL  # merged and per-row agree
    assert np.abs(per_row[0] - same[0]).max() <= ATOL and np.abs(per_row[1] - same[1]).max() > 1e-3
    call(inputs, [(((X, 0.7),), 1), (((X, 0.7),), 1)])
    base = call(inputs)  # no adapters: unmerged, the base weights bit for bit
    assert TorchLora.attached(model).merged == ()
    assert all(torch.equal(v, base_weights[k]) for k, v in model.state_dict().items())
    assert np.array_equal(base, torch_call(setup["base"], Family.SD)(inputs))
