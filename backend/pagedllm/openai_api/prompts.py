"""An OpenAI request -> the generations it asks for: one per prompt and per `n`, each a prompt for the `llm`
model (text, token ids or FP16 embeddings) with its GenerateOptions, in the order of the response's choices.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from pagedllm_client import GenerateOptions

from ..errors import InvalidRequest
from ..tokenizer import chat_token_ids, text_token_ids
from .embeds_payload import PayloadError, decode_prompt_embeds
from .protocol import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, SamplingFields


@dataclass
class Prompt:
    """One prompt: exactly one of text, token ids, embeddings; `echo_text` is what `echo` puts first."""
    text: str | None = None
    token_ids: list[int] | None = None
    embeds: np.ndarray | None = None
    echo_text: str = ""
    field: str = "prompt"  # what the request called it, for its errors
    num_tokens: int | None = None  # its length in tokens (embedding rows), when known

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
    max_token_chars: int = 1  # the most characters one token stands for (tokenizer.max_token_chars)


def completion_prompts(req: CompletionRequest, facts: ModelFacts) -> list[Prompt]:
    """Embeddings first, then the prompt(s), as vLLM orders them. An empty text prompt next to prompt_embeds
    (what clients send when the API insists on a prompt) adds no choice. Token-id prompts are decoded for
    `echo` only when it is asked for."""
    prompts = [Prompt(embeds=e, field=name, num_tokens=len(e)) for name, e in _embeds_prompts(req.prompt_embeds, facts)]
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    if p and all(isinstance(x, int) for x in p):
        p = [p]
    many = len(p or []) > 1
    for i, x in enumerate(p or []):
        field = f"prompt[{i}]" if many else "prompt"
        if isinstance(x, str):
            if x == "" and prompts:
                continue
            if x == "":
                raise InvalidRequest(f"{field}: the prompt is empty")
            ids = _text_ids(field, x, facts)  # tokenized here once: llm then takes the ids
            prompts.append(Prompt(text=x, echo_text=x, field=field) if ids is None else
                           Prompt(token_ids=ids, echo_text=x, field=field, num_tokens=len(ids)))
        else:
            if not x:
                raise InvalidRequest(f"{field}: the prompt is empty")
            prompts.append(Prompt(token_ids=list(x), echo_text=_decode(facts, x) if req.echo else "", field=field,
                                  num_tokens=len(x)))
    if not prompts:
        raise InvalidRequest("prompt: give a prompt or prompt_embeds")
    return prompts


def check_lengths(prompts: list[Prompt], max_tokens: int | None, facts: ModelFacts) -> None:
    """As vLLM's OpenAI server does: a prompt the model cannot hold, or one that leaves less room than
    max_tokens asks for, is refused naming it (400), rather than answered short with finish_reason "length"."""
    for p in prompts:
        if p.num_tokens is None:
            continue
        if p.num_tokens >= facts.max_rows:
            raise InvalidRequest(f"{p.field}: the prompt has {p.num_tokens} tokens but the model length is "
                                 f"{facts.max_rows} (prompt plus at least one generated token)")
        if max_tokens is not None and p.num_tokens + max_tokens > facts.max_rows:
            raise InvalidRequest(f"max_tokens: {max_tokens} after the {p.num_tokens} tokens of {p.field} is more "
                                 f"than the model length {facts.max_rows} allows (at most "
                                 f"{facts.max_rows - p.num_tokens})")


def _text_ids(field: str, text: str, facts: ModelFacts) -> list[int] | None:
    """A text prompt's token ids (None without a tokenizer: llm tokenizes it); a text too long to fit is
    refused by its size before tokenizing."""
    if facts.tokenizer is None:
        return None
    if len(text) > facts.max_rows * facts.max_token_chars:
        raise InvalidRequest(f"{field}: {len(text)} characters cannot fit in the model length ({facts.max_rows} "
                             "tokens)")
    return text_token_ids(facts.tokenizer, text)


def _embeds_prompts(payload: str | list[str] | None, facts: ModelFacts) -> list[tuple[str, np.ndarray]]:
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
            out.append((name, decode_prompt_embeds(item, hidden_size=facts.hidden_size, max_rows=facts.max_rows,
                                                   name=name)))
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
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    if chars > facts.max_rows * facts.max_token_chars:  # before the template and the tokenizer work on it
        raise InvalidRequest(f"messages: {chars} characters cannot fit in the model length ({facts.max_rows} "
                             "tokens)")
    ids = chat_token_ids(facts.tokenizer, messages, add_generation_prompt=req.add_generation_prompt)
    return Prompt(token_ids=ids, field="messages", num_tokens=len(ids))


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
