"""Failure paths of the `llm` model's threads (execute, engine, sender) that a real server cannot be made to
hit on demand: an IPC call that raises, a cancel that lands between two lines, a metric call that fails.

These are unit tests: the model runs in-process against a stand-in for `triton_python_backend_utils` that
records what is sent, so exact interleavings can be forced. The behaviour a client sees is tested against a
real tritonserver in test_server.py, test_server_mixed_load.py and the others. What is checked here: each
request gets exactly one final response, errors and cancellations included, and no failure of one request or
one IPC call stops the threads that serve the others."""
from __future__ import annotations

import importlib
import json
import sys
import threading
import time
import types

import numpy as np
import pytest

FINAL = 1


class FakeTritonError:
    INVALID_ARG, INTERNAL, CANCELLED, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "CANCELLED", "UNAVAILABLE"

    def __init__(self, message, code=INTERNAL):
        self.message, self.code = message, code


class FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name: t.value for t in output_tensors or []}
        self.error = error


class FakeTensor:
    def __init__(self, name, value):
        self.name, self.value = name, value

    def as_numpy(self):
        return self.value


class FakeMetric:
    def __init__(self, family):
        self.family = family

    def set(self, v):
        self.family.hook("set", v)

    def increment(self, v):
        self.family.hook("increment", v)

    def observe(self, v):
        self.family.hook("observe", v)


class FakeMetricFamily:
    GAUGE, COUNTER, HISTOGRAM = "gauge", "counter", "histogram"
    hooks: dict = {}  # metric name -> callable(op, value), to make a metric call slow or failing

    def __init__(self, name, description, kind):
        self.name = name

    def hook(self, op, value):
        f = FakeMetricFamily.hooks.get(self.name)
        if f is not None:
            f(op, value)

    def Metric(self, labels, buckets=None):  # noqa: N802 (pb_utils' name)
        return FakeMetric(self)


def _fake_pb_utils() -> types.ModuleType:
    m = types.ModuleType("triton_python_backend_utils")
    m.TritonError, m.InferenceResponse, m.Tensor, m.MetricFamily = (FakeTritonError, FakeResponse, FakeTensor,
                                                                     FakeMetricFamily)
    m.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    m.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    m.Logger = types.SimpleNamespace(log_info=print, log_warn=print, log_error=print, log_verbose=lambda msg: None)
    return m


class FakeSender:
    """Records what was sent; raises like the real ResponseSender once closed by a FINAL. `fail` decides,
    per (response, flags), whether the parent reports a send error."""

    def __init__(self, cancelled=False, fail=None):
        self.responses: list[tuple[FakeResponse, int]] = []
        self.closed = False
        self.cancelled = cancelled
        self.fail = fail
        self.done = threading.Event()

    def send(self, response=None, flags=0):
        if self.closed:
            raise RuntimeError("Unable to send response. Response sender has been closed.")
        if flags == FINAL:
            self.closed = True
            self.done.set()
        self.responses.append((response, flags))
        if self.fail is not None and self.fail(response, flags):
            raise RuntimeError("An error occurred while sending a response.")

    def is_cancelled(self):
        return self.cancelled

    @property
    def finals(self) -> int:
        return sum(1 for _, f in self.responses if f == FINAL)

    @property
    def error(self):
        last = self.responses[-1][0] if self.responses else None
        return None if last is None else last.error

    def token_ids(self) -> list[int]:
        return [int(t) for r, _ in self.responses if r is not None and r.error is None
                for t in r.outputs.get("token_ids", [])]


class FakeRequest:
    _n = 0

    def __init__(self, inputs: dict, sender: FakeSender, parameters: dict | None = None):
        FakeRequest._n += 1
        self.inputs = {k: FakeTensor(k, np.asarray(v) if not isinstance(v, np.ndarray) else v)
                       for k, v in inputs.items()}
        self.sender = sender
        self._params = json.dumps(parameters or {})
        self._id = f"req{FakeRequest._n}"

    def get_response_sender(self):
        return self.sender

    def request_id(self):
        return self._id

    def parameters(self):
        return self._params

    def requested_output_names(self):
        return []


# The serving modules that import triton_python_backend_utils: imported afresh against the fake.
SERVING_MODULES = ("triton_model", "responder", "metrics", "triton_logging")


@pytest.fixture(scope="module")
def triton_model():
    """The triton_model module imported against the fake pb_utils (and forgotten afterwards)."""
    names = ["triton_python_backend_utils"] + [f"pagedllm.serving.{m}" for m in SERVING_MODULES]
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules["triton_python_backend_utils"] = _fake_pb_utils()
    for name in names[1:]:
        sys.modules.pop(name, None)
    try:
        yield importlib.import_module("pagedllm.serving.triton_model")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.fixture
def model(triton_model, tiny_llama_dir):
    FakeMetricFamily.hooks = {}
    m = triton_model.TritonPythonModel()
    config = {"parameters": {"model_dir": {"string_value": str(tiny_llama_dir)},
                             "num_kv_blocks": {"string_value": "64"}}}
    m.initialize({"model_config": json.dumps(config), "model_repository": "/", "model_name": "llm",
                  "model_version": "1"})
    yield m
    FakeMetricFamily.hooks = {}
    m.finalize()


def ids(n=5, max_tokens=4, **extra):
    return {"input_ids": np.arange(5, 5 + n, dtype=np.int64), "max_tokens": np.array([max_tokens], np.int32),
            "temperature": np.array([0.0], np.float32), **extra}


def wait_final(*senders: FakeSender, timeout: float = 30.0) -> None:
    for s in senders:
        assert s.done.wait(timeout), "no final response"
    time.sleep(0.2)  # anything sent after the final would show up now


def blocks_all_free(m, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m.engine.num_free_blocks == m.engine.block_manager.num_blocks and not m.responder.states:
            return True
        time.sleep(0.02)
    return False


# ---- baseline: the protocol as it is meant to work -----------------------------------------------------------

def test_stream_and_whole_each_end_with_one_final(model):
    streamed, whole = FakeSender(), FakeSender()
    model.execute([FakeRequest(ids(stream=np.array([True])), streamed), FakeRequest(ids(), whole)])
    wait_final(streamed, whole)
    assert streamed.finals == whole.finals == 1 and streamed.error is None and whole.error is None
    assert len(streamed.responses) == 4 and len(whole.responses) == 1
    assert streamed.token_ids() == whole.token_ids() and len(whole.token_ids()) == 4
    assert blocks_all_free(model)


def test_bad_request_gets_one_invalid_arg_final(model):
    s = FakeSender()
    model.execute([FakeRequest({"input_ids": np.array([10**6], np.int64)}, s)])
    wait_final(s)  # requests are parsed on the intake threads, after execute returned
    assert s.finals == 1 and s.error.code == "INVALID_ARG"


def test_cancelled_while_running_ends_with_cancelled(model):
    s = FakeSender()
    model.execute([FakeRequest(ids(max_tokens=500, ignore_eos=np.array([True]), stream=np.array([True])), s)])
    while not s.responses:
        time.sleep(0.01)
    s.cancelled = True
    wait_final(s)
    assert s.finals == 1 and s.error.code == "CANCELLED"
    assert blocks_all_free(model)


# ---- defects found in review -----------------------------------------------------------------------------------

def test_a_request_cancelled_before_it_reaches_the_engine_is_still_aborted(model):
    """The sender thread sees a request once registered; if it polled is_cancelled before execute had handed the
    sequence to the engine thread, the abort overtook the add and the request ran to max_tokens."""
    real_submit = model.engine_thread.submit

    def late_submit(seq):  # execute descheduled between registering the request and submitting it
        time.sleep(0.3)
        real_submit(seq)

    model.engine_thread.submit = late_submit
    s = FakeSender(cancelled=True)
    model.execute([FakeRequest(ids(max_tokens=500, ignore_eos=np.array([True])), s)])
    wait_final(s)
    assert s.finals == 1 and s.error is not None and s.error.code == "CANCELLED"
    assert blocks_all_free(model)


def test_a_failed_non_final_send_still_ends_the_request_with_a_final(model):
    """A send the parent refuses (an output it could not build, a broken stream) used to drop the request
    without any final response: the client, or Triton's HTTP stream, waited forever."""
    fails = iter([True])
    s = FakeSender(fail=lambda r, f: f == 0 and next(fails, False))
    model.execute([FakeRequest(ids(max_tokens=500, ignore_eos=np.array([True]), stream=np.array([True])), s)])
    wait_final(s)
    assert s.finals == 1 and s.error is not None and s.error.code == "INTERNAL"
    assert len(s.token_ids()) < 500
    assert blocks_all_free(model)


def test_a_send_that_raises_on_the_error_path_does_not_stop_the_sender_thread(model):
    """The CANCELLED / INTERNAL error sends were unguarded: one raising killed the sender thread, and every later
    request got no response at all."""
    doomed = FakeSender(fail=lambda r, f: r is not None and r.error is not None)
    model.execute([FakeRequest(ids(max_tokens=500, ignore_eos=np.array([True]), stream=np.array([True])), doomed)])
    while not doomed.responses:
        time.sleep(0.01)
    doomed.cancelled = True
    wait_final(doomed)
    after = FakeSender()
    model.execute([FakeRequest(ids(), after)])
    wait_final(after)
    assert after.finals == 1 and after.error is None and len(after.token_ids()) == 4
    assert blocks_all_free(model)


def test_a_failing_metric_call_stops_neither_thread(model):
    """Metric updates are IPC calls that can fail (the shared-memory pool full); one raising on the engine thread
    (after_step) or on the sender thread (latency histograms) used to kill that thread for good."""
    for name in ("pagedllm_kv_blocks_free", "pagedllm_time_to_first_token_seconds"):
        calls = iter([True])

        def boom(op, v, calls=calls):
            if next(calls, False):
                raise RuntimeError("Failed to increase the shared memory pool size")

        FakeMetricFamily.hooks = {name: boom}
        senders = [FakeSender() for _ in range(2)]
        model.execute([FakeRequest(ids(), s) for s in senders])
        wait_final(*senders, timeout=15)
        later = FakeSender()
        model.execute([FakeRequest(ids(), later)])
        wait_final(later, timeout=15)
        assert later.finals == 1 and later.error is None, name
    assert blocks_all_free(model)


def test_finalize_ends_every_request_in_flight_even_if_one_send_fails(model):
    first = FakeSender(fail=lambda r, f: r is not None and r.error is not None)
    second = FakeSender()
    long = ids(max_tokens=500, ignore_eos=np.array([True]), stream=np.array([True]))
    model.execute([FakeRequest(long, first), FakeRequest(long, second)])
    while not (first.responses and second.responses):
        time.sleep(0.01)
    model._launcher.grace_s = 0.0  # unloading drains: no grace, so both are still running when it ends them
    model.finalize()
    assert first.finals == 1 and second.finals == 1
    assert second.error is not None and second.error.code == "UNAVAILABLE"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("where", ["sampling_parameters", "sampling_parameters.stop", "parameter"])
def test_deeply_nested_json_is_an_invalid_argument(model, where):
    """json.loads raises RecursionError (not JSONDecodeError) past ~1000 levels: it escaped execute."""
    deep = nested(20000)
    if where == "sampling_parameters":
        values, params = {"sampling_parameters": np.array([deep.encode()], dtype=np.object_)}, None
    elif where == "sampling_parameters.stop":
        values, params = {"sampling_parameters": np.array([json.dumps({"stop_token_ids": deep}).encode()],
                                                          dtype=np.object_)}, None
    else:
        values, params = {}, {"stop_token_ids": deep}
    s = FakeSender()
    model.execute([FakeRequest({**ids(), **values}, s, params)])
    wait_final(s)
    assert s.finals == 1 and s.error is not None and s.error.code == "INVALID_ARG", s.error and s.error.message


def test_an_unexpected_error_taking_one_request_ends_it_alone(model, monkeypatch):
    """Anything but InvalidRequest raised while taking a request escaped execute: in decoupled mode Triton then
    fails the whole batch of requests, including those already handed to the engine."""
    real = model.engine.tokenize

    def tokenize(text):
        if text == "boom":
            raise RuntimeError("tokenizer exploded")
        return real(text)

    monkeypatch.setattr(model.engine, "tokenize", tokenize)
    good, bad = FakeSender(), FakeSender()
    model.execute([FakeRequest(ids(), good), FakeRequest({"text_input": np.array([b"boom"], np.object_)}, bad)])
    wait_final(good, bad)
    assert bad.finals == 1 and bad.error.code == "INTERNAL" and "tokenizer exploded" in bad.error.message
    assert good.finals == 1 and good.error is None and len(good.token_ids()) == 4


@pytest.mark.parametrize("stream", [True, False])
def test_a_response_that_cannot_be_built_ends_the_request_with_an_error(model, monkeypatch, stream):
    responder = sys.modules["pagedllm.serving.responder"]
    real = responder.build_response
    calls = iter([True])

    def response(state, out):
        if next(calls, False):
            raise ValueError("cannot build the output tensors")
        return real(state, out)

    monkeypatch.setattr(responder, "build_response", response)
    s = FakeSender()
    model.execute([FakeRequest(ids(max_tokens=40, ignore_eos=np.array([True]), stream=np.array([stream])), s)])
    wait_final(s)
    assert s.finals == 1 and s.error is not None and s.error.code == "INTERNAL"
    assert blocks_all_free(model)


@pytest.mark.parametrize("key", ["temperature", "top_p", "repetition_penalty"])
def test_a_float_given_as_a_huge_json_integer_is_an_invalid_argument(key):
    """float(10**400) raises OverflowError, which _to_float did not catch: INTERNAL instead of INVALID_ARG."""
    from pagedllm.errors import InvalidRequest
    from pagedllm.serving.request_parser import Limits, parse_request

    raw = '{"%s": 1%s}' % (key, "0" * 400)
    inputs = {"input_ids": np.array([1, 2, 3], np.int64), "sampling_parameters": np.array([raw.encode()], np.object_)}
    with pytest.raises(InvalidRequest, match=f"sampling_parameters.{key}"):
        parse_request(inputs.get, {}, None, Limits(64, 512))


def test_a_request_parsed_while_the_model_fails_is_answered_and_never_runs(model, monkeypatch):
    """execute let it through before the failure; the intake thread finished parsing it after the failure had
    swept the requests in flight. It used to be registered late, and nobody ever answered it."""
    real_make_request = model.engine.make_request

    def make_request_as_the_model_fails(*args, **kwargs):
        model.responder.fatal("the engine failed (simulated)")
        time.sleep(0.2)  # the sender thread has swept the requests in flight
        return real_make_request(*args, **kwargs)

    monkeypatch.setattr(model.engine, "make_request", make_request_as_the_model_fails)
    s = FakeSender()
    model.execute([FakeRequest(ids(max_tokens=500, ignore_eos=np.array([True])), s)])
    wait_final(s)
    assert s.finals == 1 and s.error.code == "UNAVAILABLE" and "engine failed" in s.error.message
    assert blocks_all_free(model)  # the engine had it already: its first output aborted it


def test_the_launcher_hears_of_a_failure_after_every_request_had_its_error(model):
    """The launcher stops the server when the model reports a failure: the errors must be out by then, or a
    client sees its connection cut instead of an answer."""
    senders = [FakeSender() for _ in range(3)]
    model.execute([FakeRequest(ids(max_tokens=500, ignore_eos=np.array([True]), stream=np.array([True])), s)
                   for s in senders])
    while not all(s.responses for s in senders):
        time.sleep(0.01)
    finals_when_reported = []

    class Launcher:
        grace_s, launcher_gone = 0.0, False

        def report_fatal(self, reason):
            finals_when_reported.append([s.finals for s in senders])

        def report_finalizing(self):  # the model's finalize, at the test's end
            pass

        def poll(self, timeout=0.0):
            time.sleep(timeout)

    model._launcher = Launcher()
    model._on_fatal("steps keep failing (simulated)")
    wait_final(*senders)
    assert finals_when_reported == [[1, 1, 1]]
    assert all(s.error.code == "UNAVAILABLE" for s in senders)
    assert blocks_all_free(model)
