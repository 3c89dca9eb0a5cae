"""Latent (CFG) parallelism in one process: RowParallel splits a denoiser call's rows into parts run at once
and puts the outputs back in row order; on the exported tiny UNet it equals one call."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tessera.config import EngineConfig
from tessera.errors import ConfigError
from tessera.executors.denoise import RowParallel


def test_row_parallel_splits_rows_in_order_on_two_threads():
    seen, lock = [], threading.Lock()

    def call(inputs):
        with lock:
            seen.append((threading.current_thread().name, inputs["sample"][:, 0, 0, 0].tolist()))
        return inputs["sample"] * 2

    par = RowParallel(call)
    x = {"sample": np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1), "timestep": np.arange(5.0)}
    assert np.array_equal(par(x), x["sample"] * 2)
    assert sorted(rows for _, rows in seen) == [[0.0, 1.0], [2.0, 3.0, 4.0]]
    assert len({name for name, _ in seen}) == 2  # two threads
    seen.clear()
    one = {"sample": x["sample"][:1], "timestep": x["timestep"][:1]}
    assert np.array_equal(par(one), one["sample"] * 2) and len(seen) == 1  # one row: one call


def test_row_parallel_on_the_exported_unet_equals_one_call(tiny_pipelines, tmp_path):
    from tessera.executors.base import DENOISER_OUTPUT
    from tessera.executors.ort import OrtModel
    from tessera.options import Family
    from tessera_export.onnx_export import export_component, plan_components
    from tessera_export.tiny import load_pipeline

    pipe = load_pipeline(tiny_pipelines["unet"])
    comp = next(c for c in plan_components(pipe, Family.SD, ((16, 16), (16, 24))) if c.name == "denoiser")
    export_component(comp, tmp_path / "unet.onnx", progress=lambda *_: None)
    model = OrtModel(tmp_path / "unet.onnx")

    def call(feeds):
        return model.run(feeds)[DENOISER_OUTPUT]

    g = np.random.default_rng(0)
    for n in (2, 5):
        inputs = {"sample": g.standard_normal((n, 4, 16, 16)).astype(np.float32),
                  "timestep": np.linspace(10, 900, n).astype(np.float32),
                  "encoder_hidden_states": g.standard_normal((n, 77, 32)).astype(np.float32)}
        whole, split = call(inputs), RowParallel(call)(inputs)
        assert split.shape == whole.shape
        assert np.abs(split - whole).max() <= 1e-5 * max(1.0, np.abs(whole).max())


def test_row_parallel_auto_splits_only_small_calls():
    calls = []

    def call(inputs):
        calls.append(inputs["sample"].shape[0])
        return inputs["sample"] * 2

    par = RowParallel(call, max_rows=2)
    for n in (2, 4):
        x = {"sample": np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)}
        assert np.array_equal(par(x), x["sample"] * 2)
    assert sorted(calls) == [1, 1, 4]  # 2 rows: two halves; 4 rows (a batched step): one call
    from tessera.options import CfgParallel

    assert EngineConfig(executor="local", cfg_parallel="auto").cfg_parallel is CfgParallel.AUTO


def test_cfg_parallel_needs_the_local_ort_executor():
    assert EngineConfig(executor="local", cfg_parallel="on").cfg_parallel
    for kw in ({"executor": "bls"}, {"executor": "local", "denoiser_runtime": "torch"}):
        with pytest.raises(ConfigError, match="cfg_parallel: 'on' .* allowed with executor=local"):
            EngineConfig(cfg_parallel="on", **kw)
    with pytest.raises(ConfigError, match="cfg_parallel: unknown value; allowed off, on"):
        EngineConfig(cfg_parallel="yes")
