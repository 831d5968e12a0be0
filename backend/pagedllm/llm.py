"""The offline API: generate from Python without a server.

    from pagedllm import LLM, SamplingParams
    llm = LLM(model="path/to/checkpoint")
    outs = llm.generate([{"prompt_embeds": t}, {"prompt_token_ids": [1, 2, 3]}, "Hello"],
                        SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text, outs[0].outputs[0].token_ids

Prompts of every kind go into one continuous batch; results come back in input order.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import EngineConfig
from .engine.engine import LLMEngine
from .engine.request import Request
from .sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] | None = None  # with SamplingParams(return_logprobs=True): one per token


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the text, for text prompts
    prompt_token_ids: list[int] | None  # None for embedding prompts
    num_prompt_tokens: int
    outputs: list[CompletionOutput]
    finished: bool = True


class LLM:
    def __init__(self, model: str, **engine_options: Any):
        """engine_options are EngineConfig fields: device, dtype, kernels, block_size, num_kv_blocks, ..."""
        self.engine = LLMEngine(EngineConfig(model_dir=str(model), **engine_options))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any (they also die with this process)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """prompts: a string, {"prompt": str}, {"prompt_token_ids": ids}, {"prompt_embeds": tensor
        [seq_len, hidden_size]}, or a list mixing them. Raises ValueError naming a bad prompt's input."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) \
            else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: got {len(params)} for {len(prompts)} prompts")

        requests = [self._request(p, sp) for p, sp in zip(prompts, params)]  # validate all first
        for request in requests:
            self.engine.add(request)
        while self.engine.has_unfinished():
            self.engine.step()
        return [_request_output(r) for r in requests]

    def _request(self, prompt, params: SamplingParams) -> Request:
        text, ids, embeds = _unpack(prompt)
        if text is not None:
            ids = self.engine.tokenize(text)
        return self.engine.make_request(str(next(self._ids)), params, prompt_token_ids=ids, prompt_embeds=embeds,
                                        prompt_text=text)


def _request_output(request: Request) -> RequestOutput:
    seq = request.seq
    prompt_ids = None if seq.prompt_embeds is not None else seq.token_ids[:seq.num_prompt_tokens]
    completion = CompletionOutput(request.text, list(request.output_token_ids), request.finish_reason,
                                  request.logprobs)
    return RequestOutput(request.request_id, request.prompt_text, prompt_ids, seq.num_prompt_tokens, [completion])


def _unpack(prompt) -> tuple[str | None, list[int] | None, torch.Tensor | None]:
    if isinstance(prompt, str):
        return prompt, None, None
    if not isinstance(prompt, dict):
        raise ValueError(f"prompt: expected a string or a dict, got {type(prompt).__name__}")
    keys = set(prompt) & {"prompt", "prompt_token_ids", "prompt_embeds"}
    if len(keys) != 1:
        raise ValueError("prompt: a dict needs exactly one of 'prompt', 'prompt_token_ids', 'prompt_embeds'")
    ids = prompt.get("prompt_token_ids")
    if ids is not None:
        ids = [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    embeds = prompt.get("prompt_embeds")
    if embeds is not None and not isinstance(embeds, torch.Tensor):
        embeds = torch.as_tensor(embeds)
    return prompt.get("prompt"), ids, embeds
