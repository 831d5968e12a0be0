"""Text or token ids -> prompt embeddings with a checkpoint's own embedding matrix, optionally after a soft
prompt. What the `embed` model of the repository runs; also what a client does to compute embeddings locally.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InvalidRequest
from ..model.spec import load_model_spec
from ..model.weights import load_tensor
from ..tokenizer import load_tokenizer, max_token_chars, prompt_token_ids


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
    """Refuses, before any work proportional to their size, prompts longer than the checkpoint's
    max_position_embeddings (no model behind it could take them): token ids by count, texts by characters."""

    def __init__(self, model_dir: str, soft_prompt: str | None = None, dtype=torch.float16):
        self.weight = load_tensor(model_dir).to(dtype)
        self.tokenizer = load_tokenizer(model_dir)
        self.soft_prompt = load_soft_prompt(soft_prompt, self.hidden_size).to(dtype) if soft_prompt else None
        self.max_len = load_model_spec(model_dir).max_position_embeddings
        self.max_chars = None if self.tokenizer is None else self.max_len * max_token_chars(self.tokenizer)

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def token_ids(self, text: str, chat: bool) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequest("text_input: this checkpoint has no tokenizer; send input_ids")
        if len(text) > self.max_chars:
            raise InvalidRequest(f"text_input: the prompt has {len(text)} characters, more than the model length "
                                 f"of {self.max_len} tokens can hold (at most {self.max_chars} characters)")
        return prompt_token_ids(self.tokenizer, text, chat)

    def check_count(self, n: int) -> None:
        if n > self.max_len:
            raise InvalidRequest(f"input_ids: the prompt has {n} tokens but the model length is {self.max_len}")

    def embed(self, ids: list[int]) -> torch.Tensor:
        """[len(ids) (+ soft prompt rows), hidden_size] in the embedder's dtype."""
        self.check_count(len(ids))
        if not ids:
            raise InvalidRequest("input_ids: the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"input_ids: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        rows = self.weight[torch.tensor(ids, dtype=torch.int64)]
        return rows if self.soft_prompt is None else torch.cat((self.soft_prompt, rows))
