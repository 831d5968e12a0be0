"""Running an OpenAI request's generations on the `llm` model and shaping OpenAI's answers: one JSON body, or
server-sent events (one chunk per engine step and choice, `data: [DONE]` last).

Every generation is its own gRPC stream to Triton (pagedllm_client.AsyncClient). Whatever ends a request early
(the client disconnecting, an error in a sibling choice) closes the streams still open, and closing a stream
cancels its Triton request, whose KV blocks are then freed within a step.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, TypeVar

from pagedllm_client import AsyncClient, Chunk, PagedLLMError, Result

from ..errors import CANCELLED, INTERNAL, UNAVAILABLE, error_kind
from .prompts import Generation

# The `llm` outputs an answer needs: token ids and their logprobs only when logprobs were asked for.
TEXT_OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "num_cached_tokens")
LOGPROB_OUTPUTS = TEXT_OUTPUTS + ("token_ids", "logprobs")

# gRPC statuses (before any response) and the model's own error kinds -> HTTP statuses.
_GRPC_STATUS = {"INVALID_ARGUMENT": 400, "UNAVAILABLE": 503, "NOT_FOUND": 503, "DEADLINE_EXCEEDED": 504,
                "CANCELLED": 499}
_KIND_STATUS = {INTERNAL: 500, UNAVAILABLE: 503, CANCELLED: 499}

T = TypeVar("T")


class APIError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict:
        kind = {401: "authentication_error", 503: "service_unavailable"}.get(self.status)
        kind = kind or ("invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": None, "code": self.status}}


# What Triton answers for a model that is not loaded. The front end only asks for the `llm` model it was started
# with, so this means llm is being unloaded (the server is stopping) or failed to load: not the request's fault.
_MODEL_GONE = ("Request for unknown model", "has no available versions", "is not ready")


def api_error(e: PagedLLMError) -> APIError:
    kind = error_kind(e.message)
    if kind is not None:
        return APIError(_KIND_STATUS[kind], e.message)
    if any(words in e.message for words in _MODEL_GONE):
        return APIError(503, f"the model is not available (the server may be shutting down): {e.message}")
    if e.status is None:  # an error inside the stream that is not the server's: the request's fault
        return APIError(400, e.message)
    return APIError(_GRPC_STATUS.get(str(e.status), 500), e.message)


@dataclass
class Choice:
    """One choice as it accumulates."""
    index: int
    echo: str = ""
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the engine took from its prefix cache

    def add(self, chunk: Chunk) -> None:
        self.text.append(chunk.text)
        self.token_ids += chunk.token_ids
        self.logprobs += chunk.logprobs or []
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.prompt_tokens = chunk.num_input_tokens or self.prompt_tokens
        self.completion_tokens = chunk.num_output_tokens
        self.cached_tokens = chunk.num_cached_tokens or self.cached_tokens

    def set(self, result: Result) -> None:
        """The whole generation, from the one response of a non-streamed request."""
        self.text = [result.text]
        self.token_ids = list(result.token_ids)
        self.logprobs = list(result.logprobs or [])
        self.finish_reason = result.finish_reason or None
        self.prompt_tokens = result.num_input_tokens
        self.completion_tokens = result.num_output_tokens
        self.cached_tokens = result.num_cached_tokens


def usage(choices: list[Choice], n: int) -> dict:
    """OpenAI's usage: prompt tokens once per prompt (its n choices share it), every choice's completion tokens;
    of the prompt tokens, those whose K/V came from the prefix cache (counted as the prompt tokens are, from
    each prompt's first choice)."""
    firsts = [c for c in choices if c.index % n == 0]
    prompt = sum(c.prompt_tokens for c in firsts)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(c.cached_tokens for c in firsts)}}


class Runner:
    """Runs Generations on the `llm` model: `collect` for a whole answer, `stream` for chunks as they come."""

    def __init__(self, client: AsyncClient, timeout: float | None = None):
        self.client = client
        self.timeout = timeout

    def metrics_text(self) -> str:
        """The front end's own counter, in Prometheus text format (after Triton's on /metrics)."""
        return ("# HELP pagedllm_openai_llm_responses_total Responses the OpenAI front end read from the llm "
                "model\n# TYPE pagedllm_openai_llm_responses_total counter\n"
                f"pagedllm_openai_llm_responses_total {self.client.responses_read}\n")

    async def _whole(self, gen: Generation) -> Result:
        """One non-streamed request (`stream` false): `llm` sends the whole generation as one response.
        Cancelling this cancels the Triton request."""
        outputs = LOGPROB_OUTPUTS if gen.options.return_logprobs else TEXT_OUTPUTS
        try:
            result = await self.client.generate(**gen.prompt.client_kwargs(), options=gen.options,
                                                timeout=self.timeout, outputs=outputs)
        except (ValueError, OverflowError) as e:  # a value the model's input tensors cannot hold
            raise APIError(400, str(e)) from None
        except PagedLLMError as e:
            raise api_error(e) from None
        return result

    async def _chunks(self, gen: Generation) -> AsyncIterator[Chunk]:
        outputs = LOGPROB_OUTPUTS if gen.options.return_logprobs else TEXT_OUTPUTS
        try:
            stream = self.client.generate_stream(**gen.prompt.client_kwargs(), options=gen.options,
                                                 timeout=self.timeout, outputs=outputs)
        except (ValueError, OverflowError) as e:  # a value the model's input tensors cannot hold
            raise APIError(400, str(e)) from None
        try:
            async for chunk in stream:
                yield chunk
        except PagedLLMError as e:
            raise api_error(e) from None
        finally:
            stream.close()  # cancels the Triton request if it is still running

    async def _one(self, gen: Generation, on_chunk) -> None:
        async for chunk in self._chunks(gen):
            on_chunk(gen.index, chunk)

    async def collect(self, gens: list[Generation], disconnected: Awaitable[None]) -> list[Choice]:
        """Every choice, whole: one non-streamed request per choice, answered by one response. The first error is
        the answer, and the other generations are cancelled; so are they all if the client disconnects first."""
        choices = {g.index: Choice(g.index) for g in gens}
        await until_disconnected(self._run_all(gens, choices), disconnected)
        return [choices[g.index] for g in gens]

    async def _run_all(self, gens: list[Generation], choices: dict[int, Choice]) -> None:
        async def one(gen: Generation) -> None:
            choices[gen.index].set(await self._whole(gen))

        # A task per generation, each cancelled below: a gather() that has failed leaves its other children
        # running, and their requests would go on generating for nobody.
        tasks = [asyncio.ensure_future(one(g)) for g in gens]
        try:
            for task in asyncio.as_completed(tasks):
                await task  # the first error raises; the rest are cancelled below
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # streams closed before we return

    async def open_stream(self, gens: list[Generation], disconnected: Awaitable[None]
                          ) -> AsyncIterator[tuple[int, Chunk]]:
        """stream(gens), once every generation has sent its first chunk: an error before that (a prompt too
        long, the server draining) raises here, to be answered with its HTTP status, as vLLM does, rather than
        inside an event stream that has already said 200. Errors after that come inside the stream."""
        items = self.stream(gens)
        try:
            first = await until_disconnected(_first_of_each(items, {g.index for g in gens}), disconnected)
        except BaseException:
            await items.aclose()
            raise
        return _chained(first, items)

    async def stream(self, gens: list[Generation]) -> AsyncIterator[tuple[int, Chunk]]:
        """(choice index, chunk) in the order they arrive. Leaving the iteration early cancels the rest."""
        if len(gens) == 1:  # the common case needs no task and no queue between the stream and the response
            async for chunk in self._chunks(gens[0]):
                yield gens[0].index, chunk
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def run(gen: Generation) -> None:
            try:
                await self._one(gen, lambda i, c: queue.put_nowait((i, c)))
            except BaseException as e:
                queue.put_nowait((gen.index, e))
                raise
            queue.put_nowait((gen.index, done))

        tasks = [asyncio.ensure_future(run(g)) for g in gens]
        try:
            remaining = len(tasks)
            while remaining:
                index, item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(work: Awaitable[T], disconnected: Awaitable[None]) -> T:
    """`work`'s result. If the client disconnects first, nobody is left to answer: `work` is cancelled (its
    streams closed before this returns) and 499 raised."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected)
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            raise APIError(499, "the client disconnected")
        return task.result()
    finally:
        for t in (task, watcher):
            t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def _first_of_each(items: AsyncIterator[tuple[int, Chunk]], indexes: set[int]) -> list[tuple[int, Chunk]]:
    """Items until every choice index in `indexes` has had one (or the items end); `items` is left open."""
    first, waiting = [], set(indexes)
    async for index, chunk in items:
        first.append((index, chunk))
        waiting.discard(index)
        if not waiting:
            break
    return first


async def _chained(first: list, rest: AsyncIterator) -> AsyncIterator:
    try:
        for item in first:
            yield item
        async for item in rest:
            yield item
    finally:
        await rest.aclose()  # leaving early (the client gone) cancels the generations still running


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def now() -> int:
    return int(time.time())
