"""Synchronous HTTP transport over Triton's generate extension, with the standard library only.

POST /v2/models/{model}/generate answers one JSON object; /generate_stream answers server-sent events
(`data: {...}` lines, an error as `data: {"error": "..."}`). Closing the streaming connection early makes the
server cancel the request.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .request import json_outputs, sse_output
from .types import PagedLLMError


def sse_line(line: bytes, data: list[str]) -> bool:
    """Feeds one raw line of a server-sent-events stream: a `data:` line is added to `data`; True when the
    event is complete (a blank line after data, or the stream's end: b"", where a last event may lack its
    blank line, and `data` may be empty)."""
    if not line:
        return True
    line = line.rstrip(b"\r\n")
    if line.startswith(b"data:"):
        data.append(line[5:].strip().decode("utf-8"))
        return False
    return not line and bool(data)


@dataclass
class HttpEndpoint:
    scheme: str
    host: str
    port: int
    prefix: str  # a path in front of /v2 (behind a proxy), usually ""

    @classmethod
    def parse(cls, url: str) -> "HttpEndpoint":
        """Accepts "host:port", "http://host:port" and "https://host[:port]/prefix"."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an HTTP url: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    def connect(self, timeout: float | None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def path(self, model: str, stream: bool) -> str:
        return f"{self.prefix}/v2/models/{model}/{'generate_stream' if stream else 'generate'}"


def error_message(body: bytes) -> str:
    """The server's message from an error body: JSON {"error": ...} or an SSE `data: {"error": ...}` line."""
    text = body.decode("utf-8", "replace").strip()
    for candidate in [text] + [ln[5:].strip() for ln in text.splitlines() if ln.startswith("data:")]:
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(obj, dict) and "error" in obj:
            return str(obj["error"])
    return text or "no message"


def _post(endpoint: HttpEndpoint, model: str, body: dict, stream: bool, timeout: float | None):
    conn = endpoint.connect(timeout)
    try:
        conn.request("POST", endpoint.path(model, stream), body=json.dumps(body).encode("utf-8"),
                     headers={"Content-Type": "application/json",
                              "Accept": "text/event-stream" if stream else "application/json"})
        response = conn.getresponse()
    except (OSError, http.client.HTTPException) as e:
        conn.close()
        raise PagedLLMError(f"cannot reach {endpoint.host}:{endpoint.port}: {e}", "UNAVAILABLE") from None
    if response.status != 200:
        message = error_message(response.read())
        conn.close()
        raise PagedLLMError(message, response.status)
    return conn, response


def generate(endpoint: HttpEndpoint, model: str, body: dict, timeout: float | None) -> dict[str, Any]:
    """One non-streaming request; returns its outputs."""
    conn, response = _post(endpoint, model, body, False, timeout)
    try:
        raw = response.read()
    except (OSError, http.client.HTTPException) as e:
        raise PagedLLMError(f"reading the response failed: {e}", "UNAVAILABLE") from None
    finally:
        conn.close()
    obj = json.loads(raw)
    if "error" in obj:
        raise PagedLLMError(str(obj["error"]))
    return json_outputs(obj)


class HttpStreamCall:
    """One streaming request (same contract as GrpcCall): next() -> outputs or None; close() cancels."""

    def __init__(self, endpoint: HttpEndpoint, model: str, body: dict, timeout: float | None):
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._done = False
        self._conn, self._response = _post(endpoint, model, body, True, timeout)

    def _event(self) -> dict | None:
        """The next SSE event's data as JSON, or None at the end of the stream."""
        data: list[str] = []
        while True:
            if self._deadline is not None and time.monotonic() > self._deadline:
                raise socket.timeout("deadline passed")
            line = self._response.readline()
            if sse_line(line, data):
                return json.loads("\n".join(data)) if data else None

    def next(self) -> dict[str, Any] | None:
        if self._done:
            return None
        try:
            obj = self._event()
        except (OSError, http.client.HTTPException) as e:
            self._done = True
            self.close()
            if isinstance(e, (socket.timeout, TimeoutError)):
                raise PagedLLMError("timed out waiting for the server", "DEADLINE_EXCEEDED") from None
            raise PagedLLMError(f"the stream broke: {e}", "UNAVAILABLE") from None
        self._done = True  # until the event says otherwise (an error event raises)
        out, self._done = sse_output(obj)
        return out

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not self._done and conn.sock is not None:
            try:  # shut the socket down now (not when the last reference goes): the server cancels
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._response.close()
        conn.close()
