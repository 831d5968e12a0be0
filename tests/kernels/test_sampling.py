"""Sampling (Triton) against sample_torch: same tokens, not just the same distribution.

The kernel draws the reference's counter-based hash noise, so with the same seeds and offsets it must
return identical tokens whenever the kept set is the same, which holds for inputs without ties (random
fp32 logits). Greedy rows are exact. The tie rule of the threshold search (every token tied with the
top-k / top-p threshold is kept) is pinned by test_ties_at_threshold_are_kept.
"""
from __future__ import annotations

import torch

from pagedllm.kernels.sampling import sample_torch, sample_triton, top_k_top_p_mask

V = 300  # a few chunks of BLOCK_V = 128 plus a ragged tail
BLOCK_V = 128


def _params(device, B, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    temp = torch.tensor([0.0, 1.0, 0.7, 1.3, 1.0, 1.0, 0.5, 2.0, 1.0, 0.8, 1.0, 1.0])[:B]
    top_k = torch.tensor([0, 0, 0, 50, 1, 7, 0, 100, V - 1, 0, 5, 3], dtype=torch.int32)[:B]
    top_p = torch.tensor([1.0, 1.0, 0.9, 1.0, 1.0, 1.0, 0.5, 0.8, 0.95, 0.1, 0.3, 0.999])[:B]
    seeds = torch.randint(-2**63, 2**63 - 1, (B,), generator=g)
    offsets = torch.randint(0, 5000, (B,), generator=g)
    return [t.to(device) for t in (logits, temp, top_k, top_p, seeds, offsets)]


def test_greedy_is_exact_argmax(device, poisoned):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, V, generator=g) * 5).to(device)
    logits[2, 17] = logits[2, 250] = 1e4  # a tie: first index wins, like torch.argmax
    zeros = torch.zeros(4, device=device)
    ids = torch.zeros(4, dtype=torch.int64, device=device)
    with poisoned():
        out = sample_triton(logits, zeros, ids.int(), zeros + 1, ids, ids, block_v=BLOCK_V)
    assert out.dtype == torch.int64
    assert torch.equal(out, logits.argmax(dim=-1))
    assert out[2].item() == 17


def test_same_tokens_as_reference(device, poisoned):
    B = 12
    logits, temp, top_k, top_p, seeds, offsets = _params(device, B, seed=2)
    for step in range(2):
        with poisoned():
            got = sample_triton(logits, temp, top_k, top_p, seeds, offsets + step, block_v=BLOCK_V)
        ref = sample_torch(logits, temp, top_k, top_p, seeds, offsets + step)
        assert got.tolist() == ref.tolist()
        keep = top_k_top_p_mask(logits / torch.where(temp > 0, temp, 1.0)[:, None], top_k, top_p)
        assert keep[torch.arange(B, device=device), got].all()


def test_seed_determinism(device):
    B = 8
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(1, V, generator=g) * 0.1).expand(B, V).contiguous().to(device)  # nearly flat
    temp = torch.ones(B, device=device)
    top_k = torch.zeros(B, dtype=torch.int32, device=device)
    top_p = torch.ones(B, device=device)
    offsets = torch.zeros(B, dtype=torch.int64, device=device)
    seeds = torch.full((B,), 1234, dtype=torch.int64, device=device)
    a = sample_triton(logits, temp, top_k, top_p, seeds, offsets, block_v=BLOCK_V)
    b = sample_triton(logits, temp, top_k, top_p, seeds, offsets, block_v=BLOCK_V)
    assert torch.equal(a, b)
    assert len(set(a.tolist())) == 1  # same seed and offset: same noise, whatever the row
    other = sample_triton(logits, temp, top_k, top_p, torch.arange(B, device=device) * 7919 + 1, offsets,
                          block_v=BLOCK_V)
    assert len(set(other.tolist())) >= B // 2  # different seeds draw different tokens
    stepped = sample_triton(logits, temp, top_k, top_p, seeds, offsets + torch.arange(B, device=device),
                            block_v=BLOCK_V)
    assert len(set(stepped.tolist())) >= B // 2  # so do different offsets


def test_ties_at_threshold_are_kept(device):
    """top_k = 2 over logits [3, 2, 2, 2, -30, ...]: the threshold is 2, so tokens 0..3 all survive (the
    reference's sort would keep exactly two of them); nothing else is ever drawn."""
    B = 24
    row = torch.full((V,), -30.0)
    row[:4] = torch.tensor([3.0, 2.0, 2.0, 2.0])
    logits = row.expand(B, V).contiguous().to(device)
    out = sample_triton(logits, torch.ones(B, device=device), torch.full((B,), 2, dtype=torch.int32, device=device),
                        torch.ones(B, device=device), torch.arange(B, device=device) * 104729 + 3,
                        torch.zeros(B, dtype=torch.int64, device=device), block_v=BLOCK_V)
    toks = set(out.tolist())
    assert toks <= {0, 1, 2, 3}
    assert toks & {2, 3}, "tied tokens beyond the k-th were never drawn"
