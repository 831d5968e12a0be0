"""The OpenAI request bodies this front end accepts, as pydantic models: OpenAI's Completions and Chat
Completions fields, vLLM's extra sampling keys (sent through the openai client's `extra_body`), and vLLM's
`prompt_embeds`. Unknown fields are refused by name rather than ignored: a field we do not act on would change
the result silently. OpenAI fields that only restate what happens anyway are accepted with those values."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_CHOICES = 128  # prompts x n in one request

# Integers go to the `llm` model as tensors of its input dtypes (INT32 counts, INT64 token ids, UINT64 seed):
# a value outside the dtype would wrap around (numpy < 2) or fail to convert, so it is refused here, by name.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]

# `stop` as OpenAI takes it: one string or a list.
Stop = Union[str, list[str], None]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage on every chunk


class SamplingFields(BaseModel):
    """What both APIs share: OpenAI's sampling fields and vLLM's extras."""
    model_config = ConfigDict(extra="forbid")

    model: str
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: Stop = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the caller's own end-user id: recorded nowhere, changes nothing
    logit_bias: dict[str, float] | None = None
    # vLLM's extra keys (openai client: extra_body={...})
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)
    min_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = None

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v):
        if v:
            raise ValueError("a logit bias is not supported")
        return v

    @property
    def stop_list(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]], None] = None
    prompt_embeds: Union[str, list[str], None] = None  # vLLM's: base64 of torch.save(tensor), or a list
    # OpenAI's default 16; None (vLLM): up to the model length. Negative is a 400, as in OpenAI and vLLM (the llm
    # model's -1 for "up to the model length" is not the OpenAI API's).
    max_tokens: int | None = Field(16, ge=0, le=INT32_MAX)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)
    best_of: int | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _token_ids_fit_int64(cls, v):
        """Checked here rather than by the union's member types, whose errors would name every member."""
        if isinstance(v, list) and v and not isinstance(v[0], str):
            for i, ids in enumerate(v if isinstance(v[0], list) else [v]):
                bad = next((t for t in ids if not 0 <= t <= INT64_MAX), None)
                if bad is not None:
                    name = f"prompt[{i}]" if isinstance(v[0], list) else "prompt"
                    raise ValueError(f"{name}: token id {bad} is outside [0, 2^63)")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported (no server-side ranking)")
        if self.logprobs:
            raise ValueError("logprobs: only 0 is supported (each token's own log-probability); the top "
                             "alternatives are not available")
        if self.prompt is None and self.prompt_embeds is None:
            raise ValueError("prompt: give a prompt or prompt_embeds")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id ... go to the chat template as they are
    role: str
    content: Union[str, list[TextPart], None] = None

    def template_dict(self) -> dict:
        """The message as a chat template takes it: content as one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, le=INT32_MAX)  # both absent or None: up to the model length
    max_completion_tokens: int | None = Field(None, ge=0, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    response_format: ResponseFormat | None = None
    tool_choice: Literal["none"] | None = None
    add_generation_prompt: bool = True  # vLLM's extra key

    @model_validator(mode="after")
    def _check(self):
        if self.top_logprobs:
            raise ValueError("top_logprobs: only 0 is supported (each token's own log-probability); the top "
                             "alternatives are not available")
        return self

    @property
    def token_limit(self) -> int | None:
        """max_completion_tokens, else the deprecated max_tokens; None: up to the model length."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
