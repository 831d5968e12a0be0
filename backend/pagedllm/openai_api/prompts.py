"""An OpenAI request -> the generations it asks for: one per prompt and per `n`, each a prompt for the `llm`
model (text, token ids or FP16 embeddings) with its GenerateOptions, in the order of the response's choices.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pagedllm_client import GenerateOptions

from ..errors import InvalidRequest
from ..tokenizer import chat_token_ids
from .embeds_payload import PayloadError, decode_prompt_embeds
from .protocol import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, SamplingFields


@dataclass
class Prompt:
    """One prompt: exactly one of text, token ids, embeddings; `echo_text` is what `echo` puts first."""
    text: str | None = None
    token_ids: list[int] | None = None
    embeds: np.ndarray | None = None
    echo_text: str = ""

    def client_kwargs(self) -> dict[str, Any]:
        if self.text is not None:
            return {"text": self.text}
        if self.token_ids is not None:
            return {"input_ids": self.token_ids}
        return {"prompt_embeds": self.embeds}


@dataclass
class Generation:
    index: int  # the choice's index in the response
    prompt: Prompt
    options: GenerateOptions


@dataclass
class ModelFacts:
    """What the front end knows of the served checkpoint (from its directory)."""
    hidden_size: int
    max_rows: int  # the longest prompt the served model takes (its max_model_len as configured)
    tokenizer: Any


def completion_prompts(req: CompletionRequest, facts: ModelFacts) -> list[Prompt]:
    """Embeddings first, then the prompt(s), as vLLM orders them. An empty text prompt next to prompt_embeds
    (what clients send when the API insists on a prompt) adds no choice. Token-id prompts are decoded for
    `echo` only when it is asked for."""
    prompts = [Prompt(embeds=e) for e in _embeds_prompts(req.prompt_embeds, facts)]
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    if p and all(isinstance(x, int) for x in p):
        p = [p]
    for i, x in enumerate(p or []):
        if isinstance(x, str):
            if x == "" and prompts:
                continue
            if x == "":
                raise InvalidRequest("prompt: the prompt is empty")
            prompts.append(Prompt(text=x, echo_text=x))
        else:
            if not x:
                raise InvalidRequest(f"prompt[{i}]: the prompt is empty")
            prompts.append(Prompt(token_ids=list(x), echo_text=_decode(facts, x) if req.echo else ""))
    if not prompts:
        raise InvalidRequest("prompt: give a prompt or prompt_embeds")
    return prompts


def _embeds_prompts(payload: str | list[str] | None, facts: ModelFacts) -> list[np.ndarray]:
    if payload is None:
        return []
    many = isinstance(payload, list)
    payloads = payload if many else [payload]
    if len(payloads) > MAX_CHOICES:
        raise InvalidRequest(f"prompt_embeds: {len(payloads)} tensors is more than {MAX_CHOICES}")
    out = []
    for i, item in enumerate(payloads):
        name = f"prompt_embeds[{i}]" if many else "prompt_embeds"
        try:
            out.append(decode_prompt_embeds(item, hidden_size=facts.hidden_size, max_rows=facts.max_rows,
                                            name=name))
        except PayloadError as e:
            raise InvalidRequest(str(e)) from None
    return out


def _decode(facts: ModelFacts, ids: list[int]) -> str:
    if facts.tokenizer is None:
        return ""
    return facts.tokenizer.decode(ids, skip_special_tokens=False)


def chat_prompt(req: ChatCompletionRequest, facts: ModelFacts) -> Prompt:
    if facts.tokenizer is None:
        raise InvalidRequest("messages: the served checkpoint has no tokenizer")
    messages = [m.template_dict() for m in req.messages]
    ids = chat_token_ids(facts.tokenizer, messages, add_generation_prompt=req.add_generation_prompt)
    return Prompt(token_ids=ids)


def sampling_options(req: SamplingFields, max_tokens: int | None) -> GenerateOptions:
    """The OpenAI fields as the `llm` model's options (None: the model's default). Temperature defaults to
    OpenAI's 1.0, which is also the model's."""
    return GenerateOptions(
        max_tokens=-1 if max_tokens is None else max_tokens, min_tokens=req.min_tokens,
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
        stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, stop=req.stop_list,
        include_stop_str_in_output=req.include_stop_str_in_output, repetition_penalty=req.repetition_penalty,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)


def fan_out(prompts: list[Prompt], options: GenerateOptions, n: int) -> list[Generation]:
    """n generations per prompt; with a seed, the j-th of a prompt's n uses seed + j (mod 2**64), so that the
    n choices differ and a request gives the same choices every time."""
    if len(prompts) * n > MAX_CHOICES:
        raise InvalidRequest(f"n: {len(prompts)} prompts x n={n} is more than {MAX_CHOICES} choices")
    out = []
    for p, prompt in enumerate(prompts):
        for j in range(n):
            seeded = options if options.seed is None else replace(options, seed=(options.seed + j) % 2**64)
            out.append(Generation(p * n + j, prompt, seeded))
    return out
