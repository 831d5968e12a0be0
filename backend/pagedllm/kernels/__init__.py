"""Kernels for the hot ops of the decode loop, each file holding a Triton kernel beside its PyTorch reference.

`get_ops("torch" | "triton")` returns the set the model runs with. Matrix multiplies are not here: they stay
with torch (cuBLAS), which already runs them near peak.

Importing this package imports triton (a dependency): every op's module defines its Triton kernel beside the
reference, so even the torch set loads it. On a CPU-only torch build `_triton_util` turns Triton's interpreter
on first (TRITON_INTERPRET=1, unless set), so that the Triton set runs on CPU tensors.
"""
from __future__ import annotations

from types import SimpleNamespace

from .activation import silu_and_mul_torch
from .paged_attention import paged_attention_torch
from .rms_norm import rms_norm_torch
from .rope_kv_write import rope_and_write_kv_torch
from .sampling import sample_torch
from .triton_ops import TRITON_OPS

TORCH_OPS = SimpleNamespace(
    name="torch",
    rms_norm=rms_norm_torch,
    silu_and_mul=silu_and_mul_torch,
    rope_and_write_kv=rope_and_write_kv_torch,
    paged_attention=paged_attention_torch,
    sample=sample_torch,
)


def get_ops(kind: str) -> SimpleNamespace:
    if kind == "torch":
        return TORCH_OPS
    if kind == "triton":
        return TRITON_OPS
    raise ValueError(f"kernels must be 'triton' or 'torch', got {kind!r}")
