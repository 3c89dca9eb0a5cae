"""Exact patch mode: one denoiser call on patches of mixed resolutions equals whole-image calls."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tessera.patch_index import PatchIndex, patch_edge
from tessera.patches import cut_patches, exact_patch_mode, halo, per_patch, stitch_patches

SIZES = [(8, 8), (8, 12), (12, 8), (16, 16)]  # latent cells: 4 resolutions, GCD 4


def test_patch_index_offsets_neighbours_and_roundtrip():
    idx = PatchIndex.build([(8, 12), (8, 8), (8, 12)], patch=4)
    assert [(g.height, g.width, g.images, g.patch_start) for g in idx.groups] == [
        (8, 8, (1,), 0), (8, 12, (0, 2), 4)]
    assert idx.image_offset == [4, 0, 10] and idx.n_patches == 16
    # image 1 (8x8) is 2x2 patches 0..3: patch 0's right neighbour is 1, its up neighbour the sentinel.
    assert idx.neighbours[0].tolist() == [16, 2, 16, 1, 16, 16, 16, 3]
    images = [torch.randn(3, h, w) for h, w in [(8, 12), (8, 8), (8, 12)]]
    back = stitch_patches(idx, cut_patches(idx, images))
    assert all(torch.equal(a, b) for a, b in zip(images, back, strict=True))


def test_patch_halo_matches_padded_whole_image():
    idx = PatchIndex.build([(8, 12)], patch=4)
    img = torch.randn(2, 8, 12)
    halos = halo(idx, cut_patches(idx, [img]))
    padded = torch.nn.functional.pad(img, (1, 1, 1, 1))
    for p in range(idx.n_patches):
        gy, gx = int(idx.patch_gy[p]), int(idx.patch_gx[p])
        assert torch.equal(halos[p], padded[:, gy * 4 : gy * 4 + 6, gx * 4 : gx * 4 + 6])


@pytest.mark.parametrize("width", [1, 2, 4])
def test_patch_halo_of_any_width_matches_padded_whole_image(width):
    """k x k convolutions (the quality reference's 9x9 conv_in) read a k//2-cell halo."""
    idx = PatchIndex.build([(8, 12), (8, 8)], patch=4)
    imgs = [torch.randn(2, 8, 12), torch.randn(2, 8, 8)]
    halos = halo(idx, cut_patches(idx, imgs), width)
    for p in range(idx.n_patches):
        img = imgs[int(idx.patch_image[p])]
        padded = torch.nn.functional.pad(img, (width,) * 4)
        gy, gx = int(idx.patch_gy[p]), int(idx.patch_gx[p])
        assert torch.equal(halos[p], padded[:, gy * 4 : gy * 4 + 4 + 2 * width, gx * 4 : gx * 4 + 4 + 2 * width])


def test_patch_edge_gcd_and_multiple():
    assert patch_edge([(16, 16), (16, 24), (24, 16)], 2) == 8
    assert patch_edge([(16, 16)], 2, configured=4) == 4
    with pytest.raises(ValueError, match="patch_size: must be a multiple of 4"):
        patch_edge([(6, 6)], 4)


def test_patch_index_imports_without_torch():
    """The index is part of the pure core: the scheduler/simulator side must not pull torch in."""
    code = "import sys, tessera.patch_index; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _whole_and_patched(model, call, sizes, n_ctx_tokens, ctx_dim, pooled_dim=None):
    torch.manual_seed(0)
    lat = [torch.randn(4, h, w) for h, w in sizes]
    t = torch.tensor([999.0, 500.0, 20.0, 700.0][: len(sizes)])
    ctx = torch.randn(len(sizes), n_ctx_tokens, ctx_dim)
    pooled = torch.randn(len(sizes), pooled_dim) if pooled_dim else None
    with torch.no_grad():
        whole = [
            call(lat[i][None], t[i : i + 1], ctx[i : i + 1], None if pooled is None else pooled[i : i + 1])[0]
            for i in range(len(sizes))
        ]
        idx = PatchIndex.build(sizes, patch_edge(sizes, 2))
        with exact_patch_mode(model, idx):
            out = call(cut_patches(idx, lat), per_patch(idx, t), per_patch(idx, ctx),
                       None if pooled is None else per_patch(idx, pooled))
        patched = stitch_patches(idx, out)
        plain = call(cut_patches(idx, lat), per_patch(idx, t), per_patch(idx, ctx),
                     None if pooled is None else per_patch(idx, pooled))
    return whole, patched, stitch_patches(idx, plain)


def test_exact_patches_unet_equals_whole_images(tiny_pipelines):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipelines["unet"] / "unet").eval()

    def call(x, t, ctx, _):
        return unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

    whole, patched, naive = _whole_and_patched(unet, call, SIZES, 77, 32)
    for w, p, n in zip(whole, patched, naive, strict=True):
        assert w.shape == p.shape
        assert (w - p).abs().max() < 1e-4
    assert max((w - n).abs().max() for w, n in zip(whole, naive, strict=True)) > 1e-2, "naive patching must differ"
    # The model is back to normal afterwards.
    with torch.no_grad():
        again = call(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), torch.zeros(1, 77, 32), None)
    assert again.shape == (1, 4, 8, 8)


def test_exact_patches_dit_equals_whole_images(tiny_pipelines):
    from diffusers import SD3Transformer2DModel

    dit = SD3Transformer2DModel.from_pretrained(tiny_pipelines["dit"] / "transformer").eval()

    def call(x, t, ctx, pooled):
        return dit(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled,
                   return_dict=False)[0]

    whole, patched, naive = _whole_and_patched(dit, call, SIZES, 333, 64, 64)
    for w, p in zip(whole, patched, strict=True):
        assert (w - p).abs().max() < 1e-4
    assert max((w - n).abs().max() for w, n in zip(whole, naive, strict=True)) > 1e-2
