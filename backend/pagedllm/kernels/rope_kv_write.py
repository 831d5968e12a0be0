"""Rotary embedding of Q and K, fused with the scatter of K and V into the paged KV cache.

Layouts used everywhere in pagedllm:
- q: [T, num_heads, head_dim], k and v: [T, num_kv_heads, head_dim] (T = tokens of this step, all sequences)
- positions: [T] int32 (what the engine passes; int64 works too), the token's position in its sequence
- cos_sin: [max_positions, head_dim] float32, cos in the first half of the last dim, sin in the second
  (neox / HF `rotate_half` style: dims i and i + head_dim/2 rotate together)
- k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
- slot_mapping: [T] int32 like positions (int64 works too), block * block_size + offset of the token's cache
  slot; negative = padding, skipped. The kernel widens it to int64 before computing cache offsets.
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


# ----------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------
# _triton_util first: it may set TRITON_INTERPRET before triton loads
from ._triton_util import Launch, next_pow2, run  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _rope_kv_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cs_ptr, kc_ptr, vc_ptr, slot_ptr,
                    num_heads, num_kv_heads, block_size,
                    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                    stride_cb, stride_cslot, stride_ch,
                    HEAD_DIM: tl.constexpr, HALF_P: tl.constexpr, BLOCK_H: tl.constexpr):
    """Grid (T, cdiv(H + 2 * KVH, BLOCK_H)). Program (t, c) handles BLOCK_H of token t's "heads", numbered
    q heads first, then k heads, then v heads: q and k heads are rotated in place (neox style, rounding like
    transformers: both products rounded to the activations' dtype, then their sum), k and v heads are
    written to their cache slot unless the slot is negative. Each head is handled as two halves of
    HALF_P (= next power of two >= HEAD_DIM / 2) lanes, masked, so head dims 80 / 96 work."""
    HALF: tl.constexpr = HEAD_DIM // 2
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H] head index over q | k | v
    d = tl.arange(0, HALF_P)
    dmask = d < HALF
    is_q = j < num_heads
    is_k = (j >= num_heads) & (j < num_heads + num_kv_heads)
    is_v = (j >= num_heads + num_kv_heads) & (j < num_heads + 2 * num_kv_heads)
    hk = tl.where(is_k, j - num_heads, 0)
    hv = tl.where(is_v, j - num_heads - num_kv_heads, 0)
    hq = tl.where(is_q, j, 0)
    k_row = k_ptr + t * stride_kt + hk * stride_kh
    v_row = v_ptr + t * stride_vt + hv * stride_vh
    row = tl.where(is_q, q_ptr + t * stride_qt + hq * stride_qh, tl.where(is_k, k_row, v_row))
    valid = (is_q | is_k | is_v)[:, None] & dmask[None, :]
    p1 = row[:, None] + d[None, :]
    x1 = tl.load(p1, mask=valid, other=0.0)
    x2 = tl.load(p1 + HALF, mask=valid, other=0.0)

    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cs_ptr + pos * stride_cs + d, mask=dmask, other=0.0).to(x1.dtype).to(tl.float32)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + d, mask=dmask, other=0.0).to(x1.dtype).to(tl.float32)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    a1 = (x1f * cos[None, :]).to(x1.dtype).to(tl.float32)
    b1 = (-x2f * sin[None, :]).to(x1.dtype).to(tl.float32)
    a2 = (x2f * cos[None, :]).to(x1.dtype).to(tl.float32)
    b2 = (x1f * sin[None, :]).to(x1.dtype).to(tl.float32)
    rot = (is_q | is_k)[:, None]
    y1 = tl.where(rot, (a1 + b1).to(x1.dtype), x1)
    y2 = tl.where(rot, (a2 + b2).to(x1.dtype), x2)
    # q and k are rotated in place (v is left alone).
    tl.store(p1, y1, mask=valid & rot)
    tl.store(p1 + HALF, y2, mask=valid & rot)

    slot = tl.load(slot_ptr + t).to(tl.int64)  # int64 math: block * stride_cb can pass 2**31
    blk = tl.where(slot >= 0, slot, 0) // block_size
    off = tl.where(slot >= 0, slot, 0) % block_size
    h_cache = tl.where(is_k, hk, hv)
    c_off = blk * stride_cb + off * stride_cslot + h_cache * stride_ch
    c_row = tl.where(is_k, kc_ptr + c_off, vc_ptr + c_off)
    c1 = c_row[:, None] + d[None, :]
    cmask = valid & (is_k | is_v)[:, None] & (slot >= 0)
    tl.store(c1, y1.to(kc_ptr.dtype.element_ty), mask=cmask)
    tl.store(c1 + HALF, y2.to(kc_ptr.dtype.element_ty), mask=cmask)


def _plan_rope_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping):
    T, H, D = q.shape
    KVH = k.shape[1]
    if k.shape != (T, KVH, D) or v.shape != (T, KVH, D):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if k_cache.shape[2:] != (KVH, D) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not match "
                         f"k {tuple(k.shape)}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must have the same strides and a unit stride in the last dim")
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dim (it may be a strided view)")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} is {x.dtype}, q is {q.dtype}")
    if cos_sin.stride(-1) != 1:
        cos_sin = cos_sin.contiguous()
    positions, slot_mapping = positions.contiguous(), slot_mapping.contiguous()
    n_heads = H + 2 * KVH
    block_h = min(16, next_pow2(n_heads))
    half_p = next_pow2(D // 2)
    ln = Launch(_rope_kv_kernel, (T, triton.cdiv(n_heads, block_h)), dict(
        q_ptr=q, k_ptr=k, v_ptr=v, pos_ptr=positions, cs_ptr=cos_sin, kc_ptr=k_cache, vc_ptr=v_cache,
        slot_ptr=slot_mapping, num_heads=H, num_kv_heads=KVH, block_size=k_cache.shape[1],
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1), stride_cs=cos_sin.stride(0),
        stride_cb=k_cache.stride(0), stride_cslot=k_cache.stride(1), stride_ch=k_cache.stride(2),
        HEAD_DIM=D, HALF_P=half_p, BLOCK_H=block_h), constexprs=("HEAD_DIM", "HALF_P", "BLOCK_H"),
        # Each product is rounded to the activations' dtype before the sum, as transformers' rope does; an FMA
        # (the GPU compiler turns these into fp16x2 FMAs) would round once and drift by an ulp.
        num_warps=4, fp_fusion=False)
    return [ln]


def rope_and_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                             cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slot_mapping: torch.Tensor) -> None:
    """Triton version of `rope_and_write_kv_torch`: one launch rotates q and k in place and scatters k, v
    into the cache (negative slots skipped; their q and k are still rotated, like the reference).

    q [T, H, D], k and v [T, KVH, D] may be strided views (e.g. slices of a fused qkv projection) but need a
    unit stride in the last dim; positions and slot_mapping are int32 [T] (int64 works too); cos_sin is
    float32 [max_pos, D]; k_cache and v_cache share shape and strides, [num_blocks, block_size, KVH, D].
    """
    run(_plan_rope_and_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping), q.device)
