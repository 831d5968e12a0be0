"""The synchronous client: `Client(url, protocol).generate(...)`."""
from __future__ import annotations

from typing import Any

from . import http_transport
from .grpc_transport import GrpcCall, GrpcPool
from .request import build_inputs, json_body, to_chunk, to_result
from .types import Chunk, PagedLLMError, Result

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_EMBEDS_ENCODING = {"grpc": "fp16", "http": "fp32"}  # see request.build_inputs


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return protocol


class ChunkStream:
    """Iterator over a streaming request's Chunks. Leaving it early (break, close(), a `with` block's end,
    or garbage collection) cancels the request on the server."""

    def __init__(self, call):
        self._call = call

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
        return to_chunk(out)

    def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.close()

    def __enter__(self) -> "ChunkStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Client:
    """A client of the `llm` model over gRPC (default, url "host:8001") or HTTP (url "host:8000").

    `embeds_encoding` is how prompt embeddings travel: "fp16" (gRPC's default), "fp32" (HTTP's default) or
    "base64" (see request.build_inputs).

    Thread-safe: requests from several threads run concurrently (bench does this).
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = "llm",
                 embeds_encoding: str | None = None):
        self.protocol = check_protocol(protocol)
        self.url = url or DEFAULT_URLS[protocol]
        self.model = model
        self.embeds_encoding = embeds_encoding or DEFAULT_EMBEDS_ENCODING[protocol]
        if protocol == "grpc":
            self._pool = GrpcPool(self.url.split("://", 1)[-1])
        else:
            self._endpoint = http_transport.HttpEndpoint.parse(self.url)

    def generate(self, prompt: Any = None, *, text: str | None = None, input_ids: Any = None,
                 prompt_embeds: Any = None, max_tokens: int = 16, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 stop_token_ids: Any = None, ignore_eos: bool | None = None, stop: Any = None,
                 stream: bool = False,
                 timeout: float | None = None) -> Result | ChunkStream:
        """Generate from exactly one prompt: `text`, `input_ids` (list or array of ints) or `prompt_embeds`
        (array or torch tensor [seq_len, hidden_size]); `prompt` positionally picks one by its type.
        Sampling options left None take the server's defaults (temperature 1.0; 0 means greedy).
        Returns a Result, or with stream=True a ChunkStream of Chunks. Server errors raise PagedLLMError;
        `timeout` (seconds) bounds the whole request."""
        inputs = build_inputs(prompt, text=text, input_ids=input_ids, prompt_embeds=prompt_embeds,
                              embeds_encoding=self.embeds_encoding, max_tokens=max_tokens,
                              temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                              stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, stop=stop,
                              stream=stream)
        if self.protocol == "http" and not stream:
            out = http_transport.generate(self._endpoint, self.model, json_body(inputs), timeout)
            return to_result([out])
        call = self._open(inputs, timeout)
        if stream:
            return ChunkStream(call)
        try:
            return to_result(read_all(call))
        finally:
            call.close()

    def generate_stream(self, prompt: Any = None, **kwargs) -> ChunkStream:
        """generate(..., stream=True)."""
        return self.generate(prompt, stream=True, **kwargs)

    def _open(self, inputs, timeout):
        if self.protocol == "grpc":
            return GrpcCall(self._pool, self.model, inputs, timeout)
        return http_transport.HttpStreamCall(self._endpoint, self.model, json_body(inputs), timeout)

    def close(self) -> None:
        if self.protocol == "grpc":
            self._pool.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_all(call) -> list[dict]:
    outputs = []
    while (out := call.next()) is not None:
        outputs.append(out)
    if not outputs:
        raise PagedLLMError("the server finished the request without a response")
    return outputs
