"""Degree k > 1 over real denoiser worker processes (executors/workers.py, joined by torch.distributed / gloo):
the sequence-parallel SD3 DiT at k = 2 equals k = 1 per step within 1e-4 (fp32) at three resolutions, and the
UNet's CFG split equals the unsplit step; both also equal the model called in this process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tessera.executors.denoise import torch_forward
from tessera.executors.sequence_parallel import shard_bounds
from tessera.executors.workers import PooledDenoiser, WorkerPool, blocks
from tessera.options import Family

SIZES = ((16, 16), (16, 24), (24, 40))  # latent (h, w): 128x128, 128x192, 192x320 images; 24x40 leaves a ragged shard


def _inputs(family: Family, h: int, w: int, seed: int, rows: int = 2) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    out = {"sample": g.standard_normal((rows, 4 if family is Family.SD else 16, h, w)).astype(np.float32),
           "timestep": np.full((rows,), 500.0 if family is Family.SD else 700.0, np.float32),
           "encoder_hidden_states": g.standard_normal((rows, 77, 32)).astype(np.float32)}
    if family is Family.SD3:
        out["pooled_projections"] = g.standard_normal((rows, 64)).astype(np.float32)
    return out


def _local(path, family: Family, item: dict) -> np.ndarray:
    from tessera.executors.factory import load_denoiser_module

    model = load_denoiser_module(path, family)
    with torch.no_grad():
        return torch_forward(model, family, {k: torch.from_numpy(v) for k, v in item.items()}).numpy()


def _fit(item: dict, path, family: Family) -> dict:
    """The random inputs cut to the saved model's widths (text width, pooled width)."""
    import json

    cfg = json.loads((path / "config.json").read_text())
    width = cfg.get("cross_attention_dim") or cfg.get("joint_attention_dim")
    item = dict(item, encoder_hidden_states=np.ascontiguousarray(item["encoder_hidden_states"][..., :width]))
    if width > item["encoder_hidden_states"].shape[-1]:
        pad = width - item["encoder_hidden_states"].shape[-1]
        item["encoder_hidden_states"] = np.pad(item["encoder_hidden_states"], ((0, 0), (0, 0), (0, pad)))
    if family is Family.SD3:
        pw = cfg["pooled_projection_dim"]
        item["pooled_projections"] = np.resize(item["pooled_projections"], (item["sample"].shape[0], pw)).astype(np.float32)
        item["sample"] = np.ascontiguousarray(item["sample"][:, : cfg["in_channels"]])
    else:
        item["sample"] = np.ascontiguousarray(item["sample"][:, : cfg["in_channels"]])
    return item


def test_blocks_and_shards():
    assert blocks(4) == [(0,), (1,), (2,), (3,), (0, 1), (2, 3), (0, 1, 2, 3)]
    assert blocks(1) == [(0,)]
    assert [shard_bounds(10, 3, r) for r in range(3)] == [(0, 4, 4), (4, 8, 4), (8, 10, 4)]
    assert shard_bounds(2, 4, 3) == (2, 2, 1)  # fewer tokens than workers: an empty shard


@pytest.fixture(scope="module")
def dit_pool(tiny_pipelines):
    pool = WorkerPool(tiny_pipelines["dit"] / "transformer", Family.SD3, 2)
    yield pool
    pool.close()


@pytest.mark.parametrize("size", SIZES)
def test_sequence_parallel_dit_k2_equals_k1(tiny_pipelines, dit_pool, size):
    path = tiny_pipelines["dit"] / "transformer"
    item = _fit(_inputs(Family.SD3, *size, seed=sum(size)), path, Family.SD3)
    den = PooledDenoiser(dit_pool)
    (one,), s1 = den.run([item], places=[(0,)])
    (two,), s2 = den.run([item], places=[(0, 1)])
    assert s1.places == ((0,),) and s2.places == ((0, 1),)
    assert one.shape == two.shape == item["sample"].shape
    assert np.abs(two - one).max() <= 1e-4
    assert np.abs(one - _local(path, Family.SD3, item)).max() <= 1e-5  # degree 1 in a worker: the model itself
    assert np.abs(one).max() > 1e-2  # a real output, not zeros


def test_unet_cfg_split_equals_unsplit(tiny_pipelines):
    path = tiny_pipelines["unet"] / "unet"
    item = _fit(_inputs(Family.SD, 16, 24, seed=3), path, Family.SD)
    pool = WorkerPool(path, Family.SD, 2)
    try:
        den = PooledDenoiser(pool)
        (one,), _ = den.run([item], places=[(1,)])
        (two,), _ = den.run([item], places=[(0, 1)])  # the CFG halves on different workers
        (three,), _ = den.run([dict(item, **{k: v[:1] for k, v in item.items()})], places=[(0, 1)])  # 1 row, 2 workers
    finally:
        pool.close()
    assert np.abs(two - one).max() <= 1e-4
    assert np.abs(three - one[:1]).max() <= 1e-4
    assert np.abs(one - _local(path, Family.SD, item)).max() <= 1e-5


def test_workers_batch_per_place_and_run_sets_side_by_side(tiny_pipelines, dit_pool):
    """Two requests on worker 0 share one call, a third on worker 1 runs beside them; each equals its own call."""
    path = tiny_pipelines["dit"] / "transformer"
    items = [_fit(_inputs(Family.SD3, 16, 16, seed=s), path, Family.SD3) for s in (1, 2, 3)]
    den = PooledDenoiser(dit_pool)
    outs, stats = den.run(items, places=[(0,), (0,), (1,)])
    assert stats.places == ((0,), (1,)) and stats.requests == (2, 1) and stats.batch == (4, 2)
    for it, out in zip(items, outs, strict=True):
        assert np.abs(out - _local(path, Family.SD3, it)).max() <= 1e-4
    with pytest.raises(RuntimeError, match="adapters"):
        den.run(items[:1], adapters=[("x",)], places=[(0,)])
