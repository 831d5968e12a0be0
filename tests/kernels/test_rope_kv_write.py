"""rope_and_write_kv (Triton) against RoPE computed in float64, plus the cache scatter.

Tolerances (atol = rtol on rotated q, k and the cached k): fp32 1e-5, fp16 1e-2, bf16 3e-2. The cached v
must be bit-identical to v, slots that are negative in slot_mapping are skipped (the NaN-poisoned cache
stays NaN everywhere no token was written) and v itself is not modified.
"""
from __future__ import annotations

import pytest
import torch

from pagedllm.kernels.rope_kv_write import rope_and_write_kv_triton

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

I32, I64 = torch.int32, torch.int64

CASES = [  # dtype, tokens, heads, kv_heads, head_dim, block_size, positions / slot_mapping dtype (engine: int32)
    (F16, 7, 6, 2, 80, 16, I32),
    (BF16, 9, 8, 2, 64, 32, I64),
    (F32, 5, 5, 5, 64, 16, I32),
    (F16, 3, 4, 2, 96, 32, I64),
    (BF16, 4, 4, 1, 128, 16, I32),
]


def _cos_sin(max_pos, D):
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    f = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    return torch.cat([f.cos(), f.sin()], dim=-1).float()


def _rope64(x, positions, cos_sin):
    half = x.shape[-1] // 2
    cs = cos_sin.double()[positions]
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    x = x.double()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@pytest.mark.parametrize("case", CASES,
                         ids=lambda c: f"{str(c[0])[6:]}-T{c[1]}-h{c[2]}-kv{c[3]}-d{c[4]}-bs{c[5]}-{str(c[6])[6:]}")
def test_rope_and_write_kv(case, device):
    dtype, T, H, KVH, D, BS, index = case
    g = torch.Generator().manual_seed(T * D)
    NB = 4
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g).to(dtype).to(device)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], dim=-1))  # strided views
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    positions = torch.randint(0, 3000, (T,), generator=g).to(device, index)
    cos_sin = _cos_sin(3000, D).to(device)
    slots = torch.randperm(NB * BS, generator=g)[:T]
    slots[1] = -1
    slots[T - 1] = -5
    slots = slots.to(device, index)
    k_cache = torch.full((NB, BS, KVH, D), float("nan"), dtype=dtype, device=device)
    v_cache = torch.full_like(k_cache, float("nan"))

    rope_and_write_kv_triton(q, k, v, positions, cos_sin, k_cache, v_cache, slots)

    tol = TOL[dtype]
    q_ref, k_ref = _rope64(q0, positions, cos_sin), _rope64(k0, positions, cos_sin)
    torch.testing.assert_close(q.double(), q_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(k.double(), k_ref, atol=tol, rtol=tol)
    assert torch.equal(v, v0)
    kc, vc = k_cache.view(-1, KVH, D), v_cache.view(-1, KVH, D)
    valid = slots >= 0
    torch.testing.assert_close(kc[slots[valid]].double(), k_ref[valid], atol=tol, rtol=tol)
    assert torch.equal(vc[slots[valid]], v0[valid])
    untouched = torch.ones(NB * BS, dtype=torch.bool, device=device)
    untouched[slots[valid]] = False
    assert torch.isnan(kc[untouched]).all() and torch.isnan(vc[untouched]).all()
    assert not torch.isnan(kc[~untouched]).any()


def test_matches_reference_rounding(device):
    """fp16: the kernel rounds like the transformers-style reference (each product to fp16, then the sum),
    so the rotated q and k and the cache are bit-identical to it."""
    from pagedllm.kernels.rope_kv_write import rope_and_write_kv_torch

    T, H, KVH, D, BS = 6, 4, 2, 64, 16
    g = torch.Generator().manual_seed(11)
    mk = lambda *s: torch.randn(*s, generator=g).half().to(device)  # noqa: E731
    q, k, v = mk(T, H, D), mk(T, KVH, D), mk(T, KVH, D)
    pos = torch.arange(T, device=device) * 37
    cs = _cos_sin(512, D).to(device)
    slots = torch.arange(T, device=device) * 3
    caches = [torch.zeros(2, BS, KVH, D, dtype=torch.float16, device=device) for _ in range(4)]
    q2, k2 = q.clone(), k.clone()
    rope_and_write_kv_torch(q, k, v, pos, cs, caches[0], caches[1], slots)
    rope_and_write_kv_triton(q2, k2, v, pos, cs, caches[2], caches[3], slots)
    assert torch.equal(q2, q) and torch.equal(k2, k)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
