"""What the OpenAI API answers, as pydantic models: they document /openapi.json (the routes build plain dicts of
these shapes; nothing is validated per request), and `openapi()` fixes up what FastAPI would document wrongly:
its 422 (validation errors are answered 400, in OpenAI's error shape) and the event streams' chunks."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

FinishReason = Literal["stop", "length"]


# ------------------------------------------------------------------------------------------------- errors
class ErrorInfo(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, service_unavailable or "
                                  "server_error")
    param: str | None = None
    code: int = Field(description="the HTTP status")


class ErrorResponse(BaseModel):
    """Every error, as service.APIError.body() builds it (OpenAI's shape)."""
    error: ErrorInfo


# -------------------------------------------------------------------------------------------------- usage
class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose K/V came from the prefix cache (whole KV "
                                           "blocks)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


# ------------------------------------------------------------------------------------------------- models
class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------- completions
class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None = Field(description="null until a streamed choice's last chunk")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One event of a completions stream: a choice's new text, or (stream_options.include_usage) the usage
    with no choices last."""
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ------------------------------------------------------------------------------------------------- chat
class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[Any]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprob]


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# ----------------------------------------------------------------------------------------- the routes' docs
_REF = "#/components/schemas/{model}"
_ERROR = {"$ref": _REF.format(model="ErrorResponse")}
_STATUS_TEXT = {
    400: "A bad request, naming the field at fault (also a body that is not the request's JSON)",
    401: "No or a wrong API key (`Authorization: Bearer KEY`), when the server has one",
    404: "An unknown model (the `model` field); on /metrics: no metrics URL configured",
    411: "A POST without Content-Length",
    413: "A body larger than --max-request-bytes (refused before it is read)",
    500: "An internal error of the server",
    503: "tritonserver or the llm model is not ready (starting, stopping, failed); on /metrics: Triton's "
         "metrics cannot be read",
}


def errors(*statuses: int) -> dict[int, dict]:
    """`responses=` entries for these error statuses: OpenAI's error body, as JSON."""
    return {s: {"description": _STATUS_TEXT[s], "content": {"application/json": {"schema": _ERROR}}}
            for s in statuses}


def json_or_stream(model: type[BaseModel], chunk: type[BaseModel]) -> dict[int, dict]:
    """A 200 that is `model` as JSON, or with `stream: true` server-sent events: each `data:` a `chunk` (or an
    error, if the stream fails after it started), then `data: [DONE]`."""
    data = {"type": "string", "anyOf": [
        {"const": "[DONE]"},
        {"contentMediaType": "application/json",
         "contentSchema": {"anyOf": [{"$ref": _REF.format(model=chunk.__name__)}, _ERROR]}}]}
    return {200: {"description": f"{model.__name__}, or with `stream: true` an event stream of "
                                 f"{chunk.__name__} events ending with `data: [DONE]`",
                  "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}},
                              "text/event-stream": {"itemSchema": {
                                  "type": "object", "required": ["data"], "properties": {"data": data}}}}}}


def plain_text(description: str) -> dict[int, dict]:
    return {200: {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}}


# Documented in components besides what the routes name: the stream chunks, and the error body.
_EXTRA_MODELS = (ErrorResponse, CompletionChunk, ChatCompletionChunk, CompletionResponse, ChatCompletionResponse,
                 ModelList)


def fix_openapi(schema: dict) -> dict:
    """FastAPI's schema, as the server answers: no 422 (validation errors are 400s), no FastAPI validation
    error models, and the models the routes' `responses` refer to by name."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    _, defs = models_json_schema([(m, "serialization") for m in _EXTRA_MODELS], ref_template=_REF)
    for name, definition in defs.get("$defs", {}).items():
        if components.setdefault(name, definition) != definition:
            raise ValueError(f"two schemas named {name!r} in the OpenAPI document")
    return schema
