"""Text or token ids -> prompt embeddings with a checkpoint's own embedding matrix, optionally after a soft
prompt. What the `embed` model of the repository runs; also what a client does to compute embeddings locally.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InvalidRequest
from ..model.weights import load_tensor
from ..tokenizer import load_tokenizer, prompt_token_ids


def load_soft_prompt(path: str | Path, hidden_size: int) -> torch.Tensor:
    """A safetensors file holding one [n, hidden_size] tensor (or one named `soft_prompt`)."""
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        key = "soft_prompt" if "soft_prompt" in keys else keys[0] if len(keys) == 1 else None
        if key is None:
            raise ValueError(f"{path}: expected one tensor or one named 'soft_prompt', found {keys}")
        t = f.get_tensor(key)
    if t.dim() != 2 or t.shape[1] != hidden_size:
        raise ValueError(f"{path}: soft prompt shape {list(t.shape)} is not [n, {hidden_size}]")
    return t


class Embedder:
    def __init__(self, model_dir: str, soft_prompt: str | None = None, dtype=torch.float16):
        self.weight = load_tensor(model_dir).to(dtype)
        self.tokenizer = load_tokenizer(model_dir)
        self.soft_prompt = load_soft_prompt(soft_prompt, self.hidden_size).to(dtype) if soft_prompt else None

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def token_ids(self, text: str, chat: bool) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("text_input: this checkpoint has no tokenizer; send input_ids")
        return prompt_token_ids(self.tokenizer, text, chat)

    def embed(self, ids: list[int]) -> torch.Tensor:
        """[len(ids) (+ soft prompt rows), hidden_size] in the embedder's dtype."""
        if not ids:
            raise InvalidRequest("input_ids: the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"input_ids: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        rows = self.weight[torch.tensor(ids, dtype=torch.int64)]
        return rows if self.soft_prompt is None else torch.cat((self.soft_prompt, rows))
