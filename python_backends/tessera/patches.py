"""Patch batching (PatchedServe §3): cut latents of any resolutions into equal patches, index them, and
run ONE denoiser call on all patches with exact results.

`PatchIndex` (patch_index.py, torch-free) is the CSP-style index of the patches: each patch's image, grid
position and 8 neighbours. `cut_patches` and `stitch_patches` convert between images and patches; the
functions here use the index's arrays as tensors, converted once per index.

`exact_patch_mode(model, index)` makes a diffusers UNet2DConditionModel or SD3Transformer2DModel
compute on patches exactly what it computes on whole images:
  * kxk convolutions (k odd) read a k//2-cell halo from neighbour patches (zeros only at true image borders);
  * GroupNorm statistics are reduced per image across all its patches (two-pass mean/variance);
  * self-attention (and SD3 joint attention) runs on each image reassembled, batched per resolution
    group, and is scattered back; SD3 positional embeddings are cut from each image's own embedding.
Everything else (1x1 convs, LayerNorm, cross-attention, MLPs, time embeddings) is per position or per
item already. Outputs equal whole-image inference up to float summation order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .patch_index import PatchIndex


# -- the index as tensors ----------------------------------------------------------------------------------
def _tensor(index: PatchIndex, name: str, device: torch.device) -> torch.Tensor:
    """The index's int64 array `name` (patch_image, neighbours, ...) as a tensor on `device` (the
    activations'), converted once per index and device."""
    return index.memo(("torch", name, device), lambda: torch.from_numpy(getattr(index, name)).to(device))


def _gather_tensor(index: PatchIndex, group: int, edge: int, device: torch.device) -> torch.Tensor:
    return index.memo(("torch gather", group, edge, device),
                      lambda: torch.from_numpy(index.gather_index(group, edge)).to(device))


def _first_patches_tensor(index: PatchIndex, group: int, device: torch.device) -> torch.Tensor:
    return index.memo(("torch first", group, device),
                      lambda: torch.from_numpy(index.first_patch_of_images(group)).to(device))


# -- images <-> patches ------------------------------------------------------------------------------------
def cut_patches(index: PatchIndex, images: list[torch.Tensor]) -> torch.Tensor:
    """Images [C, h, w] (caller order) -> patches [N, C, p, p] in index order."""
    p = index.patch
    out = []
    for g in index.groups:
        stack = torch.stack([images[i] for i in g.images])  # [B, C, h, w]
        b, c = stack.shape[:2]
        x = stack.reshape(b, c, g.grid_h, p, g.grid_w, p).permute(0, 2, 4, 1, 3, 5)
        out.append(x.reshape(b * g.grid_h * g.grid_w, c, p, p))
    return torch.cat(out)


def stitch_patches(index: PatchIndex, patches: torch.Tensor) -> list[torch.Tensor]:
    """Patches [N, C, p, p] -> images [C, h, w] in caller order."""
    p = index.patch
    images: list[torch.Tensor | None] = [None] * index.n_images
    for g in index.groups:
        n = len(g.images) * g.grid_h * g.grid_w
        x = patches[g.patch_start : g.patch_start + n]
        c = x.shape[1]
        x = x.reshape(len(g.images), g.grid_h, g.grid_w, c, p, p).permute(0, 3, 1, 4, 2, 5)
        x = x.reshape(len(g.images), c, g.height, g.width)
        for k, img in enumerate(g.images):
            images[img] = x[k]
    return images  # type: ignore[return-value]


def per_patch(index: PatchIndex, per_image: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-image tensor [n_images, ...] to patches [N, ...]."""
    return per_image[_tensor(index, "patch_image", per_image.device)]


# -- exact ops ---------------------------------------------------------------------------------------------
def halo(index: PatchIndex, x: torch.Tensor, width: int = 1) -> torch.Tensor:
    """[N, C, q, q] -> [N, C, q+2w, q+2w] with neighbours' edges (zeros at image borders)."""
    w = width
    ext = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])  # sentinel patch
    nb = _tensor(index, "neighbours", x.device)
    up, down, left, right = ext[nb[:, 0]], ext[nb[:, 1]], ext[nb[:, 2]], ext[nb[:, 3]]
    ul, ur, dl, dr = ext[nb[:, 4]], ext[nb[:, 5]], ext[nb[:, 6]], ext[nb[:, 7]]
    top = torch.cat([ul[..., -w:, -w:], up[..., -w:, :], ur[..., -w:, :w]], dim=-1)
    mid = torch.cat([left[..., :, -w:], x, right[..., :, :w]], dim=-1)
    bottom = torch.cat([dl[..., :w, -w:], down[..., :w, :], dr[..., :w, :w]], dim=-1)
    return torch.cat([top, mid, bottom], dim=-2)


def group_norm(index: PatchIndex, gn: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    n, c = x.shape[:2]
    g = gn.num_groups
    patch_image = _tensor(index, "patch_image", x.device)
    acc = torch.promote_types(x.dtype, torch.float32)  # fp16 statistics in fp32, as nn.GroupNorm has them
    xg = x.reshape(n, g, -1).to(acc)
    count = torch.zeros(index.n_images, dtype=acc, device=x.device).index_add_(
        0, patch_image, torch.full((n,), float(xg.shape[-1]), dtype=acc, device=x.device)
    )[:, None]
    per_image = lambda: torch.zeros(index.n_images, g, dtype=acc, device=x.device)  # noqa: E731
    mean = per_image().index_add_(0, patch_image, xg.sum(-1)) / count
    centred = xg - mean[patch_image][..., None]
    var = per_image().index_add_(0, patch_image, centred.pow(2).sum(-1)) / count
    y = centred / torch.sqrt(var[patch_image][..., None] + gn.eps)
    y = y.reshape_as(x)
    if gn.affine:
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = y * gn.weight.reshape(shape) + gn.bias.reshape(shape)
    return y.to(x.dtype)


def whole_images(index: PatchIndex, tokens: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Tokens [N, T, C] (patch layout) -> per group: (group id, gather index, [B_g, L, C])."""
    n, t, c = tokens.shape
    edge = math.isqrt(t)
    flat = tokens.reshape(n * t, c)
    for gi in range(len(index.groups)):
        idx = _gather_tensor(index, gi, edge, tokens.device)
        yield gi, idx, flat[idx.reshape(-1)].reshape(idx.shape[0], idx.shape[1], c)


# -- swapping the model's non-local ops ------------------------------------------------------------------
class _PatchSelfAttn:
    """Self-attention on whole images: reassemble tokens per resolution group, attend, scatter back."""

    def __init__(self, inner, index: PatchIndex):
        self.inner, self.index = inner, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        if encoder_hidden_states is not None:  # cross-attention: per position already
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kw)
        if hidden_states.dim() != 3:
            raise NotImplementedError("exact patches: spatial (4-d) self-attention is not supported")
        out = hidden_states.new_empty(hidden_states.shape)
        flat = out.view(-1, out.shape[-1])
        for _, idx, whole in whole_images(self.index, hidden_states):
            res = self.inner(attn, whole, None, attention_mask, temb, **kw)
            flat[idx.reshape(-1)] = res.reshape(-1, res.shape[-1])
        return out


class _PatchJointAttn:
    """SD3 joint attention: each image's tokens plus its (per-image) context, scattered back."""

    def __init__(self, inner, index: PatchIndex):
        self.inner, self.index = inner, index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kw):
        out = hidden_states.new_empty(hidden_states.shape)
        flat = out.view(-1, out.shape[-1])
        ctx_out = None
        for gi, idx, whole in whole_images(self.index, hidden_states):
            first = _first_patches_tensor(self.index, gi, encoder_hidden_states.device)
            ctx = encoder_hidden_states[first]  # every patch carries its image's context: take one copy
            res = self.inner(attn, whole, ctx, attention_mask)
            img_out, c_out = res if isinstance(res, tuple) else (res, None)
            flat[idx.reshape(-1)] = img_out.reshape(-1, img_out.shape[-1])
            if c_out is not None:
                if ctx_out is None:
                    ctx_out = encoder_hidden_states.new_empty((hidden_states.shape[0], *c_out.shape[1:]))
                g = self.index.groups[gi]
                per = g.grid_h * g.grid_w
                ctx_out[g.patch_start : g.patch_start + per * len(g.images)] = c_out.repeat_interleave(per, 0)
        return (out, ctx_out) if ctx_out is not None else out


@contextlib.contextmanager
def exact_patch_mode(model: torch.nn.Module, index: PatchIndex):
    """Within the block, `model(patches, ...)` computes exactly what it computes on whole images."""
    undo = []

    def swap_forward(module, fn):
        module.forward = fn
        undo.append(lambda m=module: m.__dict__.pop("forward", None))

    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1) and module.padding != (0, 0):
            k = module.kernel_size[0]
            if module.kernel_size != (k, k) or k % 2 == 0 or module.padding != (k // 2, k // 2) \
                    or module.dilation != (1, 1):
                raise NotImplementedError(f"exact patches: unsupported conv {module}")

            def conv(x, m=module, width=k // 2):
                if width > x.shape[-1]:
                    raise NotImplementedError(f"exact patches: a {k}x{k} conv needs patches of >= {width} cells")
                return F.conv2d(halo(index, x, width), m.weight, m.bias, m.stride, 0, m.dilation, m.groups)

            swap_forward(module, conv)
        elif isinstance(module, torch.nn.GroupNorm):
            swap_forward(module, lambda x, m=module: group_norm(index, m, x))
    attn_procs = {}
    if hasattr(model, "attn_processors"):
        attn_procs = dict(model.attn_processors)
        wrapped = {}
        for name, proc in attn_procs.items():
            joint = type(proc).__name__.startswith("JointAttn")
            wrapped[name] = _PatchJointAttn(proc, index) if joint else _PatchSelfAttn(proc, index)
        model.set_attn_processor(wrapped)
    pos = getattr(model, "pos_embed", None)
    if pos is not None and type(pos).__name__ == "PatchEmbed":
        swap_forward(pos, lambda latent, m=pos: _patch_pos_embed(m, latent, index))
    try:
        yield
    finally:
        for fn in undo:
            fn()
        if attn_procs:
            model.set_attn_processor(attn_procs)


def _patch_pos_embed(m, latent: torch.Tensor, index: PatchIndex) -> torch.Tensor:
    """SD3 PatchEmbed on patches: projection per patch, positions cut from each image's embedding."""
    x = m.proj(latent).flatten(2).transpose(1, 2)  # [N, T, D]
    if m.layer_norm:
        x = m.norm(x)
    ps = m.patch_size
    edge = index.patch // ps
    pos = x.new_empty(x.shape)
    flat = pos.view(-1, pos.shape[-1])
    for gi, g in enumerate(index.groups):
        full = m.cropped_pos_embed(g.height, g.width)[0]  # [H_tok * W_tok, D]
        idx = _gather_tensor(index, gi, edge, x.device)  # [B, L]
        flat[idx.reshape(-1)] = full.repeat(idx.shape[0], 1)
    return (x + pos).to(x.dtype)
