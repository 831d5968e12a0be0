"""The synchronous client, `Client(url, protocol).generate(...)`, and what it shares with AsyncClient
(ClientBase: settings, and one request built from a prompt and GenerateOptions)."""
from __future__ import annotations

from typing import Any

from .grpc_transport import GrpcCall, GrpcPool
from .http_transport import HttpCall, HttpEndpoint
from .options import GenerateOptions
from .request import build_inputs, json_body, to_chunk, to_result
from .types import Chunk, Result

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_EMBEDS_ENCODING = {"grpc": "fp16", "http": "fp32"}  # see request.build_inputs


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return protocol


class ClientBase:
    """Client's and AsyncClient's settings, and their requests."""

    def __init__(self, url: str | None, protocol: str, model: str, embeds_encoding: str | None):
        self.protocol = check_protocol(protocol)
        self.url = url or DEFAULT_URLS[protocol]
        self.model = model
        self.embeds_encoding = embeds_encoding or DEFAULT_EMBEDS_ENCODING[protocol]
        if protocol == "http":
            self._endpoint = HttpEndpoint.parse(self.url)

    def _request(self, prompt: Any, text: Any, input_ids: Any, prompt_embeds: Any, stream: bool,
                 options: GenerateOptions | None, option_kwargs: dict[str, Any]) -> tuple[dict, bool]:
        """(the input tensors, whether the answers carry logprobs). Bad arguments raise here, before sending."""
        options = GenerateOptions.merge(options, option_kwargs)
        inputs = build_inputs(prompt, text=text, input_ids=input_ids, prompt_embeds=prompt_embeds,
                              embeds_encoding=self.embeds_encoding, stream=stream, options=options)
        return inputs, bool(options.return_logprobs)


class StreamBase:
    """What a stream of either kind does with its call: close it once (which cancels the request on the
    server if it is still running), also when the stream is garbage-collected."""

    _call = None
    _closed = False

    def close(self) -> None:
        self._closed = True
        call, self._call = self._call, None
        if call is not None:
            call.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class ChunkStream(StreamBase):
    """Iterator over a streaming request's Chunks. Leaving it early (break, close(), a `with` block's end,
    or garbage collection) cancels the request on the server."""

    def __init__(self, call, with_logprobs: bool):
        self._call = call
        self._with_logprobs = with_logprobs

    def __iter__(self) -> "ChunkStream":
        return self

    def __next__(self) -> Chunk:
        if self._call is None:
            raise StopIteration
        try:
            out = self._call.next()
        except BaseException:
            self.close()
            raise
        if out is None:
            self.close()
            raise StopIteration
        return to_chunk(out, self._with_logprobs)

    def __enter__(self) -> "ChunkStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Client(ClientBase):
    """A client of the `llm` model over gRPC (default, url "host:8001") or HTTP (url "host:8000").

    `embeds_encoding` is how prompt embeddings travel: "fp16" (gRPC's default), "fp32" (HTTP's default) or
    "base64" (see request.build_inputs).

    Thread-safe: requests from several threads run concurrently (bench does this).
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "llm",
                 embeds_encoding: str | None = None):
        super().__init__(url, protocol, model, embeds_encoding)
        if protocol == "grpc":
            self._pool = GrpcPool(self.url.split("://", 1)[-1])

    def generate(self, prompt: Any = None, *, text: str | None = None, input_ids: Any = None,
                 prompt_embeds: Any = None, stream: bool = False, timeout: float | None = None,
                 options: GenerateOptions | None = None, **option_kwargs) -> Result | ChunkStream:
        """Generate from exactly one prompt: `text`, `input_ids` (list or array of ints) or `prompt_embeds`
        (array or torch tensor [seq_len, hidden_size]); `prompt` positionally picks one by its type.
        How to generate: `options` and/or GenerateOptions' fields as keywords (max_tokens=32, temperature=0,
        stop=["\\n"], return_logprobs=True, ...); an unknown keyword raises TypeError. Options left None take
        the server's defaults. Returns a Result, or with stream=True a ChunkStream of Chunks. Server errors
        raise PagedLLMError; `timeout` (seconds) bounds the whole request."""
        inputs, with_logprobs = self._request(prompt, text, input_ids, prompt_embeds, stream, options,
                                              option_kwargs)
        call = self._open(inputs, stream, timeout)
        if stream:
            return ChunkStream(call, with_logprobs)
        try:
            return to_result(read_all(call), with_logprobs)
        finally:
            call.close()

    def generate_stream(self, prompt: Any = None, **kwargs) -> ChunkStream:
        """generate(..., stream=True)."""
        return self.generate(prompt, stream=True, **kwargs)

    def _open(self, inputs: dict, stream: bool, timeout: float | None):
        if self.protocol == "grpc":
            return GrpcCall(self._pool, self.model, inputs, timeout)
        return HttpCall(self._endpoint, self.model, json_body(inputs), stream, timeout)

    def close(self) -> None:
        if self.protocol == "grpc":
            self._pool.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_all(call) -> list[dict]:
    """Every response's outputs, until the request is done."""
    outputs = []
    while (out := call.next()) is not None:
        outputs.append(out)
    return outputs
