"""`tessera train-lora` micro-run on the committed heavy reference (64x64 only, batch 2, 2 steps, then resumed
to 3): the adapter file is diffusers' format, loads with both `tessera.executors.lora_torch.load_lora` and
`pipe.load_lora_weights` with every trained layer, and merged generation runs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

MODELS = Path(__file__).resolve().parents[2] / "quality_models"


@pytest.mark.skipif(not (MODELS / "heavy").is_dir(), reason="quality_models/heavy is not committed")
def test_train_lora_micro_run_writes_a_loadable_adapter(tmp_path):
    from peft.utils import get_peft_model_state_dict

    from tessera.executors.lora_torch import load_lora, merge, unmerge
    from tessera.quality.train_lora import TARGETS, LoraSettings, load_reference, train_lora

    threads = torch.get_num_threads()
    settings = LoraSettings(rank=4, batch=2, steps=2, per_res=2, resolutions=((64, 64),), warmup=1)
    try:
        report = train_lora(tmp_path / "out", MODELS / "heavy", tmp_path / "work", styles=("dark",), minutes=1,
                            settings=settings, eval_images=0)
        settings.steps = 3
        again = train_lora(tmp_path / "out", MODELS / "heavy", tmp_path / "work", styles=("dark",), minutes=1,
                           settings=settings, eval_images=0)
    finally:
        torch.set_num_threads(threads)
    res = report["styles"]["dark"]
    assert res["steps"] == 2 and again["styles"]["dark"]["steps"] == 3
    assert again["styles"]["dark"]["resumed_from_step"] == 2
    saved = json.loads((tmp_path / "out" / "training.json").read_text())
    assert saved["lora"]["rank"] == 4 and saved["lora"]["targets"] == list(TARGETS)
    path = tmp_path / "out" / "dark" / "pytorch_lora_weights.safetensors"
    assert path.is_file() and res["bytes"] == path.stat().st_size < 2_000_000

    adapter = load_lora(path.parent)
    assert adapter.skipped == () and {layer.rank for layer in adapter.layers.values()} == {4}
    assert {layer.scale for layer in adapter.layers.values()} == {1.0}
    assert any(k.endswith("attn1.to_q") for k in adapter.layers) and any(k.endswith("conv1") for k in adapter.layers)
    assert any(layer.B.abs().max() > 0 for layer in adapter.layers.values())  # trained: B left zero init

    pipe = load_reference(MODELS / "heavy")
    torch.set_num_threads(1)
    try:
        merge(pipe.unet, [(adapter, 1.0)])
        args = dict(prompt="a red circle at top left", height=64, width=64, num_inference_steps=2,
                    guidance_scale=4.0, output_type="np")
        merged = pipe(**args, generator=torch.Generator().manual_seed(0)).images
        unmerge(pipe.unet)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # PEFT warns when config targets miss in the file
            pipe.load_lora_weights(path.parent, adapter_name="dark")
        n = len(get_peft_model_state_dict(pipe.unet, adapter_name="dark"))
        via_diffusers = pipe(**args, generator=torch.Generator().manual_seed(0)).images
    finally:
        torch.set_num_threads(threads)
    assert n == 2 * len(adapter.layers)
    assert abs(merged - via_diffusers).max() < 2e-4
