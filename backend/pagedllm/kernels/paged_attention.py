"""Causal attention of this step's queries over each sequence's paged KV cache (prefill and decode alike).

Sequence b owns queries q[query_start_loc[b]:query_start_loc[b+1]]; its context (cached tokens plus the
new ones, already written to the cache) has seq_lens[b] tokens, so its i-th query sits at position
seq_lens[b] - q_len_b + i and sees keys 0..that position. Decode is q_len 1; a first prefill chunk has
q_len == seq_len; a later chunk (chunked prefill, prefix reuse) starts after cached context.
block_tables[b, j] is the cache block holding positions j*block_size .. (j+1)*block_size-1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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
                          scale: float, *, max_query_len: int | None = None,
                          max_seq_len: int | None = None) -> torch.Tensor:
    """Reference: gathers each sequence's keys into a contiguous tensor and calls SDPA.

    Decode rows (one query each) are batched in one SDPA call; prefill rows go one sequence at a time.
    Returns [T, num_heads, head_dim] in q's dtype. max_query_len / max_seq_len are launch hints for the
    Triton version (host ints, so that it needs no .item()); accepted and ignored here so that the engine
    can call either op set the same way.
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
        # GQA without copying K/V per query head: a KV head's query heads become its "query rows".
        n, kvh, dim = len(decode), k_cache.shape[2], q.shape[2]
        o = F.scaled_dot_product_attention(q[rows].view(n, kvh, group, dim), keys, vals,
                                           attn_mask=mask[:, None, None, :], scale=scale)
        out[rows] = o.reshape(n, num_heads, dim)

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


# ----------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------
# _triton_util first: it may set TRITON_INTERPRET before triton loads
from ._triton_util import Launch, interpreting, next_pow2, run  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

_LOG2E = 1.4426950408889634


@triton.jit
def _attn_tiles(q, m_i, l_i, acc, k_base, v_base, bt_row, t_lo, t_hi, kv_len, q_pos, scale_log2, d, d_ok,
                stride_cb, stride_cs, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, FP32_DOT: tl.constexpr, MASKED: tl.constexpr):
    """Online-softmax update of (m_i, l_i, acc) over key tiles t_lo .. t_hi - 1 of one sequence and KV head.

    MASKED: apply the causal mask and skip keys at or past kv_len. Off, every key of the range must be
    visible to every row (the caller's n_full), which spares the compare-and-select on each score and the
    per-key load masks."""
    n = tl.arange(0, TILE_N)
    for t in range(t_lo, t_hi):
        k_pos = t * TILE_N + n
        if MASKED:
            k_ok = k_pos < kv_len
            blk = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        else:
            blk = tl.load(bt_row + k_pos // BLOCK_SIZE).to(tl.int64)
        off = blk * stride_cb + (k_pos % BLOCK_SIZE) * stride_cs
        if MASKED:
            k_t = tl.load(k_base + off[None, :] + d[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(v_base + off[:, None] + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == HEAD_DIM_P:
            k_t = tl.load(k_base + off[None, :] + d[:, None])
            v = tl.load(v_base + off[:, None] + d[None, :])
        else:
            k_t = tl.load(k_base + off[None, :] + d[:, None], mask=d_ok[:, None], other=0.0)
            v = tl.load(v_base + off[:, None] + d[None, :], mask=d_ok[None, :], other=0.0)
        if FP32_DOT:
            s = tl.dot(q, k_t.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k_t)
        if MASKED:
            s = tl.where((k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :], s, float("-inf"))
        # m_i is kept in scaled (log2) units; the scale is applied inside exp2's argument, where it fuses
        # into one FMA per score (max commutes with the positive scale).
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale_log2)
        if MASKED:
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_safe = m_new  # every row saw a key: finite
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s * scale_log2 - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        if FP32_DOT:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _first_tile(q_start, b, BLOCK_Q: tl.constexpr):
    """Number of sequence b's first q tile, whose queries start at row q_start: q_start // BLOCK_Q + b, the + b
    leaving room for each earlier sequence's partial last tile (none with one query per tile)."""
    if BLOCK_Q == 1:
        return q_start
    else:
        return q_start // BLOCK_Q + b


@triton.jit
def _find_sequence(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence that owns q tile `tile`: the last b whose first tile is <= tile, by binary search over
    query_start_loc (first tiles grow with b). Tiles past a sequence's last query map to that sequence."""
    lo = tl.zeros([], tl.int32)
    hi = tl.zeros([], tl.int32) + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if _first_tile(tl.load(qsl_ptr + mid), mid, BLOCK_Q) <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# The batch's shape (how many sequences, tiles, splits) changes every step: left unspecialised, so that one
# compiled kernel serves every batch (Triton would otherwise compile again for ints equal to 1 or divisible by
# 16, a stall of seconds in the middle of serving).
@triton.jit(do_not_specialize=["num_seqs", "num_splits", "num_q_tiles"])
def _paged_attn_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr,
        part_m_ptr, part_l_ptr, part_acc_ptr,
        scale_log2, num_seqs, num_splits, num_q_tiles, num_kv_heads,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_cb, stride_cs, stride_ch, stride_bt,
        HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
        SPLIT: tl.constexpr, FP32_DOT: tl.constexpr):
    """Grid (num_q_tiles * num_kv_heads, num_splits if SPLIT else 1).

    A q tile is BLOCK_Q consecutive query tokens of ONE sequence times the GROUP query heads that share one
    KV head: row r of the [BLOCK_M, HEAD_DIM_P] tile is token r // GROUP, head r % GROUP
    (rows from BLOCK_Q * GROUP on are padding), so decode (BLOCK_Q = 1) still feeds tl.dot 16+ rows.
    Tiles are numbered without a host-side table: sequence b's tiles start at
    query_start_loc[b] // BLOCK_Q + b (+ b only when BLOCK_Q > 1: room for its partial last tile;
    `_first_tile`), and a program finds its sequence by binary search over query_start_loc (`_find_sequence`).
    Keys are visited TILE_N positions at a time, each position looking up its own cache block (so TILE_N and
    BLOCK_SIZE are independent), with an online softmax in fp32 (base 2: the scale is pre-multiplied by log2(e)).
    Programs take the q tiles last to first, KV heads fastest: a sequence's late queries see the most keys,
    so the longest programs start first and the short ones fill the tail (prefill; decode tiles are all alike).
    SPLIT: program_id(1) handles only its share of the key tiles and writes the unnormalised partial state
    (running max m, sum l, accumulator acc) for `_paged_attn_reduce_kernel` to merge.
    FP32_DOT: feed tl.dot fp32 operands with ieee precision (fp32 inputs, and bf16 in the interpreter, which
    stores bf16 as raw uint16 and would multiply the bit patterns); probabilities are still rounded to the
    value dtype first, as the GPU path does.
    """
    pid = tl.program_id(0)
    kvh = pid % num_kv_heads
    tile = num_q_tiles - 1 - pid // num_kv_heads

    b = _find_sequence(qsl_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    q_first = (tile - _first_tile(q_start, b, BLOCK_Q)) * BLOCK_Q  # this tile's first query of the sequence
    if q_first >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len  # queries sit at positions ctx_len .. seq_len - 1

    rows = tl.arange(0, BLOCK_M)
    qi = q_first + rows // GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (qi < q_len)
    tok = (q_start + qi).to(tl.int64)
    head = kvh * GROUP + rows % GROUP
    q_pos = ctx_len + qi
    d = tl.arange(0, HEAD_DIM_P)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)

    # keys 0 .. kv_len - 1 are visible to some row of this tile
    kv_len = ctx_len + tl.minimum(q_first + BLOCK_Q, q_len)
    n_tiles = tl.cdiv(kv_len, TILE_N)
    if SPLIT:
        per_split = tl.cdiv(n_tiles, num_splits)
        t_begin = tl.program_id(1) * per_split
        t_end = tl.minimum(t_begin + per_split, n_tiles)
    else:
        t_begin = 0
        t_end = n_tiles

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kvh * stride_ch
    v_base = v_cache_ptr + kvh * stride_ch
    # Tiles below n_full hold only keys every row of the tile sees (k_pos <= the first query's position), so
    # they skip the causal mask and the bounds masks; the diagonal and the context's ragged end come after.
    n_full = (ctx_len + q_first + 1) // TILE_N
    m_i, l_i, acc = _attn_tiles(q, m_i, l_i, acc, k_base, v_base, bt_row, t_begin, tl.minimum(t_end, n_full),
                                kv_len, q_pos, scale_log2, d, d_ok, stride_cb, stride_cs,
                                HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE, TILE_N, FP32_DOT, False)
    m_i, l_i, acc = _attn_tiles(q, m_i, l_i, acc, k_base, v_base, bt_row, tl.maximum(t_begin, n_full), t_end,
                                kv_len, q_pos, scale_log2, d, d_ok, stride_cb, stride_cs,
                                HEAD_DIM, HEAD_DIM_P, BLOCK_SIZE, TILE_N, FP32_DOT, True)

    if SPLIT:
        num_heads = num_kv_heads * GROUP
        prow = (tok * num_heads + head) * num_splits + tl.program_id(1)
        tl.store(part_m_ptr + prow, m_i, mask=row_ok)
        tl.store(part_l_ptr + prow, l_i, mask=row_ok)
        tl.store(part_acc_ptr + prow[:, None] * HEAD_DIM_P + d[None, :], acc, mask=row_ok[:, None])
    else:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["num_splits"])
def _paged_attn_reduce_kernel(part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr, num_heads, num_splits,
                              stride_ot, stride_oh,
                              HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, SPLITS_P: tl.constexpr):
    """Grid (T, num_heads): merges the split-KV partials of one (token, head) by log-sum-exp (base 2)."""
    tok = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_P)
    s_ok = s < num_splits
    base = (tok * num_heads + h) * num_splits
    m = tl.load(part_m_ptr + base + s, mask=s_ok, other=float("-inf"))
    l_sum = tl.load(part_l_ptr + base + s, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    denom = tl.sum(w * l_sum, axis=0)
    d = tl.arange(0, HEAD_DIM_P)
    acc = tl.load(part_acc_ptr + (base + s)[:, None] * HEAD_DIM_P + d[None, :], mask=s_ok[:, None], other=0.0)
    o = tl.sum(w[:, None] * acc, axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + tok * stride_ot + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


_DEVICE_LIMITS: dict[int, tuple[int, int]] = {}


def _device_limits(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, shared memory bytes a block may opt into) of a CUDA device."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _DEVICE_LIMITS:
        props = torch.cuda.get_device_properties(idx)
        smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024  # the smallest of sm_80+ parts
        _DEVICE_LIMITS[idx] = (props.multi_processor_count, smem)
    return _DEVICE_LIMITS[idx]


def _sm_count(device: torch.device) -> int:
    return _device_limits(device)[0]


def _check_inputs(q, k_cache, v_cache, query_start_loc, seq_lens) -> None:
    """Raises ValueError for inputs the kernel cannot take."""
    num_heads, head_dim = q.shape[1:]
    _, block_size, num_kv_heads, k_head_dim = k_cache.shape
    if k_head_dim != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"q {tuple(q.shape)} does not match the caches {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q and the caches need a unit stride in the last dim, k_cache and v_cache equal "
                         "strides")
    if query_start_loc.shape[0] != seq_lens.shape[0] + 1:
        raise ValueError("query_start_loc must have len(seq_lens) + 1 entries")


def _dense_metadata(block_tables, query_start_loc, seq_lens):
    """The metadata as the kernel reads it: block table rows with a unit stride, dense vectors (no copy when
    they already are)."""
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    return block_tables, query_start_loc.contiguous(), seq_lens.contiguous()


def _padded_head_dim(head_dim: int) -> int:
    """Head dims are padded to a power of two (tl.arange) of at least 16 (tl.dot)."""
    return max(16, next_pow2(head_dim))


@dataclass(frozen=True)
class _Tiles:
    block_m: int  # rows of a q tile: BLOCK_Q tokens x the GQA group, padded to a power of two
    block_q: int  # query tokens per q tile (1 for decode)
    tile_n: int  # keys per step
    num_warps: int
    num_stages: int | None  # None: Triton's default


def _tuned_key_tile(*, decode: bool, fp32_dot: bool, kv_tile_fits: bool) -> tuple[int, int, int | None]:
    """(tile_n, num_warps, num_stages) for compiled kernels, from `bench/kernels.py --tune` on an H200
    (bench/RESULTS.md). 16-bit decode is a stream over the cache, fastest with 128-key tiles in two stages when a
    K + V tile of 128 keys fits in shared memory (kv_tile_fits); prefill runs 64-key tiles on one warpgroup
    (4 warps) in two stages, without register spills at head dim 128 on sm_90. fp32 (FP32_DOT: no tensor cores)
    runs out of registers with big tiles: 64 keys for decode, 32 keys on 8 warps for prefill."""
    if decode:
        return (128, 4, 2) if kv_tile_fits and not fp32_dot else (64, 4, None)
    return (32, 8, 2) if fp32_dot else (64, 4, 2)


def _choose_tiles(*, group: int, head_dim_p: int, elem_bytes: int, decode: bool, fp32_dot: bool, interp: bool,
                  smem: int, block_m=None, tile_n=None, num_warps=None, num_stages=None) -> _Tiles:
    """The launch's tiles: the caller's overrides, else the defaults. Decode takes one token per q tile and pads
    the GQA group to 16 rows; prefill takes 64-row q tiles. The interpreter uses 16 x 16 tiles to keep the tests
    fast (it ignores warps and stages)."""
    if block_m is None:
        block_m = max(16, next_pow2(group)) if decode else max(16 if interp else 64, next_pow2(group))
    if block_m < max(16, group) or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= max(16, GQA group {group}), got {block_m}")
    if interp:
        default = (16, 4, None)
    else:
        # Triton takes ~73 KB for one K + V tile of 128 keys at head dim 128: inside even a consumer part's 99 KB.
        kv_tile_fits = 128 * head_dim_p * elem_bytes * 2 + 8192 <= smem
        default = _tuned_key_tile(decode=decode, fp32_dot=fp32_dot, kv_tile_fits=kv_tile_fits)
    if tile_n is None:
        tile_n, default_warps, default_stages = default
    else:
        # the decode and fp32 warps / stages were tuned for their key tile; prefill's two stages hold for any tile
        default_warps, default_stages = 4, (2 if not decode and not interp else None)
    if tile_n < 16 or tile_n & (tile_n - 1):
        raise ValueError(f"tile_n must be a power of two >= 16, got {tile_n}")
    return _Tiles(block_m=block_m, block_q=1 if decode else max(1, block_m // group), tile_n=tile_n,
                  num_warps=default_warps if num_warps is None else num_warps,
                  num_stages=default_stages if num_stages is None else num_stages)


def _kv_split_count(sms: int, programs: int, max_seq_len: int, *, at_least: int, at_most: int = 64) -> int:
    """Splits per q tile: enough programs for ~2 waves over the SMs, each split keeping >= 256 keys, at most 64
    (or at_most); rounded down to a power of two so that few variants of the merge kernel (SPLITS_P) get
    compiled."""
    want = max(at_least, min(triton.cdiv(2 * sms, max(programs, 1)), max_seq_len // 256, at_most))
    return 1 << (want.bit_length() - 1)


def _choose_split(split_kv: bool | None, num_splits: int | None, *, decode: bool, device: torch.device,
                  sm_count: int | None, programs: int, max_seq_len: int, tile_n: int,
                  max_splits: int = 64) -> tuple[bool, int]:
    """(split the key range or not, number of splits). Auto (split_kv None, num_splits None) splits a CUDA
    decode step whose programs (batch x kv_heads) leave SMs idle and whose context has >= 4 key tiles to share;
    split_kv=True with num_splits None sizes the split the same way (at least 2). A count chosen here stays
    within max_splits (what a workspace holds); a count the caller gives is taken as it is."""
    if split_kv is None:
        if not (decode and device.type == "cuda" and num_splits is None):
            return False, 1
        sms = sm_count or _sm_count(device)
        if programs >= sms or max_seq_len < 4 * tile_n:
            return False, 1
        n = _kv_split_count(sms, programs, max_seq_len, at_least=1, at_most=max_splits)
        return n >= 2, n
    if not split_kv:
        return False, 1
    if num_splits is None:
        sms = sm_count or (_sm_count(device) if device.type == "cuda" else 8)
        num_splits = _kv_split_count(sms, programs, max_seq_len, at_least=2, at_most=max_splits)
    return True, num_splits


class SplitKVWorkspace(NamedTuple):
    """Scratch for the split-KV partial states, made once (`make_split_kv_workspace`) and passed to every
    `paged_attention_triton(..., workspace=)` call, so that a split step allocates nothing: CUDA-graph capture
    needs every buffer of the captured region made beforehand. All fp32, flat and contiguous, one row per
    (token, head, split) of a launch: part_m the running max, part_l the running sum, part_acc the accumulator
    (head_dim_p = the head dim padded to a power of two >= 16, values per row). A launch uses the first rows of
    each, so one workspace serves every step up to its size. A plain (part_m, part_l, part_acc) tuple works too.
    """
    part_m: torch.Tensor
    part_l: torch.Tensor
    part_acc: torch.Tensor


def make_split_kv_workspace(max_tokens: int, num_heads: int, head_dim: int, max_splits: int,
                            device: torch.device | str) -> SplitKVWorkspace:
    """A workspace for launches of up to max_tokens query tokens x num_heads heads x max_splits splits at this
    head dim (the splits of a launch are its num_splits; pin them with split_kv=True, num_splits=)."""
    rows = max_tokens * num_heads * max_splits
    part_m = torch.empty(rows, dtype=torch.float32, device=device)
    part_acc = torch.empty(rows * _padded_head_dim(head_dim), dtype=torch.float32, device=device)
    return SplitKVWorkspace(part_m, torch.empty_like(part_m), part_acc)


def _workspace_rows(workspace, head_dim_p: int, device: torch.device) -> int:
    """How many (token, head, split) rows the workspace holds at this padded head dim; ValueError for one the
    kernels cannot use."""
    part_m, part_l, part_acc = workspace
    for name, t in (("part_m", part_m), ("part_l", part_l), ("part_acc", part_acc)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device != device:
            raise ValueError(f"split-KV workspace {name} must be a contiguous float32 tensor on {device}, got "
                             f"{t.dtype} on {t.device}{'' if t.is_contiguous() else ', not contiguous'}")
    return min(part_m.numel(), part_l.numel(), part_acc.numel() // head_dim_p)


def _split_partials(num_tokens: int, num_heads: int, num_splits: int, head_dim_p: int, device: torch.device,
                    workspace=None):
    """fp32 scratch for the split-KV partial states, one row per (token, head, split): running max m, sum l,
    and the head_dim_p-wide accumulator; views of the workspace's first rows when there is one."""
    rows = num_tokens * num_heads * num_splits
    if workspace is None:
        part_m = torch.empty(rows, dtype=torch.float32, device=device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty(rows * head_dim_p, dtype=torch.float32, device=device)
        return part_m, part_l, part_acc
    held = _workspace_rows(workspace, head_dim_p, device)
    if rows > held:
        raise ValueError(f"the split-KV workspace is too small: this launch needs {num_tokens} tokens x {num_heads} "
                         f"heads x {num_splits} splits = {rows} rows of {head_dim_p} values, the workspace holds "
                         f"{held}; make a bigger one with make_split_kv_workspace (or launch fewer splits)")
    part_m, part_l, part_acc = workspace
    return part_m.view(-1)[:rows], part_l.view(-1)[:rows], part_acc.view(-1)[:rows * head_dim_p]


def _attention_launch(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, partials, scale,
                      tiles: _Tiles, *, split: bool, num_splits: int, fp32_dot: bool) -> Launch:
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads = seq_lens.shape[0], k_cache.shape[2]
    # sequence b's q tiles start at query_start_loc[b] // BLOCK_Q + b: room for each one's partial last tile
    n_q_tiles = num_tokens if tiles.block_q == 1 else num_tokens // tiles.block_q + num_seqs
    part_m, part_l, part_acc = partials
    return Launch(_paged_attn_kernel, (n_q_tiles * num_kv_heads, num_splits), dict(
        q_ptr=q, k_cache_ptr=k_cache, v_cache_ptr=v_cache, bt_ptr=block_tables, qsl_ptr=query_start_loc,
        seq_lens_ptr=seq_lens, out_ptr=out, part_m_ptr=part_m, part_l_ptr=part_l, part_acc_ptr=part_acc,
        scale_log2=float(scale) * _LOG2E, num_seqs=num_seqs, num_splits=num_splits, num_q_tiles=n_q_tiles,
        num_kv_heads=num_kv_heads,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_ot=out.stride(0), stride_oh=out.stride(1),
        stride_cb=k_cache.stride(0), stride_cs=k_cache.stride(1), stride_ch=k_cache.stride(2),
        stride_bt=block_tables.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_P=_padded_head_dim(head_dim), BLOCK_SIZE=k_cache.shape[1],
        GROUP=num_heads // num_kv_heads, BLOCK_M=tiles.block_m, BLOCK_Q=tiles.block_q, TILE_N=tiles.tile_n,
        SPLIT=split, FP32_DOT=fp32_dot),
        constexprs=("HEAD_DIM", "HEAD_DIM_P", "BLOCK_SIZE", "GROUP", "BLOCK_M", "BLOCK_Q", "TILE_N", "SPLIT",
                    "FP32_DOT"),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _merge_launch(out, partials, num_splits: int) -> Launch:
    num_tokens, num_heads, head_dim = out.shape
    part_m, part_l, part_acc = partials
    return Launch(_paged_attn_reduce_kernel, (num_tokens, num_heads), dict(
        part_m_ptr=part_m, part_l_ptr=part_l, part_acc_ptr=part_acc, out_ptr=out, num_heads=num_heads,
        num_splits=num_splits, stride_ot=out.stride(0), stride_oh=out.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_P=_padded_head_dim(head_dim), SPLITS_P=max(2, next_pow2(num_splits))),
        constexprs=("HEAD_DIM", "HEAD_DIM_P", "SPLITS_P"), num_warps=4)


def _plan_paged_attention(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, *,
                          max_query_len=None, max_seq_len=None, split_kv=None, num_splits=None,
                          block_m=None, tile_n=None, num_warps=None, num_stages=None, out=None, workspace=None,
                          sm_count=None, smem=None):
    """(launches, out) for `paged_attention_triton`; sm_count / smem stand in for the device's limits (the
    compile tests plan on `meta` tensors)."""
    _check_inputs(q, k_cache, v_cache, query_start_loc, seq_lens)
    block_tables, query_start_loc, seq_lens = _dense_metadata(block_tables, query_start_loc, seq_lens)
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1:3]
    num_seqs = seq_lens.shape[0]
    head_dim_p = _padded_head_dim(head_dim)
    interp = interpreting(_paged_attn_kernel, q.device)
    fp32_dot = q.dtype == torch.float32 or (interp and q.dtype == torch.bfloat16)
    if max_query_len is None:  # no host sync: every sequence has >= 1 query, so T == B means all decode
        max_query_len = 1 if num_tokens == num_seqs else num_tokens
    decode = max_query_len <= 1
    if smem is None:
        smem = _device_limits(q.device)[1] if q.device.type == "cuda" else 0
    tiles = _choose_tiles(group=num_heads // num_kv_heads, head_dim_p=head_dim_p, elem_bytes=q.element_size(),
                          decode=decode, fp32_dot=fp32_dot, interp=interp, smem=smem, block_m=block_m,
                          tile_n=tile_n, num_warps=num_warps, num_stages=num_stages)
    if max_seq_len is None:  # an upper bound, free of host syncs
        max_seq_len = block_tables.shape[1] * block_size
    max_splits = 64
    if workspace is not None:  # a split count the planner picks stays within the workspace
        max_splits = min(max_splits, _workspace_rows(workspace, head_dim_p, q.device) // max(num_tokens * num_heads, 1))
    split, num_splits = _choose_split(split_kv, num_splits, decode=decode, device=q.device, sm_count=sm_count,
                                      programs=num_seqs * num_kv_heads, max_seq_len=max_seq_len,
                                      tile_n=tiles.tile_n, max_splits=max_splits)

    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if split:
        partials = _split_partials(num_tokens, num_heads, num_splits, head_dim_p, q.device, workspace)
    else:
        partials = (out, out, out)  # not read: the kernel writes out directly
    launches = [_attention_launch(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, partials,
                                  scale, tiles, split=split, num_splits=num_splits, fp32_dot=fp32_dot)]
    if split:
        launches.append(_merge_launch(out, partials, num_splits))
    return launches, out


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, *, max_query_len: int | None = None, max_seq_len: int | None = None,
                           split_kv: bool | None = None, num_splits: int | None = None,
                           block_m: int | None = None, tile_n: int | None = None, num_warps: int | None = None,
                           num_stages: int | None = None, out: torch.Tensor | None = None,
                           workspace: SplitKVWorkspace | None = None) -> torch.Tensor:
    """Triton version of `paged_attention_torch` (same arguments and result), with no host sync.

    Extra keyword arguments (all optional):
    - max_query_len, max_seq_len: host ints the engine knows anyway. max_query_len == 1 picks the decode tile
      (one token x the GQA group per program); without it, T == len(seq_lens) is taken to mean all-decode
      (every scheduled sequence has >= 1 query). max_seq_len sizes the split-KV partition (default: the
      block table's capacity). Results never depend on them, only the launch shape does.
    - split_kv: None = auto (CUDA decode whose batch x kv_heads is below the SM count), True / False force it.
      num_splits: the number of KV splits of a split launch (default: sized from the SM count and
      max_seq_len); given with split_kv=None, it turns the auto split off.
    - block_m, tile_n: tile overrides (rows of the q tile, a power of two >= the GQA group; keys per step);
      num_warps, num_stages: launch overrides (bench/kernels.py --tune sweeps all four).
    - out: a [T, H, D] tensor to write into.
    - workspace: a `SplitKVWorkspace` (`make_split_kv_workspace`) that a split launch takes its fp32 scratch
      from instead of allocating it; ValueError when the launch needs more rows than it holds. A split count
      the planner picks stays within it.
    With out and workspace given nothing is allocated. For CUDA-graph capture also fix the launch: split_kv=False,
    or split_kv=True with num_splits=N (auto and the default count follow max_seq_len, which changes per step).
    q may be a strided view (unit stride in the last dim). query_start_loc, seq_lens, block_tables: int32.
    """
    launches, out = _plan_paged_attention(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len=max_query_len,
        max_seq_len=max_seq_len, split_kv=split_kv, num_splits=num_splits, block_m=block_m, tile_n=tile_n,
        num_warps=num_warps, num_stages=num_stages, out=out, workspace=workspace)
    run(launches, q.device)
    return out
