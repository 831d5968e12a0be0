"""SiLU-and-mul, the gate of the SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """Reference. gate_up: [T, 2 * I] (gate first, then up) -> [T, I] = silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


# ----------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------
# _triton_util first: it may set TRITON_INTERPRET before triton loads
from ._triton_util import Launch, next_pow2, run  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, inter, stride_gu, stride_out, BLOCK: tl.constexpr):
    """Grid (rows, cdiv(inter, BLOCK)). silu is computed in fp32 and rounded to the activations' dtype before
    the multiply, as F.silu(gate) * up does."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_gu + inter + cols, mask=mask, other=0.0)
    s = (g / (1.0 + tl.exp(-g))).to(u.dtype)
    y = s.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _plan_silu_and_mul(gate_up: torch.Tensor):
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"gate_up's last dim must be even, got {two_i}")
    inter = two_i // 2
    rows = gate_up.numel() // two_i if two_i else 0
    gu = gate_up.reshape(rows, two_i)
    if gu.stride(-1) != 1:
        gu = gu.contiguous()
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, next_pow2(inter))
    ln = Launch(_silu_and_mul_kernel, (rows, triton.cdiv(inter, block)), dict(
        gu_ptr=gu, out_ptr=out, inter=inter, stride_gu=gu.stride(0), stride_out=inter, BLOCK=block),
        constexprs=("BLOCK",), num_warps=4)
    return [ln], out


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton version of `silu_and_mul_torch`. gate_up: [..., 2 * I], unit stride in the last dim (rows may
    be strided) -> new contiguous [..., I] in gate_up's dtype."""
    launches, out = _plan_silu_and_mul(gate_up)
    run(launches, gate_up.device)
    return out
