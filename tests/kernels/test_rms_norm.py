"""rms_norm (Triton) against the reference computed in float32 from the same inputs.

Tolerances (atol = rtol): fp32 1e-5, fp16 1e-2, bf16 3e-2 (one or two roundings to the output dtype; the
interpreter rounds bf16 toward zero). The in-place residual update is checked with the same tolerances.
"""
from __future__ import annotations

import pytest
import torch

from pagedllm.kernels.rms_norm import rms_norm_torch, rms_norm_triton

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("hidden", [80, 1000])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_rms_norm(dtype, hidden, with_residual, device, poisoned):
    g = torch.Generator().manual_seed(hidden)
    T = 5
    big = (torch.randn(T, hidden + 7, generator=g) * 2).to(dtype).to(device)
    x = big[:, 3:3 + hidden]  # rows strided
    w = (torch.rand(hidden, generator=g) + 0.5).to(dtype).to(device)
    res = torch.randn(T, hidden, generator=g).to(dtype).to(device) if with_residual else None
    res0 = res.clone() if with_residual else None
    with poisoned():
        out = rms_norm_triton(x, w, 1e-6, res)
    assert out.shape == (T, hidden) and out.dtype == dtype
    assert not torch.isnan(out).any()
    res_ref = res0.float().clone() if with_residual else None
    ref = rms_norm_torch(x.float(), w.float(), 1e-6, res_ref)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    if with_residual:
        torch.testing.assert_close(res.float(), res_ref, atol=tol, rtol=tol)
        if dtype != torch.bfloat16 or device.type == "cuda":  # one rounding: bit-identical to residual.add_(x)
            # (the interpreter rounds bf16 toward zero)
            assert torch.equal(res, res0 + x)
