"""GenerateOptions: every option of the `llm` model, named and documented once for Client and AsyncClient,
whole and streamed (the model's inputs: README.md "The `llm` model's interface").

Each field is sent as the input tensor of the same name, with the dtype in its metadata (request.py turns them
into tensors); a field left None is not sent, so the server's default applies. A new option is one new field.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np


def _option(dtype: type, default: Any = None, *, many: bool = False) -> Any:
    """A field sent as a `dtype` tensor: one value (dims [1]), or with many=True a list (dims [-1])."""
    return field(default=default, metadata={"dtype": dtype, "many": many})


@dataclass(frozen=True)
class GenerateOptions:
    """How to generate. Pass one as `options=`, or its fields as keywords, to Client.generate,
    AsyncClient.generate or AsyncClient.generate_stream; keywords override `options`' fields."""

    max_tokens: int | None = _option(np.int32, 16)
    """Tokens to generate at most; -1: up to the model length."""
    min_tokens: int | None = _option(np.int32)
    """EOS and stop tokens cannot end generation before this many tokens (nor can stop strings)."""
    temperature: float | None = _option(np.float32)
    """0 = greedy; the server's default is 1.0; at most 100."""
    top_p: float | None = _option(np.float32)
    """Nucleus sampling, in (0, 1]; 1 = off (default)."""
    top_k: int | None = _option(np.int32)
    """Sample among the k most likely tokens; 0 or -1 = off (default)."""
    seed: int | None = _option(np.uint64)
    """Same seed, same prompt -> same tokens, whatever else the server batches with it."""
    stop_token_ids: Sequence[int] | None = _option(np.int64, many=True)
    """Extra token ids that end generation (the stop token is part of the output)."""
    ignore_eos: bool | None = _option(np.bool_)
    """Keep generating past the end-of-sequence token."""
    stop: str | Sequence[str] | None = _option(np.object_, many=True)
    """Stop strings: the text ends before the first one generated (finish_reason "stop")."""
    include_stop_str_in_output: bool | None = _option(np.bool_)
    """Keep the stop string at the end of the text."""
    repetition_penalty: float | None = _option(np.float32)
    """In (0, 10]; 1 = off (default). Divides positive logits (multiplies negative ones) of the tokens already
    in the prompt or the output."""
    presence_penalty: float | None = _option(np.float32)
    """In [-2, 2]; 0 = off (default). Subtracted once from the logit of each token already generated."""
    frequency_penalty: float | None = _option(np.float32)
    """In [-2, 2]; 0 = off (default). Subtracted from a generated token's logit once per occurrence."""
    return_logprobs: bool | None = _option(np.bool_)
    """Fill Result.logprobs / Chunk.logprobs: each generated token's log-probability under the model's raw
    distribution (before temperature, top-p/k and penalties)."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def merge(cls, options: GenerateOptions | None, overrides: dict[str, Any]) -> GenerateOptions:
        """`options` (the defaults when None) with the keyword `overrides`; a keyword that is no option raises
        TypeError naming it."""
        unknown = [k for k in overrides if k not in cls.names()]
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r} "
                            f"(generate options are: {', '.join(cls.names())})")
        return replace(options or cls(), **overrides)
