"""The asyncio client: `await AsyncClient(url).generate(...)`;
`async for chunk in client.generate_stream(...)`.

gRPC goes through tritonclient.grpc.aio (one bidirectional stream per request; cancelling the call cancels
the request), HTTP through aiohttp (which tritonclient[http] brings). Use one AsyncClient per event loop.
Only the I/O is here: requests are built by ClientBase (client.py), answers read by protocol.py.
"""
from __future__ import annotations

import asyncio
from typing import Any

import grpc
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from .client import ClientBase, StreamBase
from .grpc_transport import infer_inputs
from .options import GenerateOptions
from .protocol import GrpcResponses, SseResponses, WholeResponse, grpc_error, http_error, io_error
from .request import json_body, to_chunk, to_result
from .types import Chunk, Result


def _aiohttp_io_errors() -> tuple:
    """What aiohttp raises when the connection fails, breaks or times out (aiohttp is imported when used)."""
    import aiohttp

    return aiohttp.ClientError, OSError, asyncio.TimeoutError


class AioGrpcCall:
    """One request on its own gRPC stream: `await next()` -> outputs or None when done; close() cancels."""

    def __init__(self, client, model: str, inputs: dict, timeout: float | None, outputs=None):
        request = {"model_name": model, "inputs": infer_inputs(inputs)}
        if outputs is not None:  # the server builds and sends only these
            request["outputs"] = [grpcclient_aio.InferRequestedOutput(name) for name in outputs]

        async def requests():
            yield request

        self._responses = GrpcResponses()
        self._stream = client.stream_infer(requests(), stream_timeout=timeout)

    async def _read(self) -> tuple:
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            return GrpcResponses.END
        except (grpc.RpcError, InferenceServerException) as e:
            raise grpc_error(e) from None

    async def next(self) -> dict[str, Any] | None:
        return await self._responses.apull(self._read)

    def close(self) -> None:
        if not self._responses.done:
            self._responses.done = True
            self._stream.cancel()


class AioHttpCall:
    """One request on /generate or /generate_stream; closing the connection before the end cancels it."""

    def __init__(self, response, stream: bool):
        self._response = response
        self._stream = stream
        self._responses = SseResponses() if stream else WholeResponse()

    @classmethod
    async def open(cls, session, url: str, body: dict, stream: bool, timeout: float | None) -> "AioHttpCall":
        import aiohttp

        try:
            response = await session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout))
        except _aiohttp_io_errors() as e:
            raise io_error(e, f"cannot reach {url}") from None
        if response.status != 200:
            error = http_error(response.status, await response.read())
            response.release()
            raise error
        return cls(response, stream)

    async def _read(self) -> bytes:
        """A line of the event stream, or the whole body."""
        try:
            return await (self._response.content.readline() if self._stream else self._response.read())
        except _aiohttp_io_errors() as e:
            raise io_error(e, "reading the response failed") from None

    async def next(self) -> dict[str, Any] | None:
        return await self._responses.apull(self._read)

    def close(self) -> None:
        if not self._responses.done:
            self._responses.done = True
            self._response.close()  # drops the connection: the server cancels the request
        else:
            self._response.release()


class AsyncChunkStream(StreamBase):
    """Async iterator over a streaming request's Chunks; the request starts at the first `__anext__`.
    Leaving early (break, aclose(), `async with` exit, garbage collection) cancels it on the server."""

    def __init__(self, open_call, with_logprobs: bool, client=None):
        self._open_call = open_call  # coroutine function returning a call
        self._with_logprobs = with_logprobs
        self._client = client  # whose responses_read counts each chunk

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
        if self._client is not None:
            self._client.responses_read += 1
        return to_chunk(out, self._with_logprobs)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "AsyncChunkStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()


class AsyncClient(ClientBase):
    """Like Client, for asyncio: `await generate(...)` -> Result; `generate_stream(...)` -> async iterator."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "llm",
                 embeds_encoding: str | None = None):
        super().__init__(url, protocol, model, embeds_encoding)
        self._grpc = None  # created inside the running loop
        self._session = None
        self.responses_read = 0  # responses read from the server, all requests together

    def _http_session(self):
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession()
        return self._session

    def _grpc_client(self):
        if self._grpc is None:
            self._grpc = grpcclient_aio.InferenceServerClient(self.url.split("://", 1)[-1])
        return self._grpc

    async def _open(self, inputs: dict, stream: bool, timeout: float | None, outputs=None):
        if self.protocol == "grpc":
            return AioGrpcCall(self._grpc_client(), self.model, inputs, timeout, outputs)
        return await AioHttpCall.open(self._http_session(), self._endpoint.url(self.model, stream),
                                      json_body(inputs), stream, timeout)

    async def generate(self, prompt: Any = None, *, text: str | None = None, input_ids: Any = None,
                       prompt_embeds: Any = None, timeout: float | None = None,
                       options: GenerateOptions | None = None, outputs: tuple[str, ...] | None = None,
                       **option_kwargs) -> Result:
        """Client.generate's arguments (without `stream`: see generate_stream); returns the whole Result, which
        the server sends as one response. gRPC only: `outputs` as for generate_stream."""
        inputs, with_logprobs = self._request(prompt, text, input_ids, prompt_embeds, False, options,
                                              option_kwargs)
        call = await self._open(inputs, False, timeout, outputs)
        outputs = []
        try:
            while (out := await call.next()) is not None:
                self.responses_read += 1
                outputs.append(out)
        finally:
            call.close()
        return to_result(outputs, with_logprobs)

    def generate_stream(self, prompt: Any = None, *, text: str | None = None, input_ids: Any = None,
                        prompt_embeds: Any = None, timeout: float | None = None,
                        options: GenerateOptions | None = None, outputs: tuple[str, ...] | None = None,
                        **option_kwargs) -> AsyncChunkStream:
        """Client.generate's arguments; `async for chunk in client.generate_stream(...)`. gRPC only: `outputs`
        names the model outputs to ask for (default all; a chunk's fields of outputs not asked for are empty),
        which spares both sides the rest."""
        # Argument errors raise here, not at the first chunk.
        inputs, with_logprobs = self._request(prompt, text, input_ids, prompt_embeds, True, options,
                                              option_kwargs)
        return AsyncChunkStream(lambda: self._open(inputs, True, timeout, outputs), with_logprobs, self)

    async def is_ready(self, timeout: float = 5.0) -> bool:
        """Whether the server answers and the model is ready (False rather than an error when unreachable)."""
        try:
            if self.protocol == "grpc":
                return bool(await self._grpc_client().is_model_ready(self.model, client_timeout=timeout))
            import aiohttp

            url = self._endpoint.url(self.model, False).rsplit("/", 1)[0] + "/ready"
            async with self._http_session().get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status == 200
        except Exception:  # unreachable, refused, timed out: not ready
            return False

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
