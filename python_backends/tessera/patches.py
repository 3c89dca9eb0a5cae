"""Patch batching (PatchedServe §3): cut latents of any resolutions into equal patches, index them, and
run ONE denoiser call on all patches with exact results.

`PatchIndex` is the CSP-style index: images are ordered by resolution group, then by request;
`resolution_offset[g]` and `image_offset[i]` are the first patch of each group and image; every patch
has its image, grid position and an 8-neighbour table whose entry `n_patches` is the image-border
sentinel (a zero patch). `cut` and `stitch` convert between images and patches.

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
from dataclasses import dataclass, field
from functools import reduce

import torch
import torch.nn.functional as F

# Neighbour order in the table: up, down, left, right, up-left, up-right, down-left, down-right.
NEIGHBOUR_OFFSETS = ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1))


@dataclass(frozen=True, slots=True)
class ResolutionGroup:
    height: int  # latent cells
    width: int
    images: tuple[int, ...]  # image ids (positions in the caller's image list), in patch order
    patch_start: int  # ResolutionOffset
    grid_h: int
    grid_w: int


@dataclass(slots=True)
class PatchIndex:
    patch: int  # patch edge in latent cells
    image_sizes: list[tuple[int, int]]  # per caller image: (h, w) in latent cells
    groups: list[ResolutionGroup]
    image_offset: list[int]  # RequestOffset: first patch of each image (caller order)
    patch_image: torch.Tensor  # [N] int64: image id of each patch
    patch_gy: torch.Tensor  # [N] int64: grid row inside its image
    patch_gx: torch.Tensor  # [N] int64
    neighbours: torch.Tensor  # [N, 8] int64; value N = image border (zero patch)
    _gather: dict = field(default_factory=dict)  # token-level reassembly indices, by (group, edge)

    @property
    def n_patches(self) -> int:
        return int(self.patch_image.shape[0])

    @property
    def n_images(self) -> int:
        return len(self.image_sizes)

    @classmethod
    def build(cls, image_sizes: list[tuple[int, int]], patch: int) -> PatchIndex:
        for h, w in image_sizes:
            if h % patch or w % patch:
                raise ValueError(f"patch: {patch} does not divide latent size {h}x{w}")
        order: dict[tuple[int, int], list[int]] = {}
        for i, hw in enumerate(image_sizes):
            order.setdefault(tuple(hw), []).append(i)
        groups, image_offset = [], [0] * len(image_sizes)
        p_img, p_gy, p_gx, nbrs = [], [], [], []
        start = 0
        for (h, w), images in sorted(order.items()):
            gh, gw = h // patch, w // patch
            groups.append(ResolutionGroup(h, w, tuple(images), start, gh, gw))
            for img in images:
                image_offset[img] = start
                for gy in range(gh):
                    for gx in range(gw):
                        p_img.append(img)
                        p_gy.append(gy)
                        p_gx.append(gx)
                        row = []
                        for dy, dx in NEIGHBOUR_OFFSETS:
                            ny, nx = gy + dy, gx + dx
                            inside = 0 <= ny < gh and 0 <= nx < gw
                            row.append(start + ny * gw + nx if inside else -1)
                        nbrs.append(row)
                start += gh * gw
        neighbours = torch.tensor(nbrs, dtype=torch.int64).reshape(-1, 8)
        neighbours[neighbours < 0] = start  # the border sentinel
        return cls(
            patch, [tuple(s) for s in image_sizes], groups, image_offset,
            torch.tensor(p_img, dtype=torch.int64), torch.tensor(p_gy, dtype=torch.int64),
            torch.tensor(p_gx, dtype=torch.int64), neighbours,
        )

    # -- images <-> patches ------------------------------------------------------------------------
    def cut(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Images [C, h, w] (caller order) -> patches [N, C, p, p] in index order."""
        p = self.patch
        out = []
        for g in self.groups:
            stack = torch.stack([images[i] for i in g.images])  # [B, C, h, w]
            b, c = stack.shape[:2]
            x = stack.reshape(b, c, g.grid_h, p, g.grid_w, p).permute(0, 2, 4, 1, 3, 5)
            out.append(x.reshape(b * g.grid_h * g.grid_w, c, p, p))
        return torch.cat(out)

    def stitch(self, patches: torch.Tensor) -> list[torch.Tensor]:
        """Patches [N, C, p, p] -> images [C, h, w] in caller order."""
        p = self.patch
        images: list[torch.Tensor | None] = [None] * self.n_images
        for g in self.groups:
            n = len(g.images) * g.grid_h * g.grid_w
            x = patches[g.patch_start : g.patch_start + n]
            c = x.shape[1]
            x = x.reshape(len(g.images), g.grid_h, g.grid_w, c, p, p).permute(0, 3, 1, 4, 2, 5)
            x = x.reshape(len(g.images), c, g.height, g.width)
            for k, img in enumerate(g.images):
                images[img] = x[k]
        return images  # type: ignore[return-value]

    def per_patch(self, per_image: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-image tensor [n_images, ...] to patches [N, ...]."""
        return per_image[self.patch_image]

    # -- exact ops ---------------------------------------------------------------------------------
    def halo(self, x: torch.Tensor, width: int = 1) -> torch.Tensor:
        """[N, C, q, q] -> [N, C, q+2w, q+2w] with neighbours' edges (zeros at image borders)."""
        w = width
        ext = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])  # sentinel patch
        nb = self.neighbours
        up, down, left, right = ext[nb[:, 0]], ext[nb[:, 1]], ext[nb[:, 2]], ext[nb[:, 3]]
        ul, ur, dl, dr = ext[nb[:, 4]], ext[nb[:, 5]], ext[nb[:, 6]], ext[nb[:, 7]]
        top = torch.cat([ul[..., -w:, -w:], up[..., -w:, :], ur[..., -w:, :w]], dim=-1)
        mid = torch.cat([left[..., :, -w:], x, right[..., :, :w]], dim=-1)
        bottom = torch.cat([dl[..., :w, -w:], down[..., :w, :], dr[..., :w, :w]], dim=-1)
        return torch.cat([top, mid, bottom], dim=-2)

    def group_norm(self, gn: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        g = gn.num_groups
        xg = x.reshape(n, g, -1)
        count = torch.zeros(self.n_images, dtype=x.dtype).index_add_(
            0, self.patch_image, torch.full((n,), float(xg.shape[-1]), dtype=x.dtype)
        )[:, None]
        mean = torch.zeros(self.n_images, g, dtype=x.dtype).index_add_(0, self.patch_image, xg.sum(-1)) / count
        centred = xg - mean[self.patch_image][..., None]
        var = torch.zeros(self.n_images, g, dtype=x.dtype).index_add_(
            0, self.patch_image, centred.pow(2).sum(-1)
        ) / count
        y = centred / torch.sqrt(var[self.patch_image][..., None] + gn.eps)
        y = y.reshape_as(x)
        if gn.affine:
            shape = (1, c) + (1,) * (x.dim() - 2)
            y = y * gn.weight.reshape(shape) + gn.bias.reshape(shape)
        return y

    def gather_index(self, group: int, edge: int) -> torch.Tensor:
        """Flat token indices (patch-major, `edge` x `edge` tokens per patch) of group `group`'s images,
        in each image's row-major order: shape [B_g, H_tok * W_tok]."""
        key = (group, edge)
        if key not in self._gather:
            g = self.groups[group]
            b = len(g.images)
            pid = torch.arange(b * g.grid_h * g.grid_w).reshape(b, g.grid_h, g.grid_w) + g.patch_start
            ty = torch.arange(edge)
            # [b, gh, ty, gw, tx] -> patch id * T + ty * edge + tx
            idx = (pid[:, :, None, :, None] * edge * edge + ty[None, None, :, None, None] * edge
                   + ty[None, None, None, None, :])
            self._gather[key] = idx.reshape(b, -1)
        return self._gather[key]

    def whole_images(self, tokens: torch.Tensor):
        """Tokens [N, T, C] (patch layout) -> per group: (group id, gather index, [B_g, L, C])."""
        n, t, c = tokens.shape
        edge = math.isqrt(t)
        flat = tokens.reshape(n * t, c)
        for gi in range(len(self.groups)):
            idx = self.gather_index(gi, edge)
            yield gi, idx, flat[idx.reshape(-1)].reshape(idx.shape[0], idx.shape[1], c)

    def first_patch_of_images(self, group: int) -> torch.Tensor:
        g = self.groups[group]
        per = g.grid_h * g.grid_w
        return torch.arange(len(g.images)) * per + g.patch_start


def patch_edge(sizes: list[tuple[int, int]], multiple: int, configured: int = 0) -> int:
    """The patch edge (latent cells): `configured` if set, else the GCD of all sizes; a multiple of
    `multiple` (the denoiser's downsampling or DiT patch size)."""
    edge = configured or reduce(math.gcd, [d for hw in sizes for d in hw])
    if edge % multiple:
        raise ValueError(f"patch_size: must be a multiple of {multiple}; got {edge} for sizes {sizes}")
    return edge


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
        for _, idx, whole in self.index.whole_images(hidden_states):
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
        for gi, idx, whole in self.index.whole_images(hidden_states):
            first = self.index.first_patch_of_images(gi)
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
                return F.conv2d(index.halo(x, width), m.weight, m.bias, m.stride, 0, m.dilation, m.groups)

            swap_forward(module, conv)
        elif isinstance(module, torch.nn.GroupNorm):
            swap_forward(module, lambda x, m=module: index.group_norm(m, x))
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
        idx = index.gather_index(gi, edge)  # [B, L]
        flat[idx.reshape(-1)] = full.repeat(idx.shape[0], 1)
    return (x + pos).to(x.dtype)
