"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""
from __future__ import annotations

import torch


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """Reference. x, residual: [T, hidden]; weight: [hidden].

    With `residual`: residual <- residual + x (in place), and the normalised residual is returned, which is
    what HF's `hidden = residual + hidden; hidden = norm(hidden)` computes. The statistics are taken in
    float32 and the result is cast back before the weight multiply, exactly like transformers' LlamaRMSNorm.
    """
    if residual is not None:
        residual.add_(x)
        x = residual
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------
# _triton_util first: it may set TRITON_INTERPRET before triton loads
from ._triton_util import Launch, next_pow2, run  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, hidden, eps,
                     stride_x, stride_res, stride_out,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row; the whole row lives in registers (BLOCK = next power of two >= hidden)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # The add happens in the activations' dtype, like `residual.add_(x)`.
        x = (r.to(tl.float32) + x.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_res + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / hidden
    normed = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _plan_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None):
    hidden = x.shape[-1]
    rows = x.numel() // hidden if hidden else 0
    x2 = x.reshape(rows, hidden)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        r2 = residual.view(rows, hidden)  # must be a view: it is updated in place
        if r2.stride(-1) != 1:
            raise ValueError("residual must have a unit stride in its last dimension")
        act_dtype = residual.dtype
    else:
        r2 = x2
        act_dtype = x.dtype
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, act_dtype), device=x.device)
    block = next_pow2(hidden)
    if block > 65536:
        raise ValueError(f"rms_norm_triton supports hidden sizes up to 65536, got {hidden}")
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    ln = Launch(_rms_norm_kernel, (rows,), dict(
        x_ptr=x2, res_ptr=r2, w_ptr=weight, out_ptr=out, hidden=hidden, eps=float(eps),
        stride_x=x2.stride(0), stride_res=r2.stride(0), stride_out=hidden,
        HAS_RESIDUAL=residual is not None, BLOCK=block), constexprs=("HAS_RESIDUAL", "BLOCK"),
        num_warps=num_warps)
    return [ln], out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """Triton version of `rms_norm_torch`, same semantics, one pass over the row.

    x, residual: [..., hidden] with unit stride in the last dim (rows may be strided); residual is updated
    in place (residual <- residual + x, rounded to residual's dtype) and must therefore be viewable as
    [rows, hidden]. Returns a new tensor in promote(weight.dtype, x.dtype), like the reference.
    """
    launches, out = _plan_rms_norm(x, weight, eps, residual)
    run(launches, x.device)
    return out
