"""Small tritonclient helpers for the end-to-end tests: one gRPC stream per request, HTTP generate, metrics."""
from __future__ import annotations

import json
import queue
import re
import time
from dataclasses import dataclass, field

import numpy as np
import requests
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype


@dataclass
class Streamed:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    num_responses: int = 0
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)


def infer_inputs(values: dict) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in values.items():
        arr = np.asarray(value)
        if arr.dtype.kind in "US":
            arr = np.array([s.encode() if isinstance(s, str) else s for s in arr.reshape(-1)],
                           dtype=np.object_).reshape(arr.shape)
        dtype = "BYTES" if arr.dtype == np.object_ else np_to_triton_dtype(arr.dtype)
        inp = grpcclient.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


class GrpcStream:
    """A gRPC stream carrying several requests; results collected per request id.

    Triton's stream errors carry no request id, so an error is pinned on the request when only one is pending
    (tests that expect errors send one request per stream) and kept in `errors` as well.
    """

    def __init__(self, url: str, model: str = "llm"):
        self.model = model
        self.client = grpcclient.InferenceServerClient(url)
        self.results: dict[str, Streamed] = {}
        self.pending: set[str] = set()
        self.errors: list[str] = []
        self.done: queue.Queue = queue.Queue()
        self.client.start_stream(callback=self._on_response)

    def _finish(self, rid: str) -> None:
        self.pending.discard(rid)
        self.done.put(rid)

    def _on_response(self, result, error):
        if error is not None:
            self.errors.append(str(error))
            if len(self.pending) == 1:
                rid = next(iter(self.pending))
                self.results[rid].error = str(error)
                self._finish(rid)
            return
        response = result.get_response()
        res = self.results[response.id]
        res.num_responses += 1
        if result.as_numpy("token_ids") is not None:
            res.token_ids += result.as_numpy("token_ids").tolist()
        if result.as_numpy("logprobs") is not None:
            res.logprobs += result.as_numpy("logprobs").tolist()
        if result.as_numpy("text_output") is not None:
            res.texts += [t.decode() for t in result.as_numpy("text_output").reshape(-1)]
        if result.as_numpy("finish_reason") is not None:
            res.finish_reason = result.as_numpy("finish_reason").reshape(-1)[0].decode() or None
        if response.parameters["triton_final_response"].bool_param:
            self._finish(response.id)

    def send(self, request_id: str, values: dict, parameters: dict | None = None) -> None:
        self.results[request_id] = Streamed()
        self.pending.add(request_id)
        self.client.async_stream_infer(self.model, infer_inputs(values), request_id=request_id,
                                       parameters=parameters, enable_empty_final_response=True)

    def wait(self, n: int = 1, timeout: float = 120.0) -> None:
        for _ in range(n):
            self.done.get(timeout=timeout)

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def stream_one(url: str, values: dict, parameters: dict | None = None, timeout: float = 120.0,
               model: str = "llm") -> Streamed:
    """Send one request on its own stream and wait for its final response (or error)."""
    s = GrpcStream(url, model)
    try:
        s.send("r", values, parameters)
        s.wait(1, timeout)
        return s.results["r"]
    finally:
        s.close()


def http_generate(http_url: str, body: dict, stream: bool = False, timeout: float = 120.0, model: str = "llm"):
    """POST to /generate (one JSON object) or /generate_stream (a list of the SSE events' JSON)."""
    url = f"{http_url}/v2/models/{model}/generate" + ("_stream" if stream else "")
    r = requests.post(url, json=body, stream=stream, timeout=timeout)
    if not stream:
        return r.status_code, r.json()
    events = [json.loads(line[len(b"data:"):]) for line in r.iter_lines() if line.startswith(b"data:")]
    return r.status_code, events


def metric(metrics_url: str, name: str) -> float:
    text = requests.get(metrics_url, timeout=10).text
    m = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    assert m, f"metric {name} not found in /metrics"
    return float(m.group(1))


def wait_for_metric(metrics_url: str, name: str, want: float, timeout: float = 10.0) -> float:
    deadline = time.monotonic() + timeout
    value = metric(metrics_url, name)
    while value != want and time.monotonic() < deadline:
        time.sleep(0.1)
        value = metric(metrics_url, name)
    return value
