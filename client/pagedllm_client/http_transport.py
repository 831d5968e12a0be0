"""Synchronous HTTP transport over Triton's generate extension, with the standard library only.

POST /v2/models/{model}/generate answers one JSON object; /generate_stream answers server-sent events.
Closing the streaming connection early makes the server cancel the request. What the answers mean is
protocol.py's.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .protocol import SseResponses, WholeResponse, http_error, io_error, timed_out

# What http.client raises when the connection fails, breaks or times out.
IO_ERRORS = (OSError, http.client.HTTPException)


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

    def url(self, model: str, stream: bool) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path(model, stream)}"


class HttpCall:
    """One request on /generate (stream=False: one answer) or /generate_stream, with GrpcCall's contract:
    next() -> the next response's outputs or None once done; close() cancels an unfinished request."""

    def __init__(self, endpoint: HttpEndpoint, model: str, body: dict, stream: bool, timeout: float | None):
        self._stream = stream
        self._responses = SseResponses() if stream else WholeResponse()
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._conn = endpoint.connect(timeout)
        try:
            self._conn.request("POST", endpoint.path(model, stream), body=json.dumps(body).encode("utf-8"),
                               headers={"Content-Type": "application/json",
                                        "Accept": "text/event-stream" if stream else "application/json"})
            self._response = self._conn.getresponse()
        except IO_ERRORS as e:
            self._conn.close()
            raise io_error(e, f"cannot reach {endpoint.host}:{endpoint.port}") from None
        if self._response.status != 200:
            error = http_error(self._response.status, self._response.read())
            self._conn.close()
            raise error

    def _read(self) -> bytes:
        """A line of the event stream, or the whole body."""
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise timed_out()
        try:
            return self._response.readline() if self._stream else self._response.read()
        except IO_ERRORS as e:
            raise io_error(e, "reading the response failed") from None

    def next(self) -> dict[str, Any] | None:
        return self._responses.pull(self._read)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if not self._responses.done and conn.sock is not None:
            try:  # shut the socket down now (not when the last reference goes): the server cancels
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._response.close()
        conn.close()
