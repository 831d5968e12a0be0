"""Causal attention of this step's queries over each sequence's paged KV cache (prefill and decode alike).

Sequence b owns queries q[query_start_loc[b]:query_start_loc[b+1]]; its context (cached tokens plus the
new ones, already written to the cache) has seq_lens[b] tokens, so its i-th query sits at position
seq_lens[b] - q_len_b + i and sees keys 0..that position. Decode is q_len 1; a first prefill chunk has
q_len == seq_len; a later chunk (chunked prefill, prefix reuse) starts after cached context.
block_tables[b, j] is the cache block holding positions j*block_size .. (j+1)*block_size-1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[num_blocks, block_size, kvh, D] -> this sequence's first seq_len positions, [seq_len, kvh, D]."""
    block_size = cache.shape[1]
    pos = torch.arange(seq_len, device=cache.device)
    blocks = block_table[pos // block_size].long()
    return cache[blocks, pos % block_size]


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Reference: gathers each sequence's keys into a contiguous tensor and calls SDPA.

    Decode rows (one query each) are batched in one SDPA call; prefill rows go one sequence at a time.
    Returns [T, num_heads, head_dim] in q's dtype.
    """
    num_heads = q.shape[1]
    group = num_heads // k_cache.shape[2]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decode, prefill = [], []
    for b in range(len(lens)):
        (decode if starts[b + 1] - starts[b] == 1 else prefill).append(b)

    if decode:
        # One batched call: gather every decode row's context at once (padding masked out).
        rows_b = torch.tensor(decode, device=q.device)
        max_len = max(lens[b] for b in decode)
        block_size = k_cache.shape[1]
        pos = torch.arange(max_len, device=q.device)
        blocks = block_tables[rows_b][:, pos // block_size].long()  # [n, L]
        keys = k_cache[blocks, pos % block_size].transpose(1, 2)  # [n, kvh, L, D]
        vals = v_cache[blocks, pos % block_size].transpose(1, 2)
        mask = pos[None, :] < seq_lens[rows_b][:, None]
        rows = query_start_loc[rows_b].long()
        o = F.scaled_dot_product_attention(
            q[rows].unsqueeze(2), keys.repeat_interleave(group, dim=1), vals.repeat_interleave(group, dim=1),
            attn_mask=mask[:, None, None, :], scale=scale)
        out[rows] = o.squeeze(2)

    for b in prefill:
        s, e, n = starts[b], starts[b + 1], lens[b]
        q_len = e - s
        keys = _gather_context(k_cache, block_tables[b], n).transpose(0, 1).repeat_interleave(group, dim=0)
        vals = _gather_context(v_cache, block_tables[b], n).transpose(0, 1).repeat_interleave(group, dim=0)
        q_pos = torch.arange(n - q_len, n, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), keys, vals, attn_mask=mask, scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out
