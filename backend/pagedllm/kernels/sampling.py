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
    return (h.to(torch.float32) + 0.5) * (1.0 / 4294967296.0)


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
