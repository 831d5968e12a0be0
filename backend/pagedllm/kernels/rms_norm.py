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
