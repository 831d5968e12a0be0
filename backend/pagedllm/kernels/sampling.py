"""Batched sampling: greedy, temperature, top-k and top-p, each row with its own parameters and seed.

Randomness comes from a counter-based hash of (seed, offset, token index), not from a stateful generator:
the same request with the same seed samples the same tokens whatever else is in the batch, the Triton
kernel and this reference draw identical noise, and no per-row generator state or host sync is needed.
`offset` is the number of tokens the sequence has generated so far, so every step draws fresh noise.

A row samples argmax(logits / T - log(-log u)) over the tokens that survive top-k and top-p: the
Gumbel-max trick, which draws exactly from softmax(logits / T) restricted and renormalised to that set.
Rows with temperature 0 take argmax(logits).
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (lowbias32). x: int64 holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from its 64-bit seed and its step offset. int64 [B] -> int64 [B]."""
    lo = seeds & MASK32
    hi = (seeds >> 32) & MASK32
    return mix32(mix32(lo ^ mix32(hi)) ^ mix32(offsets & MASK32))


def uniform_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B] keys -> [B, V] float32 uniforms in (0, 1)."""
    idx = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    h = mix32(keys[:, None] ^ ((idx[None, :] * 0x9E3779B1) & MASK32))
    # 24 random bits: exactly representable in float32, so u stays strictly inside (0, 1).
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Boolean [B, V]: tokens kept by top-k (k <= 0 keeps all) and then top-p (the smallest set of most
    likely tokens whose probability reaches p; p >= 1 keeps all). logits are already temperature-scaled."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)[:, None]
    keep_sorted = rank < k
    probs = torch.softmax(sorted_logits.masked_fill(~keep_sorted, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep_sorted &= mass_before < top_p[:, None]
    keep = torch.zeros_like(keep_sorted)
    return keep.scatter_(1, order, keep_sorted)


def sample_torch(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference. logits [B, V] float32; temperature [B] float32 (0 = greedy); top_k [B] int32;
    top_p [B] float32; seeds, offsets [B] int64. Returns token ids [B] int64."""
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    keep = top_k_top_p_mask(scaled, top_k, top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(row_keys(seeds, offsets), logits.shape[-1])))
    scores = (scaled + gumbel).masked_fill(~keep, float("-inf"))
    return torch.where(greedy, logits.argmax(dim=-1), scores.argmax(dim=-1))


# ----------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------
# _triton_util first: it may set TRITON_INTERPRET before triton loads
from ._triton_util import Launch, next_pow2, run  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _mix32(h):
    """mix32() of the reference on uint32 (multiplication wraps mod 2^32, shifts are logical)."""
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def _scaled_chunk(base, idx, ok, temp_b):
    """A chunk of the row divided by the temperature (rounded like torch), and its order-preserving int32 keys."""
    x = tl.math.div_rn(tl.load(base + idx, mask=ok, other=float("-inf")).to(tl.float32), temp_b)
    xb = x.to(tl.int32, bitcast=True)
    return x, tl.where(xb < 0, xb ^ 2147483647, xb)


@triton.jit
def _running_argmax(best, best_i, x, start):
    """Folds chunk x (starting at index `start`) into the row's running (max, argmax); a later chunk wins only
    with a strictly larger value, so ties keep the first index, as torch.argmax does."""
    c_max = tl.max(x, axis=0)
    c_arg = tl.argmax(x, axis=0)
    if c_max > best:
        best = c_max
        best_i = start + c_arg
    return best, best_i


@triton.jit
def _sample_kernel(logits_ptr, temp_ptr, top_k_ptr, top_p_ptr, seed_ptr, offset_ptr, out_ptr,
                   vocab, stride_row, BLOCK_V: tl.constexpr):
    """One program per row, streaming the row in BLOCK_V chunks; no sort, no host sync.

    Values are compared through an order-preserving int32 key of the fp32 scaled logit (sign-magnitude
    flipped for negatives), so thresholds are exact. Top-k and top-p each find the smallest key K with
    f(K) < c, f(K) = sum of weights of tokens with key > K (weights 1 and c = k for top-k; weights
    exp(x - max) over the top-k survivors and c = p * their sum for top-p), by bisection on [lo, hi] where
    each pass over the row also snaps hi down / lo up to the nearest token keys, so it ends after about
    log2(#distinct candidates) passes (32 at most). Tokens with key >= K survive: ties at the threshold are
    all kept. Then Gumbel-max with the reference's counter-based hash noise.
    """
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK_V)
    temp = tl.load(temp_ptr + row)
    INT_MIN: tl.constexpr = -2147483648
    INT_MAX: tl.constexpr = 2147483647

    if temp <= 0.0:
        # greedy: argmax of the raw logits, first index on ties (like torch.argmax)
        best = tl.full([], float("-inf"), tl.float32)
        best_i = tl.zeros([], tl.int32)
        for start in range(0, vocab, BLOCK_V):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
            best, best_i = _running_argmax(best, best_i, x, start)
        tl.store(out_ptr + row, best_i.to(tl.int64))
    else:
        k = tl.load(top_k_ptr + row)
        p = tl.load(top_p_ptr + row)
        temp_b = tl.zeros([BLOCK_V], tl.float32) + temp  # x / temp rounded like torch (div_rn, not div.full)
        # pass 1: the row's max scaled logit
        m = tl.full([], float("-inf"), tl.float32)
        for start in range(0, vocab, BLOCK_V):
            idx = start + cols
            x = tl.load(base + idx, mask=idx < vocab, other=float("-inf")).to(tl.float32)
            x = tl.math.div_rn(x, temp_b)
            m = tl.maximum(m, tl.max(x, axis=0))
        bits = m.to(tl.int32, bitcast=True)
        max_key = tl.where(bits < 0, bits ^ INT_MAX, bits)

        thr_k = tl.zeros([], tl.int32) + INT_MIN  # keep key >= thr_k
        thr = tl.zeros([], tl.int32) + INT_MIN
        z = tl.zeros([], tl.float32)
        for phase in tl.static_range(2):
            if phase == 0:
                active = (k > 0) & (k < vocab)
                lo = tl.zeros([], tl.int32) + INT_MIN  # f(lo) >= c
                c = k.to(tl.float32)
            else:
                active = p < 1.0
                # z = sum of exp(x - m) over the top-k survivors, computed exactly like f(thr_k - 1) below
                if active:
                    for start in range(0, vocab, BLOCK_V):
                        idx = start + cols
                        ok = idx < vocab
                        x, key = _scaled_chunk(base, idx, ok, temp_b)
                        z += tl.sum(tl.where(ok & (key >= thr_k), tl.exp(x - m), 0.0), axis=0)
                lo = tl.maximum(thr_k, INT_MIN + 1) - 1
                c = p * z
            hi = max_key  # f(hi) = 0 < c
            if active:
                while lo + 1 < hi:
                    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
                    f = tl.zeros([], tl.float32)
                    below = tl.zeros([], tl.int32) + INT_MIN  # largest key in (lo, mid]
                    above = tl.zeros([], tl.int32) + INT_MAX  # smallest key > mid
                    for start in range(0, vocab, BLOCK_V):
                        idx = start + cols
                        ok = idx < vocab
                        x, key = _scaled_chunk(base, idx, ok, temp_b)
                        gt = ok & (key > mid)
                        if phase == 0:
                            f += tl.sum(gt.to(tl.float32), axis=0)
                        else:
                            f += tl.sum(tl.where(gt & (key >= thr_k), tl.exp(x - m), 0.0), axis=0)
                        in_low = ok & (key > lo) & (key <= mid)
                        below = tl.maximum(below, tl.max(tl.where(in_low, key, INT_MIN), axis=0))
                        above = tl.minimum(above, tl.min(tl.where(gt, key, INT_MAX), axis=0))
                    if f < c:
                        hi = below  # the answer is a token key <= mid
                    else:
                        lo = above - 1  # no token key in (mid, above): f is the same up to above - 1
                if phase == 0:
                    thr_k = hi
                thr = hi

        # row key from (seed, offset), exactly row_keys(): mix32(mix32(lo ^ mix32(hi)) ^ mix32(offset))
        seed = tl.load(seed_ptr + row)
        off32 = tl.load(offset_ptr + row).to(tl.uint32)
        lo32 = seed.to(tl.uint32)
        hi32 = (seed >> 32).to(tl.uint32)
        row_key = _mix32(_mix32(lo32 ^ _mix32(hi32)) ^ _mix32(off32))

        best = tl.full([], float("-inf"), tl.float32)
        best_i = tl.zeros([], tl.int32)
        for start in range(0, vocab, BLOCK_V):
            idx = start + cols
            ok = idx < vocab
            x, key = _scaled_chunk(base, idx, ok, temp_b)
            u = _mix32(row_key ^ (idx.to(tl.uint32) * 0x9E3779B1))
            uf = ((u >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)  # 24 bits: u < 1 exactly
            score = x - tl.log(-tl.log(uf))
            score = tl.where(ok & (key >= thr), score, float("-inf"))
            best, best_i = _running_argmax(best, best_i, score, start)
        tl.store(out_ptr + row, best_i.to(tl.int64))


def _plan_sample(logits, temperature, top_k, top_p, seeds, offsets, block_v=None):
    B, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    # per-row parameters are read as dense vectors (no-ops when they already are)
    temperature, top_k, top_p, seeds, offsets = (
        t.contiguous() for t in (temperature, top_k, top_p, seeds, offsets))
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if block_v is None:
        block_v = min(2048 if logits.device.type != "cpu" else 1024, next_pow2(V))
    ln = Launch(_sample_kernel, (B,), dict(
        logits_ptr=logits, temp_ptr=temperature, top_k_ptr=top_k, top_p_ptr=top_p, seed_ptr=seeds,
        offset_ptr=offsets, out_ptr=out, vocab=V, stride_row=logits.stride(0), BLOCK_V=block_v),
        constexprs=("BLOCK_V",), num_warps=8 if block_v >= 2048 else 4)
    return [ln], out


def sample_triton(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, offsets: torch.Tensor, *, block_v: int | None = None) -> torch.Tensor:
    """Triton version of `sample_torch`: same arguments (logits [B, V] fp32 / fp16 / bf16, unit stride in
    the last dim; temperature fp32 [B]; top_k int32 [B]; top_p fp32 [B]; seeds, offsets int64 [B]),
    token ids int64 [B], the same Gumbel noise, one program per row.

    Tie semantics: top-k and top-p are thresholds on the scaled logit, and every token tied with the
    threshold value is kept (the reference's sort keeps an arbitrary subset of them), so with ties the kept
    set can be larger than k / than the reference's nucleus; -0.0 ranks just below +0.0.
    Other differences: top_p <= 0 keeps the most likely token(s) (the reference keeps nothing and returns
    token 0); the top-p mass is summed by tree reductions, the reference's by a sequential cumsum, so a
    token whose preceding mass is within fp32 rounding of p can be in one set and not the other.
    Without ties the kept set is otherwise the reference's, and with the same seeds and offsets the tokens
    are identical.
    """
    launches, out = _plan_sample(logits, temperature, top_k, top_p, seeds, offsets, block_v)
    run(launches, logits.device)
    return out
