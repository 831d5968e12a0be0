"""What the server's answers mean, without any I/O: which outputs a gRPC stream item, a server-sent event or a
JSON body carries, when a request is done, and which PagedLLMError a failure is.

The transports (grpc_transport and http_transport, synchronous; aio, asyncio) only read: each feeds what it
read to a Responses object below and maps its own I/O exceptions with `io_error`.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable

import grpc
from tritonclient.utils import InferenceServerException

from .request import grpc_outputs, json_outputs
from .types import PagedLLMError

Outputs = dict[str, Any]


# ------------------------------------------------------------------------------------------------- errors
def timed_out() -> PagedLLMError:
    return PagedLLMError("timed out waiting for the server", "DEADLINE_EXCEEDED")


def io_error(e: BaseException, what: str) -> PagedLLMError:
    """A transport's I/O failure: a timeout (socket's or asyncio's), else an unreachable or broken connection."""
    if isinstance(e, (TimeoutError, asyncio.TimeoutError)):  # distinct classes before Python 3.11
        return timed_out()
    return PagedLLMError(f"{what}: {e}", "UNAVAILABLE")


def grpc_error(e: InferenceServerException | grpc.RpcError) -> PagedLLMError:
    """tritonclient's error (the server's message, a status like "StatusCode.INVALID_ARGUMENT"), or grpc.aio's
    RpcError (a stream that broke or timed out)."""
    if isinstance(e, InferenceServerException):
        status = e.status()
        if status is not None:
            status = str(status).removeprefix("StatusCode.")
        return PagedLLMError(e.message() or str(e), status)
    return PagedLLMError(e.details() or str(e), e.code().name)


def http_error(status: int, body: bytes) -> PagedLLMError:
    """A non-200 answer. Its body is JSON {"error": ...} or, from /generate_stream, an SSE `data:` line of it."""
    text = body.decode("utf-8", "replace").strip()
    for candidate in [text] + [ln[5:].strip() for ln in text.splitlines() if ln.startswith("data:")]:
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(obj, dict) and "error" in obj:
            return PagedLLMError(str(obj["error"]), status)
    return PagedLLMError(text or "no message", status)


def _json_answer(obj: dict) -> Outputs:
    """A generate-extension JSON object's outputs; an error object (sent after status 200 when a stream fails
    midway) raises."""
    if "error" in obj:
        raise PagedLLMError(str(obj["error"]))
    return json_outputs(obj)


def is_final(result) -> bool:
    """Whether a gRPC response carries Triton's final flag (sent when enable_empty_final_response is set)."""
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


# --------------------------------------------------------------------------------------- response streams
class Responses:
    """One request's answer, read item by item with the transport's `read` (pull, or apull for asyncio):
    returns the outputs of the next item that carries some; `done` once the request has ended (its last
    response, or an error, which raises)."""

    def __init__(self) -> None:
        self.done = False

    def _decode(self, item: Any) -> tuple[Outputs | None, bool]:
        """(the item's outputs or None, whether the request has ended)."""
        raise NotImplementedError

    def _take(self, item: Any) -> Outputs | None:
        self.done = True  # an error raises, and the request has ended with it: nothing to cancel
        out, self.done = self._decode(item)
        return out

    def pull(self, read: Callable[[], Any]) -> Outputs | None:
        """The next outputs, reading items with `read()` until one carries some; None once the request is done."""
        while not self.done:
            if (out := self._take(read())) is not None:
                return out
        return None

    async def apull(self, read: Callable[[], Awaitable[Any]]) -> Outputs | None:
        """pull() for an async `read`."""
        while not self.done:
            if (out := self._take(await read())) is not None:
                return out
        return None


class GrpcResponses(Responses):
    """Items of a gRPC stream: (InferResult, None), (None, error), or END when the stream ended."""

    END = (None, None)

    def _decode(self, item):
        result, error = item
        if error is not None:
            raise grpc_error(error)
        if result is None:
            return None, True
        out = grpc_outputs(result) if result.get_response().outputs else None
        # The last response has a finish_reason; an empty final response (if asked for) has only the flag.
        return out, is_final(result) or bool(out and out["finish_reason"])


class SseResponses(Responses):
    """Raw lines of /generate_stream's server-sent events (`data: {...}` lines; b"" at the stream's end)."""

    def __init__(self) -> None:
        super().__init__()
        self._data: list[str] = []  # the `data:` lines of the event being read

    def _event_complete(self, line: bytes) -> bool:
        """Adds a `data:` line; True once the event is complete (a blank line after data), or at the stream's
        end (b""), where a last event may lack its blank line and there may be no event."""
        if not line:
            return True
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            self._data.append(line[5:].strip().decode("utf-8"))
            return False
        return not line and bool(self._data)

    def _decode(self, line: bytes):
        if not self._event_complete(line):
            return None, False
        data, self._data = self._data, []
        if not data:
            return None, True
        out = _json_answer(json.loads("\n".join(data)))
        return out, bool(out["finish_reason"])


class WholeResponse(Responses):
    """The body of a /generate answer: one JSON object, the whole request."""

    def _decode(self, body: bytes):
        return _json_answer(json.loads(body)), True
