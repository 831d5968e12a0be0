"""The Triton-language implementations of the hot ops, with the same names and signatures as TORCH_OPS.

Each kernel lives beside its PyTorch reference (rms_norm.py, activation.py, rope_kv_write.py,
paged_attention.py, sampling.py); this module only assembles them. `paged_attention` also takes optional
keywords: max_query_len / max_seq_len (host ints, so that no .item() is needed), the split-KV controls
(split_kv, num_splits, workspace from `paged_attention.make_split_kv_workspace`), out, and tile overrides.
On CPU tensors the kernels run in Triton's interpreter (slow; meant for tests).
"""
from __future__ import annotations

from types import SimpleNamespace

from .activation import silu_and_mul_triton
from .paged_attention import paged_attention_triton
from .rms_norm import rms_norm_triton
from .rope_kv_write import rope_and_write_kv_triton
from .sampling import sample_triton

TRITON_OPS = SimpleNamespace(
    name="triton",
    rms_norm=rms_norm_triton,
    silu_and_mul=silu_and_mul_triton,
    rope_and_write_kv=rope_and_write_kv_triton,
    paged_attention=paged_attention_triton,
    sample=sample_triton,
)
