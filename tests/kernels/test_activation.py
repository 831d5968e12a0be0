"""silu_and_mul (Triton) against the reference computed in float32.

Tolerances (atol = rtol): fp32 1e-5, fp16 1e-2, bf16 3e-2.
"""
from __future__ import annotations

import pytest
import torch

from pagedllm.kernels.activation import silu_and_mul_torch, silu_and_mul_triton

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("inter", [70, 1500])
def test_silu_and_mul(dtype, inter, device, poisoned):
    g = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(3, 2 * inter, generator=g) * 3).to(dtype).to(device)
    with poisoned():
        out = silu_and_mul_triton(gate_up)
    assert out.shape == (3, inter) and out.dtype == dtype
    assert not torch.isnan(out).any()
    ref = silu_and_mul_torch(gate_up.float())
    torch.testing.assert_close(out.float(), ref, atol=TOL[dtype], rtol=TOL[dtype])
