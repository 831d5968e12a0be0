"""Rotary embedding of Q and K, fused with the scatter of K and V into the paged KV cache.

Layouts used everywhere in pagedllm:
- q: [T, num_heads, head_dim], k and v: [T, num_kv_heads, head_dim] (T = tokens of this step, all sequences)
- positions: [T] int64, the token's position in its sequence
- cos_sin: [max_positions, head_dim] float32, cos in the first half of the last dim, sin in the second
  (neox / HF `rotate_half` style: dims i and i + head_dim/2 rotate together)
- k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
- slot_mapping: [T] int64, block * block_size + offset of the token's cache slot; negative = padding, skipped
"""
from __future__ import annotations

import torch


def apply_rope_torch(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D] -> rotated copy, computed like transformers (cos/sin cast to x's dtype first)."""
    half = x.shape[-1] // 2
    cs = cos_sin[positions]  # [T, D]
    cos = cs[:, :half].repeat(1, 2).unsqueeze(1).to(x.dtype)
    sin = cs[:, half:].repeat(1, 2).unsqueeze(1).to(x.dtype)
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_and_write_kv_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                            cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor) -> None:
    """Reference. Rotates q and k in place and writes k, v to their cache slots."""
    q.copy_(apply_rope_torch(q, positions, cos_sin))
    k.copy_(apply_rope_torch(k, positions, cos_sin))
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = k[valid].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = v[valid].to(v_cache.dtype)
