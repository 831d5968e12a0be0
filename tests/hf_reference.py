"""Hugging Face transformers as the reference: greedy `generate` on the same checkpoint."""
from __future__ import annotations

import functools

import torch
from transformers import AutoModelForCausalLM


@functools.lru_cache(maxsize=8)
def hf_model(model_dir: str):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def embeds_fp16(model_dir: str, ids: list[int]) -> torch.Tensor:
    """What an upstream model would send: the checkpoint's own embedding rows, in fp16."""
    with torch.no_grad():
        return hf_model(model_dir).get_input_embeddings()(torch.tensor(ids)).to(torch.float16)


@torch.no_grad()
def hf_greedy(model_dir: str, ids: list[int] | None = None, embeds: torch.Tensor | None = None,
              max_new_tokens: int = 16) -> list[int]:
    """Greedy continuation (stopping at the checkpoint's EOS, like the engine) of ids or fp16 embeds."""
    model = hf_model(model_dir)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=model.generation_config.pad_token_id)
    if embeds is not None:
        out = model.generate(inputs_embeds=embeds.to(model.dtype)[None], **kwargs)
        return out[0].tolist()  # with inputs_embeds, generate returns only the new tokens
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kwargs)
    return out[0, len(ids):].tolist()
