"""The `llm` model's sender thread: it answers every request exactly once with a final response.

Each send is an IPC round trip to tritonserver, so sends happen here and never on the engine thread; so do
all metric calls (see metrics.py). Everything arrives through one queue, in order: a request's registration
before its first output, the engine's outputs, errors and numbers, and the model's life events (drain on
shutdown, fatal when the engine can no longer serve). The thread also polls for cancelled requests, and at a
drain's deadline ends those still running.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import triton_python_backend_utils as pb_utils

from ..engine.request import StepOutput
from ..errors import CANCELLED, INTERNAL, UNAVAILABLE, server_error
from .metrics import EngineStats, ModelMetrics

log = logging.getLogger("pagedllm")
POLL_SECONDS = 0.05
SHUTTING_DOWN = server_error(UNAVAILABLE, "the server is shutting down")


@dataclass
class RequestState:
    """What the sender needs to answer one request (its output lives on the engine's Request)."""
    sender: object
    stream: bool
    exclude_input: bool
    requested: set[str]
    arrival: float
    last_token_time: float | None = None
    cancelled: bool = False
    # Set once the request is queued for the engine thread: until then an abort could overtake it.
    submitted: bool = False
    abort_error: str | None = None  # why we aborted it ourselves (drain), instead of the client's cancel


class Responder:
    def __init__(self, metrics: ModelMetrics, abort: Callable[[str], None]):
        self.metrics = metrics
        self._abort = abort  # engine_thread.abort
        self.states: dict[str, RequestState] = {}  # touched by this thread only
        self._inbox: queue.Queue = queue.Queue()
        self.refusal: str | None = None  # set (any thread reads it) once new requests are refused, and why
        self._drain_deadline: float | None = None
        self._idle = threading.Event()  # set once draining and no request is open
        self._thread = threading.Thread(target=self._loop, name="pagedllm-sender", daemon=True)
        self._thread.start()

    # ---- what other threads tell it -------------------------------------------------------------------
    def register(self, request_id: str, state: RequestState, num_prompt_tokens: int) -> None:
        self._inbox.put(("register", (request_id, state, num_prompt_tokens)))

    def engine_stats(self, stats: EngineStats) -> None:
        self._inbox.put(("stats", stats))

    def outputs(self, outs: list[StepOutput]) -> None:
        self._inbox.put(("outputs", outs))

    def error(self, request_id: str, message: str) -> None:
        self._inbox.put(("error", (request_id, message)))

    def drain(self, grace_s: float) -> None:
        """Shutting down: refuse new requests now, end those still running after grace_s seconds."""
        self.refusal = self.refusal or SHUTTING_DOWN
        self._inbox.put(("drain", grace_s))

    def fatal(self, reason: str, then: Callable[[], None] = lambda: None) -> None:
        """The engine can no longer serve: refuse new requests, end every request in flight with the reason,
        then call `then` (on this thread: after those errors went out)."""
        self.refusal = server_error(UNAVAILABLE, reason)
        self._inbox.put(("fatal", (self.refusal, then)))

    def wait_idle(self, timeout: float) -> bool:
        """After drain(): wait until every open request got its final response."""
        return self._idle.wait(timeout)

    def stop(self, final_error: str, timeout: float = 5.0) -> None:
        """End the thread, after a final error to every request still open."""
        self._inbox.put(("stop", final_error))
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("pagedllm: the sender thread did not stop within %.0f s", timeout)

    def _fail_all(self, message: str) -> None:
        states, self.states = list(self.states.values()), {}
        for state in states:
            guarded(send_error, state.sender, message, pb_utils.TritonError.UNAVAILABLE)

    # ---- the thread -----------------------------------------------------------------------------------
    def _loop(self) -> None:
        next_poll = time.monotonic()
        while True:
            try:
                kind, arg = self._inbox.get(timeout=POLL_SECONDS)
            except queue.Empty:
                kind, arg = None, None
            if kind == "stop":
                self._fail_all(arg)
                return
            # Nothing raised here may end this thread: every request in flight depends on it.
            guarded(self._handle, kind, arg)
            if self._drain_deadline is not None and not self.states and self._inbox.empty():
                self._idle.set()
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL_SECONDS
                guarded(self._poll)

    def _handle(self, kind, arg) -> None:
        if kind == "register":
            request_id, state, num_prompt_tokens = arg
            if self.refusal:  # parsed while the drain or the failure began: refused, as it would be now
                guarded(send_error, state.sender, self.refusal, pb_utils.TritonError.UNAVAILABLE)
                return  # if the engine has it already, its first output aborts it (_deliver)
            self.states[request_id] = state
            guarded(self.metrics.on_admitted, num_prompt_tokens)
        elif kind == "stats":
            self.metrics.update(arg)
        elif kind == "outputs":
            for out in arg:
                guarded(self._deliver, out)
        elif kind == "error":
            self._finish_with_error(arg[0], arg[1], pb_utils.TritonError.INTERNAL)
        elif kind == "drain":
            deadline = time.monotonic() + arg
            self._drain_deadline = min(deadline, self._drain_deadline or deadline)
        elif kind == "fatal":
            message, then = arg
            for request_id in list(self.states):
                self._finish_with_error(request_id, message, pb_utils.TritonError.UNAVAILABLE)
                self._abort(request_id)  # frees its blocks, if the engine thread still runs
            then()

    def _poll(self) -> None:
        draining = self._drain_deadline is not None and time.monotonic() >= self._drain_deadline
        for request_id, state in self.states.items():
            # Not before it was submitted: the abort would reach the engine thread ahead of the sequence.
            if not state.submitted or state.cancelled or state.abort_error:
                continue
            if draining:
                state.abort_error = SHUTTING_DOWN
                self._abort(request_id)
            elif state.sender.is_cancelled():
                state.cancelled = True
                self._abort(request_id)

    def _finish_with_error(self, request_id: str, message: str, code) -> None:
        state = self.states.pop(request_id, None)
        if state is not None:
            guarded(send_error, state.sender, message, code)
            guarded(self.metrics.on_finished, "error", time.monotonic() - state.arrival, None, 0, 0)

    def _deliver(self, out: StepOutput) -> None:
        state = self.states.get(out.request_id)
        if state is None:  # answered already (refused, failed): nobody waits for its tokens
            if not out.finished:
                self._abort(out.request_id)
            return
        now = time.monotonic()
        if out.new_token_ids:
            last, state.last_token_time = state.last_token_time, now
            guarded(self.metrics.on_tokens, len(out.new_token_ids), None if last is None else now - last,
                    now - state.arrival)
        if out.finished:
            del self.states[out.request_id]
            guarded(self._observe_finish, out, state, now)
            if out.finish_reason == "abort":
                if state.abort_error:
                    guarded(send_error, state.sender, state.abort_error, pb_utils.TritonError.UNAVAILABLE)
                else:
                    guarded(send_error, state.sender, server_error(CANCELLED, "the request was cancelled"),
                            pb_utils.TritonError.CANCELLED)
                return
        if not state.stream and not out.finished:
            return  # a whole response goes out once, from the finished request
        try:
            response = build_response(state, out)
        except Exception as e:  # a response that cannot be built ends the request, with an error
            log.exception("pagedllm: building a response for %s failed", out.request_id)
            self._fail(out, state, server_error(INTERNAL, f"building a response failed: {e}"))
            return
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if out.finished else 0
        try:
            state.sender.send(response, flags=flags)
        except Exception as e:  # the client went away, or the response was refused: stop generating for it
            log.warning("pagedllm: sending to %s failed (%s); aborting it", out.request_id, e)
            if not out.finished:
                self._fail(out, state, server_error(INTERNAL, f"sending a response failed: {e}"))

    def _observe_finish(self, out: StepOutput, state: RequestState, now: float) -> None:
        seq = out.request.seq
        queued = None if seq.first_scheduled_time is None else seq.first_scheduled_time - seq.arrival_time
        self.metrics.on_finished(out.finish_reason, now - state.arrival, queued, out.num_prompt_tokens,
                                 out.num_output_tokens)

    def _fail(self, out: StepOutput, state: RequestState, message: str) -> None:
        """End a request whose output could not go out: stop it in the engine and send a final error, or a
        client that is still there (or Triton's HTTP stream) waits forever. If the client is gone, that send
        fails too, harmlessly."""
        if not out.finished:
            self.states.pop(out.request_id, None)
            self._abort(out.request_id)
        guarded(send_error, state.sender, message, pb_utils.TritonError.INTERNAL)


def build_response(state: RequestState, out: StepOutput):
    """Streaming: what this step added. Whole: the finished request's output, after the prompt's text unless
    excluded (vllm_backend's behaviour). Only the outputs the client asked for are built."""
    if state.stream:
        token_ids, text, logprobs = out.new_token_ids, out.new_text, out.new_logprobs
    else:
        request = out.request
        token_ids, text, logprobs = request.output_token_ids, request.text, request.logprobs
        if request.prompt_text is not None and not state.exclude_input:
            text = request.prompt_text + text
    values = {  # built only when asked for: each response is one IPC round trip, every tensor costs
        "token_ids": lambda: np.asarray(token_ids, dtype=np.int64),
        "logprobs": lambda: np.asarray(logprobs or [], dtype=np.float32),  # empty unless return_logprobs
        "text_output": lambda: np.array([text.encode("utf-8")], dtype=np.object_),
        "finish_reason": lambda: np.array([(out.finish_reason or "").encode()], dtype=np.object_),
        "num_input_tokens": lambda: np.array([out.num_prompt_tokens], dtype=np.uint32),
        "num_output_tokens": lambda: np.array([out.num_output_tokens], dtype=np.uint32),
        "num_cached_tokens": lambda: np.array([out.num_cached_tokens], dtype=np.uint32),
    }
    names = state.requested or values.keys()
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(n, make()) for n, make in values.items() if n in names])


def send_error(sender, message: str, code) -> None:
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def guarded(fn, *args) -> None:
    """Call fn, logging rather than raising: for sends and metric updates (IPC calls that can fail) on threads
    that other requests depend on."""
    try:
        fn(*args)
    except Exception:
        log.exception("pagedllm: %s failed", getattr(fn, "__name__", fn))
