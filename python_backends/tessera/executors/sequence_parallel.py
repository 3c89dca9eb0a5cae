"""One denoiser step of a request at degree k > 1 (issue 16, TetriServe §5): k workers share the step.

  SD3-style DiT   sequence parallelism: the image tokens and the text tokens are each cut into k contiguous
                  shards, one per worker; every per-token op (norms, MLPs, projections) runs on the shards
                  only; each joint attention all-gathers the shards' keys and values, so every query still
                  attends over all tokens (image and text). The text stream is sharded too: SD3's 333 text
                  tokens outnumber a 256 px image's 256. The output image tokens are all-gathered at the end.
                  Exact against degree 1 up to summation order.
  SD UNet         the rows split (the CFG halves on different workers; latent parallelism, issue 15).

Every worker of the group calls `parallel_forward` with the same inputs; all return the same output.
Collectives go through `torch.distributed` (gloo on CPU, NCCL on GPU hosts) on the group's process group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..options import Family
from .denoise import torch_forward


def shard_bounds(n: int, k: int, rank: int) -> tuple[int, int, int]:
    """(start, end, padded shard length) of `rank`'s contiguous shard of n tokens over k workers."""
    per = -(-n // k)
    lo = min(rank * per, n)
    return lo, min(lo + per, n), per


def _gather_tokens(x: torch.Tensor, n: int, group, k: int) -> torch.Tensor:
    """All shards [B, n_i, ...] of every worker, concatenated back to [B, n, ...] (shards padded to one length
    for the collective, the padding cut)."""
    import torch.distributed as dist

    per = -(-n // k)
    pad = per - x.shape[1]
    if pad:
        x = torch.cat([x, x.new_zeros((x.shape[0], pad, *x.shape[2:]))], dim=1)
    parts = [torch.empty_like(x) for _ in range(k)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1)[:, :n]


class ShardedJointAttention:
    """diffusers' JointAttnProcessor2_0 for a worker holding one shard of the image tokens (of n) and one of the
    text tokens (of m): its own queries, every worker's keys and values (all-gathered)."""

    def __init__(self, group, k: int, n_tokens: int, m_tokens: int):
        self.group, self.k, self.n, self.m = group, k, n_tokens, m_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        b = hidden_states.shape[0]
        local = hidden_states.shape[1]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        kv = _gather_tokens(torch.cat([key, value], dim=1).transpose(1, 2), self.n, self.group, self.k)  # [B, n, 2H, d]
        key, value = kv.transpose(1, 2).chunk(2, dim=1)
        if encoder_hidden_states is not None:
            cq = heads(attn.add_q_proj(encoder_hidden_states))
            ck = heads(attn.add_k_proj(encoder_hidden_states))
            cv = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            ckv = _gather_tokens(torch.cat([ck, cv], dim=1).transpose(1, 2), self.m, self.group, self.k)
            ck, cv = ckv.transpose(1, 2).chunk(2, dim=1)
            query, key, value = torch.cat([query, cq], 2), torch.cat([key, ck], 2), torch.cat([value, cv], 2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * out.shape[-1]).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, ctx = out[:, :local], out[:, local:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](out)), ctx


def dit_forward_sharded(model, t: dict, group, k: int, rank: int) -> torch.Tensor:
    """SD3Transformer2DModel.forward with the image and text tokens sharded over the group's k workers."""
    height, width = t["sample"].shape[-2:]
    hidden = model.pos_embed(t["sample"])  # patchify + positions for every token (cheap), then this shard
    n = hidden.shape[1]
    lo, hi, _ = shard_bounds(n, k, rank)
    hidden = hidden[:, lo:hi].contiguous()
    temb = model.time_text_embed(t["timestep"], t["pooled_projections"])
    ctx = model.context_embedder(t["encoder_hidden_states"])
    m = ctx.shape[1]
    c_lo, c_hi, _ = shard_bounds(m, k, rank)
    ctx = ctx[:, c_lo:c_hi].contiguous()
    attns = [a for block in model.transformer_blocks for a in (block.attn, getattr(block, "attn2", None)) if a is not None]
    own = [a.processor for a in attns]
    processor = ShardedJointAttention(group, k, n, m)
    try:
        for a in attns:  # set directly (not set_processor): the module's own processor comes back after
            a.processor = processor
        for block in model.transformer_blocks:
            ctx, hidden = block(hidden_states=hidden, encoder_hidden_states=ctx, temb=temb)
    finally:
        for a, p in zip(attns, own, strict=True):
            a.processor = p
    hidden = model.proj_out(model.norm_out(hidden, temb))
    hidden = _gather_tokens(hidden, n, group, k)
    p = model.config.patch_size
    h, w = height // p, width // p
    hidden = hidden.reshape(hidden.shape[0], h, w, p, p, model.out_channels)
    return torch.einsum("nhwpqc->nchpwq", hidden).reshape(hidden.shape[0], model.out_channels, h * p, w * p)


def rows_forward_split(model, family: Family, t: dict, group, k: int, rank: int) -> torch.Tensor:
    """The call's rows cut into k contiguous parts (a lone request's CFG halves: one each), outputs gathered."""
    n = t["sample"].shape[0]
    lo, hi, _ = shard_bounds(n, k, rank)
    if hi > lo:
        out = torch_forward(model, family, {name: v[lo:hi] for name, v in t.items()})
    else:  # fewer rows than workers: this one has none (a UNet's output has the sample's shape)
        out = t["sample"][:0].clone()
    return _gather_tokens(out.unsqueeze(0), n, group, k)[0]


def parallel_forward(model, family: Family, t: dict, group, k: int, rank: int) -> torch.Tensor:
    """One denoiser call at degree k on this worker (rank within the group); degree 1 is the plain forward."""
    if k == 1:
        return torch_forward(model, family, t)
    if family is Family.SD3:
        return dit_forward_sharded(model, t, group, k, rank)
    return rows_forward_split(model, family, t, group, k, rank)
