"""Turns the sampling rows' parameters into tensors and picks their next tokens with the sample kernel."""
from __future__ import annotations

import torch

from .sequence import Sequence

# Below this a temperature is greedy (as in vLLM): logits / T would overflow float32 to inf, and inf - inf in
# the softmax gives NaN, which masks every token (the row then "samples" token 0).
GREEDY_TEMPERATURE = 1e-5


def _temperature(t: float) -> float:
    return 0.0 if t < GREEDY_TEMPERATURE else t


def _as_int64(seed: int) -> int:
    """Seeds are uint64; tensors hold int64. Keep the bits (two's complement)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


class Sampler:
    def __init__(self, ops, device: torch.device):
        self.ops = ops
        self.device = device

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [B, V] float32 for seqs -> next token ids [B] int64 (on the device)."""
        penalized = [b for b, s in enumerate(seqs) if s.params.has_penalties]
        if penalized:  # opt-in, so the common batch pays nothing for it
            apply_penalties(logits, [seqs[b] for b in penalized], torch.tensor(penalized, device=logits.device))
        self._ban_stop_tokens_before_min_tokens(logits, seqs)
        if all(_temperature(s.params.temperature) == 0 for s in seqs):
            return logits.argmax(dim=-1)  # the common greedy batch needs no kernel at all
        params = [s.params for s in seqs]
        floats = torch.tensor([[_temperature(p.temperature), p.top_p] for p in params], dtype=torch.float32)
        ints = torch.tensor([[p.top_k, _as_int64(s.seed), s.num_output_tokens] for p, s in zip(params, seqs)],
                            dtype=torch.int64)
        floats, ints = floats.to(self.device, non_blocking=True), ints.to(self.device, non_blocking=True)
        return self.ops.sample(logits, floats[:, 0].contiguous(), ints[:, 0].to(torch.int32),
                               floats[:, 1].contiguous(), ints[:, 1].contiguous(), ints[:, 2].contiguous())


    def _ban_stop_tokens_before_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """min_tokens (vLLM's semantics): until a request has that many tokens, EOS (unless ignored) and its stop
        token ids cannot be sampled."""
        rows, cols = [], []
        for b, s in enumerate(seqs):
            if s.num_output_tokens < s.params.min_tokens:
                rows += [b] * len(s.stop_ids_before_min_tokens)
                cols += s.stop_ids_before_min_tokens
        if rows:
            index = torch.tensor([rows, cols], dtype=torch.int64).to(logits.device, non_blocking=True)
            logits[index[0], index[1]] = float("-inf")


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], rows: torch.Tensor) -> None:
    """vLLM's (and HF's) penalties, in place on logits[rows]: the repetition penalty divides positive logits
    (multiplies negative ones) of tokens seen in the prompt or the output; presence and frequency penalties
    subtract per generated token. Embedding prompts have no prompt token ids: only their output counts."""
    vocab, device = logits.shape[1], logits.device

    def counts(lists: list[list[int]]) -> torch.Tensor:
        width = max(1, max(len(x) for x in lists))
        ids = torch.full((len(lists), width), vocab, dtype=torch.int64)  # padding goes to an extra column
        for i, x in enumerate(lists):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.int64)
        ids = ids.to(device)
        c = torch.zeros(len(lists), vocab + 1, dtype=torch.float32, device=device)
        return c.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))[:, :vocab]

    output = counts([s.output_token_ids for s in seqs])
    prompt = counts([s.token_ids[:s.num_prompt_tokens] if s.prompt_embeds is None else [] for s in seqs])
    p = torch.tensor([[s.params.repetition_penalty, s.params.presence_penalty, s.params.frequency_penalty]
                      for s in seqs], dtype=torch.float32).to(device)
    sub = logits[rows]
    seen = (output > 0) | (prompt > 0)
    rep = p[:, 0:1]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - p[:, 2:3] * output - p[:, 1:2] * (output > 0).float()
    logits[rows] = sub
