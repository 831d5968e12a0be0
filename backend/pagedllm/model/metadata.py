"""What one forward pass needs to know about where its tokens sit in the paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int32: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32: sequence b's tokens are rows [qsl[b], qsl[b+1])
    seq_lens: torch.Tensor  # [B] int32: context length of sequence b after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    max_query_len: int  # host-side maxima, so kernels need no device->host sync
    max_seq_len: int
    # Launch options for the attention op (a CUDA graph's fixed split count and scratch workspace); empty for
    # eager steps, which let the op choose.
    attention_options: dict = field(default_factory=dict)
