"""The asyncio client: `await AsyncClient(url).generate(...)`;
`async for chunk in client.generate_stream(...)`.

gRPC goes through tritonclient.grpc.aio (one bidirectional stream per request; cancelling the call cancels
the request), HTTP through aiohttp (which tritonclient[http] brings). Use one AsyncClient per event loop.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from .client import DEFAULT_EMBEDS_ENCODING, DEFAULT_URLS, check_protocol
from .grpc_transport import error_from, infer_inputs, is_final
from .http_transport import HttpEndpoint, error_message, sse_line
from .request import build_inputs, grpc_outputs, json_body, json_outputs, sse_output, to_chunk, to_result
from .types import Chunk, PagedLLMError, Result


class AioGrpcCall:
    """One request on its own gRPC stream: `await next()` -> outputs or None when done; close() cancels."""

    def __init__(self, client, model: str, inputs: dict, timeout: float | None):
        async def requests():
            yield {"model_name": model, "inputs": infer_inputs(inputs)}

        self._done = False
        self._responses = client.stream_infer(requests(), stream_timeout=timeout)

    async def next(self) -> dict[str, Any] | None:
        while not self._done:
            try:
                result, error = await self._responses.__anext__()
            except StopAsyncIteration:
                self._done = True
                return None
            except grpc.RpcError as e:
                self._done = True
                raise PagedLLMError(e.details() or str(e), e.code().name) from None
            except InferenceServerException as e:
                self._done = True
                raise error_from(e) from None
            if error is not None:
                self._done = True
                raise error_from(error)
            out = grpc_outputs(result) if result.get_response().outputs else None
            self._done = is_final(result) or bool(out and out["finish_reason"])
            if out is not None:
                return out
        return None

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._responses.cancel()


class AioHttpCall:
    """One request on /generate_stream; closing the connection before the end cancels it."""

    def __init__(self, response):
        self._response = response
        self._done = False

    @classmethod
    async def open(cls, session, url: str, body: dict, timeout: float | None) -> "AioHttpCall":
        return cls(await _post(session, url, body, timeout))

    async def _event(self) -> dict | None:
        data: list[str] = []
        while True:
            line = await self._response.content.readline()
            if sse_line(line, data):
                return json.loads("\n".join(data)) if data else None

    async def next(self) -> dict[str, Any] | None:
        if self._done:
            return None
        try:
            obj = await self._event()
        except BaseException as e:
            self.close()
            raise _http_error(e) from None
        self._done = True  # until the event says otherwise (an error event raises)
        out, self._done = sse_output(obj)
        return out

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._response.close()  # drops the connection: the server cancels the request
        else:
            self._response.release()


def _http_error(e: BaseException) -> BaseException:
    import aiohttp

    if isinstance(e, asyncio.TimeoutError):
        return PagedLLMError("timed out waiting for the server", "DEADLINE_EXCEEDED")
    if isinstance(e, (aiohttp.ClientError, OSError)):
        return PagedLLMError(f"HTTP request failed: {e}", "UNAVAILABLE")
    return e


async def _post(session, url: str, body: dict, timeout: float | None):
    import aiohttp

    try:
        response = await session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout))
    except BaseException as e:
        raise _http_error(e) from None
    if response.status != 200:
        message = error_message(await response.read())
        response.release()
        raise PagedLLMError(message, response.status)
    return response


class AsyncChunkStream:
    """Async iterator over a streaming request's Chunks; the request starts at the first `__anext__`.
    Leaving early (break, aclose(), `async with` exit, garbage collection) cancels it on the server."""

    def __init__(self, open_call):
        self._open_call = open_call  # coroutine function returning a call
        self._call = None
        self._closed = False

    def __aiter__(self) -> "AsyncChunkStream":
        return self

    async def __anext__(self) -> Chunk:
        if self._closed:
            raise StopAsyncIteration
        try:
            if self._call is None:
                self._call = await self._open_call()
            out = await self._call.next()
        except BaseException:
            self.close()
            raise
        if out is None:
            self.close()
            raise StopAsyncIteration
        return to_chunk(out)

    def close(self) -> None:
        self._closed = True
        call, self._call = self._call, None
        if call is not None:
            call.close()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "AsyncChunkStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class AsyncClient:
    """Like Client, for asyncio: `await generate(...)` -> Result; `generate_stream(...)` -> async iterator."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "llm",
                 embeds_encoding: str | None = None):
        self.protocol = check_protocol(protocol)
        self.url = url or DEFAULT_URLS[protocol]
        self.model = model
        self.embeds_encoding = embeds_encoding or DEFAULT_EMBEDS_ENCODING[protocol]
        self._grpc = None  # created inside the running loop
        self._session = None
        if protocol == "http":
            self._endpoint = HttpEndpoint.parse(self.url)

    def _inputs(self, prompt, stream: bool, kwargs: dict) -> dict:
        return build_inputs(prompt, embeds_encoding=self.embeds_encoding, stream=stream, **kwargs)

    def _http_url(self, stream: bool) -> str:
        e = self._endpoint
        return f"{e.scheme}://{e.host}:{e.port}{e.path(self.model, stream)}"

    def _http_session(self):
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession()
        return self._session

    def _grpc_client(self):
        if self._grpc is None:
            self._grpc = grpcclient_aio.InferenceServerClient(self.url.split("://", 1)[-1])
        return self._grpc

    async def _open(self, inputs: dict, timeout: float | None):
        if self.protocol == "grpc":
            return AioGrpcCall(self._grpc_client(), self.model, inputs, timeout)
        return await AioHttpCall.open(self._http_session(), self._http_url(True), json_body(inputs), timeout)

    async def generate(self, prompt: Any = None, *, text: str | None = None, input_ids: Any = None,
                       prompt_embeds: Any = None, max_tokens: int = 16, temperature: float | None = None,
                       top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                       stop_token_ids: Any = None, ignore_eos: bool | None = None, stop: Any = None,
                       timeout: float | None = None) -> Result:
        """Client.generate's arguments (without `stream`: see generate_stream); returns the whole Result."""
        inputs = self._inputs(prompt, False, dict(
            text=text, input_ids=input_ids, prompt_embeds=prompt_embeds, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos, stop=stop))
        if self.protocol == "http":
            response = await _post(self._http_session(), self._http_url(False), json_body(inputs), timeout)
            try:
                obj = await response.json(content_type=None)
            finally:
                response.release()
            if "error" in obj:
                raise PagedLLMError(str(obj["error"]))
            return to_result([json_outputs(obj)])
        call = await self._open(inputs, timeout)
        outputs = []
        try:
            while (out := await call.next()) is not None:
                outputs.append(out)
        finally:
            call.close()
        if not outputs:
            raise PagedLLMError("the server finished the request without a response")
        return to_result(outputs)

    def generate_stream(self, prompt: Any = None, *, text: str | None = None, input_ids: Any = None,
                        prompt_embeds: Any = None, max_tokens: int = 16, temperature: float | None = None,
                        top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                        stop_token_ids: Any = None, ignore_eos: bool | None = None, stop: Any = None,
                        timeout: float | None = None) -> AsyncChunkStream:
        """Client.generate's arguments; `async for chunk in client.generate_stream(...)`."""
        inputs = self._inputs(prompt, True, dict(  # argument errors raise here, not at the first chunk
            text=text, input_ids=input_ids, prompt_embeds=prompt_embeds, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos, stop=stop))
        return AsyncChunkStream(lambda: self._open(inputs, timeout))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._grpc is not None:
            await self._grpc.close()
            self._grpc = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
