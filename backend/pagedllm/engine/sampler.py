"""Turns the sampling rows' parameters into tensors and picks their next tokens with the sample kernel."""
from __future__ import annotations

import torch

from .sequence import Sequence


def _as_int64(seed: int) -> int:
    """Seeds are uint64; tensors hold int64. Keep the bits (two's complement)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


class Sampler:
    def __init__(self, ops, device: torch.device):
        self.ops = ops
        self.device = device

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [B, V] float32 for seqs -> next token ids [B] int64 (on the device)."""
        if all(s.params.temperature == 0 for s in seqs):
            return logits.argmax(dim=-1)  # the common greedy batch needs no kernel at all
        params = [s.params for s in seqs]
        floats = torch.tensor([[p.temperature, p.top_p] for p in params], dtype=torch.float32)
        ints = torch.tensor([[p.top_k, _as_int64(s.seed), s.num_output_tokens] for p, s in zip(params, seqs)],
                            dtype=torch.int64)
        floats, ints = floats.to(self.device, non_blocking=True), ints.to(self.device, non_blocking=True)
        return self.ops.sample(logits, floats[:, 0].contiguous(), ints[:, 0].to(torch.int32),
                               floats[:, 1].contiguous(), ints[:, 1].contiguous(), ints[:, 2].contiguous())
