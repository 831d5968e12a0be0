"""The OpenAI-compatible HTTP API (FastAPI): /v1/models, /v1/completions, /v1/chat/completions, /health and
/metrics (Triton's, passed through, for scrapers that look on the API's port).

It holds no model: each request becomes generations on Triton's `llm` model (service.Runner); the served
checkpoint's directory gives the tokenizer (chat template, logprob token text) and the limits for
`prompt_embeds`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import urllib.request
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pagedllm_client import AsyncClient
from starlette.exceptions import HTTPException

from ..errors import InvalidRequest
from .prompts import ModelFacts, chat_prompt, check_lengths, completion_prompts, fan_out, sampling_options
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import (ChatCompletionChunk, ChatCompletionResponse, CompletionChunk, CompletionResponse, ModelList,
                        errors, fix_openapi, json_or_stream, plain_text)
from .service import APIError, Choice, Runner, new_id, now, sse, usage


@dataclass
class Settings:
    triton_url: str  # gRPC, host:port
    served_model_name: str
    facts: ModelFacts
    api_key: str | None = None
    metrics_url: str | None = None  # Triton's /metrics, passed through on ours
    max_request_bytes: int = 64 << 20
    model: str = "llm"  # the Triton model


def build_app(settings: Settings) -> FastAPI:
    state = _State(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await state.client.close()

    app = FastAPI(title="pagedllm OpenAI-compatible API", lifespan=lifespan)
    app.add_middleware(_Guard, api_key=settings.api_key, max_bytes=settings.max_request_bytes)
    _install_error_handlers(app)
    _document_as_answered(app)
    # What the _Guard answers before a route runs: 401 on /v1 (with an API key), 411 and 413 on a POST.
    post_errors = errors(400, 401, 404, 411, 413, 500, 503)

    @app.get("/health", response_class=PlainTextResponse, responses={
        **plain_text("tritonserver and the llm model are ready (an empty body)"), **errors(503)})
    async def health():
        if await state.ready():
            return PlainTextResponse("")
        raise APIError(503, f"the Triton model {settings.model!r} is not ready")

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        **plain_text("Triton's metrics (Prometheus text format)"), **errors(404, 503)})
    async def metrics():
        if settings.metrics_url is None:
            raise APIError(404, "no metrics URL configured (--metrics-url)")
        try:
            text = await asyncio.to_thread(_fetch, settings.metrics_url)
            return PlainTextResponse(text + state.runner.metrics_text())
        except OSError as e:  # URLError, a timeout, a refused connection: Triton's metrics are not there
            raise APIError(503, f"Triton's metrics at {settings.metrics_url} could not be read ({e})") from None

    @app.get("/v1/models", responses={200: {"model": ModelList}, **errors(401)})
    async def models():
        return {"object": "list", "data": [{"id": settings.served_model_name, "object": "model", "created": now(),
                                            "owned_by": "pagedllm", "max_model_len": settings.facts.max_rows}]}

    @app.post("/v1/completions", responses={**json_or_stream(CompletionResponse, CompletionChunk), **post_errors})
    async def completions(req: CompletionRequest, request: Request):
        state.check_model(req.model)
        prompts = await asyncio.to_thread(_invalid_as_400, completion_prompts, req, settings.facts)
        max_tokens = req.max_tokens
        _invalid_as_400(check_lengths, prompts, max_tokens, settings.facts)
        options = sampling_options(req, max_tokens)
        options = replace(options, return_logprobs=req.logprobs is not None or None)
        gens = _invalid_as_400(fan_out, prompts, options, req.n)
        echoes = {g.index: g.prompt.echo_text if req.echo else "" for g in gens}
        rid, created = new_id("cmpl"), now()
        if req.stream:
            chunks = await state.runner.open_stream(gens, _disconnected(request))  # errors so far: their status
            return _event_stream(state.completion_events(req, gens, chunks, echoes, rid, created))
        choices = await state.runner.collect(gens, _disconnected(request))
        for c in choices:
            c.echo = echoes[c.index]
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                "choices": [state.completion_choice(c, req.logprobs is not None) for c in choices],
                "usage": usage(choices, req.n)}

    @app.post("/v1/chat/completions",
              responses={**json_or_stream(ChatCompletionResponse, ChatCompletionChunk), **post_errors})
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        state.check_model(req.model)
        prompt = await asyncio.to_thread(_invalid_as_400, chat_prompt, req, settings.facts)
        max_tokens = req.token_limit
        _invalid_as_400(check_lengths, [prompt], max_tokens, settings.facts)
        options = replace(sampling_options(req, max_tokens), return_logprobs=req.logprobs or None)
        gens = _invalid_as_400(fan_out, [prompt], options, req.n)
        rid, created = new_id("chatcmpl"), now()
        if req.stream:
            chunks = await state.runner.open_stream(gens, _disconnected(request))  # errors so far: their status
            return _event_stream(state.chat_events(req, gens, chunks, rid, created))
        choices = await state.runner.collect(gens, _disconnected(request))
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                             "logprobs": state.chat_logprobs(c.token_ids, c.logprobs) if req.logprobs else None,
                             "finish_reason": c.finish_reason} for c in choices],
                "usage": usage(choices, req.n)}

    return app


class _State:
    """What the routes share: the settings, one gRPC client (one channel, a stream per generation), the runner."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.client = AsyncClient(settings.triton_url, "grpc", settings.model)
        self.runner = Runner(self.client)

    async def ready(self) -> bool:
        return await self.client.is_ready()

    def check_model(self, name: str) -> None:
        if name != self.settings.served_model_name:
            raise APIError(404, f"The model {name!r} does not exist (this server serves "
                                f"{self.settings.served_model_name!r})")

    def token_text(self, token_id: int) -> str:
        tok = self.settings.facts.tokenizer
        return tok.decode([token_id]) if tok is not None else ""

    def completion_logprobs(self, token_ids: list[int], logprobs: list[float], offset: int) -> dict:
        tokens = [self.token_text(t) for t in token_ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}

    def chat_logprobs(self, token_ids: list[int], logprobs: list[float]) -> dict:
        content = []
        for t, lp in zip(token_ids, logprobs):
            text = self.token_text(t)
            content.append({"token": text, "logprob": lp, "bytes": list(text.encode()), "top_logprobs": []})
        return {"content": content}

    def completion_choice(self, c: Choice, with_logprobs: bool) -> dict:
        lp = self.completion_logprobs(c.token_ids, c.logprobs, len(c.echo)) if with_logprobs else None
        return {"index": c.index, "text": c.echo + "".join(c.text), "logprobs": lp, "finish_reason": c.finish_reason}

    async def completion_events(self, req: CompletionRequest, gens, chunks, echoes: dict[int, str], rid: str,
                                created: int):
        choices = {g.index: Choice(g.index, echo=echoes[g.index]) for g in gens}
        offsets = {g.index: len(echoes[g.index]) for g in gens}  # the next token's text_offset
        head = {"id": rid, "object": "text_completion", "created": created, "model": req.model}

        def event_choice(index: int, chunk) -> dict | None:
            c = choices[index]
            text = ("" if c.text else c.echo) + chunk.text  # the echo goes with the choice's first chunk
            if not text and not chunk.finish_reason and not chunk.logprobs:
                return None
            lp = None
            if req.logprobs is not None:  # offsets as in the whole answer: the echo, then each token's text
                lp = self.completion_logprobs(chunk.token_ids, chunk.logprobs or [], offsets[index])
                offsets[index] += sum(len(t) for t in lp["tokens"])
            return {"index": index, "text": text, "logprobs": lp, "finish_reason": chunk.finish_reason}

        async for event in _stream_events(req, head, choices, chunks, event_choice):
            yield event

    async def chat_events(self, req: ChatCompletionRequest, gens, chunks, rid: str, created: int):
        choices = {g.index: Choice(g.index) for g in gens}
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
        for g in gens:  # OpenAI's first delta of each choice carries the role
            yield sse({**head, "choices": [{"index": g.index, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})

        def event_choice(index: int, chunk) -> dict | None:
            if not chunk.text and not chunk.finish_reason and not chunk.logprobs:
                return None
            lp = self.chat_logprobs(chunk.token_ids, chunk.logprobs or []) if req.logprobs else None
            return {"index": index, "delta": {"content": chunk.text} if chunk.text else {}, "logprobs": lp,
                    "finish_reason": chunk.finish_reason}

        async for event in _stream_events(req, head, choices, chunks, event_choice):
            yield event


async def _stream_events(req, head: dict, choices: dict[int, Choice], chunks, event_choice):
    """A stream's SSE events: one for each chunk that says something (`event_choice` makes its choice, or
    None; it sees the choice before the chunk is added), usage as stream_options ask, an error event if the
    stream failed after it started, and [DONE]."""
    opts = req.stream_options
    async for index, chunk in _in_stream_errors(chunks):
        if isinstance(chunk, APIError):
            yield sse(chunk.body())
            break
        choice = event_choice(index, chunk)
        choices[index].add(chunk)
        if choice is None:
            continue
        event = {**head, "choices": [choice]}
        if opts and opts.continuous_usage_stats:
            event["usage"] = usage(list(choices.values()), req.n)
        yield sse(event)
    else:
        if opts and opts.include_usage:
            yield sse({**head, "choices": [], "usage": usage(list(choices.values()), req.n)})
    yield "data: [DONE]\n\n"


async def _in_stream_errors(chunks):
    """The chunks; an error after the response started becomes one last item (an SSE error)."""
    try:
        async for item in chunks:
            yield item
    except APIError as e:
        yield -1, e


def _event_stream(events) -> StreamingResponse:
    # Starlette cancels the generator when the client disconnects; its finally blocks close the gRPC streams.
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is read already: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _invalid_as_400(fn, *args):
    try:
        return fn(*args)
    except InvalidRequest as e:
        raise APIError(400, str(e)) from None


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def routing_error(request: Request, e: HTTPException):
        """Starlette's own errors (an unknown route, a wrong method) in OpenAI's shape too, not {"detail": ...}."""
        where = f"{request.method} {request.url.path}"
        if e.status_code == 404:
            message = f"{where}: no such route (this server serves /v1/models, /v1/completions, " \
                      f"/v1/chat/completions, /health and /metrics)"
        elif e.status_code == 405:
            message = f"{where}: method not allowed (allowed: {(e.headers or {}).get('Allow', 'none')})"
        else:
            message = f"{where}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, _validation_message(e)).body(), status_code=400)


_TYPE_TAGS = {"str", "int", "float", "bool", "none"}
_TYPE_TAG_PREFIXES = ("list[", "dict[", "function-", "constrained-", "union[", "nullable[", "tagged-union[")


def _validation_message(e: RequestValidationError) -> str:
    """The first problem, named by its field: `temperature: Input should be a valid number`."""
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    # Union members and pydantic's type tags clutter the path; keep the field names and list indexes.
    # (Exact tags, not prefixes: "stream" and "stream_options" are field names.)
    loc = [x for x in loc if x not in _TYPE_TAGS and not x.startswith(_TYPE_TAG_PREFIXES)]
    message = err.get("msg", "invalid value").removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        message = "unknown field (not supported by this server)"
    if err.get("type") == "json_invalid":
        return f"the body is not valid JSON ({err.get('ctx', {}).get('error', '')})"
    if message.split(":", 1)[0].split("[", 1)[0] in loc:  # the validator already named it (or its item)
        return message
    return f"{'.'.join(loc)}: {message}" if loc else message


def _document_as_answered(app: FastAPI) -> None:
    """/openapi.json as the server answers (responses.fix_openapi), built once."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = fix_openapi(build())
        return app.openapi_schema

    app.openapi = openapi


class _Guard:
    """ASGI middleware, ahead of everything else (nothing is read or parsed before it): with an API key, /v1
    requests must carry it (401); a POST must say its length, and a body longer than the limit is refused (413)
    before it is read (server.default_max_request_bytes sizes the limit)."""

    def __init__(self, app, api_key: str | None, max_bytes: int):
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        problem = self._problem(scope) if scope["type"] == "http" else None
        if problem:
            await JSONResponse(APIError(*problem).body(), status_code=problem[0])(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _problem(self, scope) -> tuple[int, str] | None:
        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"].startswith("/v1/"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return 401, "invalid or missing API key (Authorization: Bearer <key>)"
        if scope["method"] == "POST":
            length = headers.get(b"content-length")
            if length is None or not length.isdigit():
                return 411, "a request body needs a Content-Length"
            if int(length) > self.max_bytes:
                return 413, (f"the body is {int(length)} bytes, more than the limit of {self.max_bytes} "
                             f"(the server's --max-request-bytes)")
        return None
