"""SiLU-and-mul, the gate of the SwiGLU MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """Reference. gate_up: [T, 2 * I] (gate first, then up) -> [T, I] = silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
