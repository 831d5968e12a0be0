"""The `llm` model of the Triton model repository: a thin adapter between Triton's Python backend and the
engine. `execute` validates each request and hands it to the engine thread, then returns; responses go out
from a sender thread (each send is an IPC round trip, so the engine thread never waits on one), which also
watches for cancelled requests. Only this module imports `triton_python_backend_utils`.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from ..config import EngineConfig
from ..engine.engine import LLMEngine
from ..errors import CANCELLED, INTERNAL, UNAVAILABLE, InvalidRequest, server_error
from ..engine.request import StepOutput
from .engine_thread import EngineThread
from .request_parser import parse_request

log = logging.getLogger("pagedllm")
CANCEL_POLL_SECONDS = 0.05
LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]


@dataclass
class _RequestState:
    """What the sender thread needs to answer one request (its output lives on the engine's Request)."""
    sender: object
    stream: bool
    exclude_input: bool
    requested: set[str]
    arrival: float
    last_token_time: float | None = None
    cancelled: bool = False
    # Set by execute once the sequence is queued for the engine thread: until then an abort could overtake it.
    submitted: bool = False


class _Metrics:
    def __init__(self, labels: dict[str, str], total_blocks: int):
        self._families = []  # a MetricFamily must outlive its Metrics, so keep them all

        def family(name, desc, kind):
            self._families.append(pb_utils.MetricFamily(name=name, description=desc, kind=kind))
            return self._families[-1]

        gauge, counter, hist = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER, \
            pb_utils.MetricFamily.HISTOGRAM
        self.free_blocks = family("pagedllm_kv_blocks_free", "Free KV-cache blocks", gauge).Metric(labels)
        self.total_blocks = family("pagedllm_kv_blocks_total", "KV-cache blocks in all", gauge).Metric(labels)
        self.total_blocks.set(total_blocks)
        self.running = family("pagedllm_num_requests_running", "Sequences in the running batch", gauge).Metric(labels)
        self.waiting = family("pagedllm_num_requests_waiting", "Sequences waiting for the batch", gauge).Metric(labels)
        self.prompt_tokens = family("pagedllm_prompt_tokens_total", "Prompt tokens admitted", counter).Metric(labels)
        self.generation_tokens = family("pagedllm_generation_tokens_total", "Tokens generated", counter).Metric(labels)
        self.ttft = family("pagedllm_time_to_first_token_seconds", "Time to first token", hist).Metric(
            labels, buckets=LATENCY_BUCKETS)
        self.itl = family("pagedllm_inter_token_latency_seconds", "Time between tokens of a request", hist).Metric(
            labels, buckets=LATENCY_BUCKETS)
        self.cache_hits = family("pagedllm_prefix_cache_hit_tokens_total",
                                 "Prompt tokens whose KV came from the prefix cache", counter).Metric(labels)
        self._last = None
        self._last_hits = 0

    def update(self, engine: LLMEngine) -> None:
        """After each step. Each metric call is an IPC round trip: only what changed is sent."""
        state = (engine.num_free_blocks, engine.num_running, engine.num_waiting)
        if self._last != state:
            self._last = state
            self.free_blocks.set(state[0])
            self.running.set(state[1])
            self.waiting.set(state[2])
        hits = engine.block_manager.num_cached_tokens_hit
        if hits != self._last_hits:
            self.cache_hits.increment(hits - self._last_hits)
            self._last_hits = hits


def _engine_config(args: dict) -> EngineConfig:
    params = json.loads(args["model_config"]).get("parameters", {})
    values = {k: v.get("string_value", "") for k, v in params.items()}
    cfg = EngineConfig.from_strings(values)
    if not cfg.model_dir:
        cfg.model_dir = os.environ.get("PAGEDLLM_MODEL_DIR", "")
    if not cfg.model_dir:
        raise ValueError("the llm model needs a checkpoint: set the `model_dir` parameter in config.pbtxt")
    if not os.path.isabs(cfg.model_dir):  # relative paths are relative to the model's folder
        cfg.model_dir = os.path.join(args["model_repository"], cfg.model_dir)
    return cfg


class TritonPythonModel:
    def initialize(self, args):
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        self.engine = LLMEngine(_engine_config(args))
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.metrics = _Metrics(labels, self.engine.block_manager.num_blocks)
        self._ids = itertools.count()
        self._states: dict[str, _RequestState] = {}  # touched by the sender thread only, after registration
        self._outbox: queue.Queue = queue.Queue()
        self._sender_thread = threading.Thread(target=self._send_loop, name="pagedllm-sender", daemon=True)
        self._sender_thread.start()
        self.engine_thread = EngineThread(
            self.engine,
            on_outputs=lambda outs: self._outbox.put(("outputs", outs)),
            on_error=lambda rid, msg: self._outbox.put(("error", (rid, msg))),
            after_step=self._update_gauges)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.update(self.engine)

    # ---- execute: validate, enqueue, return ---------------------------------------------------------
    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed = parse_request(lambda name: _input(request, name), _parameters(request),
                                       self.engine.tokenize, self.engine.spec.hidden_size,
                                       self.engine.max_model_len)
                request_id = f"{next(self._ids)}-{request.request_id()}"
                engine_request = self.engine.make_request(
                    request_id, parsed.params, parsed.prompt_token_ids, parsed.prompt_embeds,
                    prompt_name=parsed.prompt_name, prompt_text=parsed.prompt_text)
            except InvalidRequest as e:
                _send_error(sender, str(e), pb_utils.TritonError.INVALID_ARG)
                continue
            except Exception as e:  # not the request's fault (or not caught as such): it still ends, alone
                log.exception("pagedllm: could not take a request")
                _send_error(sender, server_error(INTERNAL, str(e)), pb_utils.TritonError.INTERNAL)
                continue
            state = _RequestState(sender, parsed.stream, parsed.exclude_input_in_output,
                                  set(request.requested_output_names()), time.monotonic())
            # Registered before it is submitted, so that the sender thread knows it before its first output.
            self._outbox.put(("register", (request_id, state)))
            self.engine_thread.submit(engine_request)
            state.submitted = True
            _guarded(self.metrics.prompt_tokens.increment, engine_request.seq.num_prompt_tokens)
        return None

    # ---- the sender thread --------------------------------------------------------------------------
    def _send_loop(self) -> None:
        next_poll = time.monotonic()
        while True:
            try:
                kind, arg = self._outbox.get(timeout=CANCEL_POLL_SECONDS)
            except queue.Empty:
                kind, arg = None, None
            if kind == "stop":
                return
            # Nothing raised here may end this thread: every request in flight depends on it.
            if kind == "register":
                self._states[arg[0]] = arg[1]
            elif kind == "outputs":
                for out in arg:
                    _guarded(self._deliver, out)
            elif kind == "error":
                state = self._states.pop(arg[0], None)
                if state is not None:
                    _guarded(_send_error, state.sender, arg[1], pb_utils.TritonError.INTERNAL)
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + CANCEL_POLL_SECONDS
                _guarded(self._poll_cancellations)

    def _poll_cancellations(self) -> None:
        for request_id, state in self._states.items():
            # Not before it was submitted: the abort would reach the engine thread ahead of the sequence.
            if state.submitted and not state.cancelled and state.sender.is_cancelled():
                state.cancelled = True
                self.engine_thread.abort(request_id)

    def _deliver(self, out: StepOutput) -> None:
        state = self._states.get(out.request_id)
        if state is None:
            return
        if out.new_token_ids:
            _guarded(self._observe_tokens, state, len(out.new_token_ids))
        if out.finished:
            del self._states[out.request_id]
            if out.finish_reason == "abort":
                _guarded(_send_error, state.sender, server_error(CANCELLED, "the request was cancelled"),
                         pb_utils.TritonError.CANCELLED)
                return
        if not state.stream and not out.finished:
            return  # a whole response goes out once, from the finished request
        try:
            response = self._response(state, out)
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

    def _fail(self, out: StepOutput, state: _RequestState, message: str) -> None:
        """End a request whose output could not go out: stop it in the engine and send a final error, or a
        client that is still there (or Triton's HTTP stream) waits forever. If the client is gone, that send
        fails too, harmlessly."""
        if not out.finished:
            self._states.pop(out.request_id, None)
            self.engine_thread.abort(out.request_id)
        _guarded(_send_error, state.sender, message, pb_utils.TritonError.INTERNAL)

    def _observe_tokens(self, state: _RequestState, n: int) -> None:
        now = time.monotonic()
        last, state.last_token_time = state.last_token_time, now
        self.metrics.generation_tokens.increment(n)
        if last is None:
            self.metrics.ttft.observe(now - state.arrival)
        else:
            self.metrics.itl.observe(now - last)

    @staticmethod
    def _response(state: _RequestState, out: StepOutput):
        """Streaming: what this step added. Whole: the finished request's output, after the prompt's text
        unless excluded (vllm_backend's behaviour)."""
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
        }
        names = state.requested or values.keys()
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(n, make()) for n, make in values.items() if n in names])

    def finalize(self):
        self.engine_thread.stop()
        self._outbox.put(("stop", None))
        self._sender_thread.join(5)
        states, self._states = list(self._states.values()), {}
        for state in states:
            _guarded(_send_error, state.sender, server_error(UNAVAILABLE, "the model is being unloaded"),
                     pb_utils.TritonError.UNAVAILABLE)


def _input(request, name: str):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _parameters(request) -> dict:
    raw = request.parameters()
    try:
        return json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        return {}


def _send_error(sender, message: str, code) -> None:
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _guarded(fn, *args) -> None:
    """Call fn, logging rather than raising: for sends and metric updates (IPC calls that can fail) on threads
    that other requests depend on."""
    try:
        fn(*args)
    except Exception:
        log.exception("pagedllm: %s failed", getattr(fn, "__name__", fn))
