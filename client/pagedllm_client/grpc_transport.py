"""Synchronous gRPC transport: one bidirectional stream per request, so that stopping the stream cancels
exactly that request. A tritonclient client holds one stream at a time, so clients are pooled (one per
request in flight). What the responses mean is protocol.py's."""
from __future__ import annotations

import queue
import threading
import time
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from .protocol import GrpcResponses, grpc_error, timed_out
from .types import PagedLLMError


def infer_inputs(inputs: dict[str, np.ndarray]) -> list:
    tensors = []
    for name, arr in inputs.items():
        t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        tensors.append(t)
    return tensors


class GrpcPool:
    """Idle tritonclient gRPC clients for one server; each request takes one and gives it back."""

    def __init__(self, url: str):
        self.url = url
        self._idle: list = []
        self._all: list = []
        self._lock = threading.Lock()
        self._closed = False

    def acquire(self):
        with self._lock:
            if self._closed:
                raise PagedLLMError("the client is closed")
            if self._idle:
                return self._idle.pop()
        try:
            client = grpcclient.InferenceServerClient(self.url)
        except InferenceServerException as e:
            raise grpc_error(e) from None
        with self._lock:
            self._all.append(client)
        return client

    def release(self, client) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(client)
                return
        client.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients, self._all, self._idle = self._all, [], []
        for c in clients:
            try:
                c.close()
            except Exception:
                pass


class GrpcCall:
    """One request in flight. `next()` returns the next response's outputs, or None once the request is done;
    `close()` stops the stream and cancels the request on the server if it is still running."""

    def __init__(self, pool: GrpcPool, model: str, inputs: dict[str, np.ndarray], timeout: float | None):
        self._pool = pool
        self._responses = GrpcResponses()
        self._items: queue.Queue = queue.Queue()
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._client = pool.acquire()
        try:
            self._client.start_stream(callback=self._on_response, stream_timeout=timeout)
            self._client.async_stream_infer(model, infer_inputs(inputs), enable_empty_final_response=True)
        except InferenceServerException as e:
            self._responses.done = True  # the stream is broken: nothing to cancel
            self.close()
            raise self._stream_error() or grpc_error(e) from None
        except BaseException:
            self._responses.done = True
            self.close()
            raise

    def _on_response(self, result, error) -> None:  # tritonclient's stream thread
        self._items.put((result, error))

    def _stream_error(self) -> PagedLLMError | None:
        """The error the stream reported through the callback (e.g. UNAVAILABLE when the server is down):
        when the stream breaks before the request is sent, async_stream_infer only says it is broken."""
        try:
            _, error = self._items.get(timeout=1.0)
        except queue.Empty:
            return None
        return None if error is None else grpc_error(error)

    def _read(self) -> tuple:
        remaining = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        try:
            return self._items.get(timeout=remaining)
        except queue.Empty:
            raise timed_out() from None

    def next(self) -> dict[str, Any] | None:
        return self._responses.pull(self._read)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            client.stop_stream(cancel_requests=not self._responses.done)
        finally:
            self._pool.release(client)
