"""The `llm` model of the Triton model repository: a thin adapter between Triton's Python backend and the
engine. `execute` hands each request to a small intake pool and returns at once: parsing and validating
(tokenizing a long text, copying embeddings) never hold up the requests behind it. Validated requests go to
the engine thread (engine_thread.py); a sender thread (responder.py) sends every response, watches for
cancellations, and ends what is in flight when the server drains or the engine fails. Only the serving
modules import `triton_python_backend_utils`.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import triton_python_backend_utils as pb_utils

from ..config import EngineConfig, instance_device
from ..engine.engine import LLMEngine
from ..errors import INTERNAL, UNAVAILABLE, InvalidRequest, server_error
from ..lifeline import ModelEnd
from ..model.spec import resolve_model
from .engine_thread import EngineThread
from .metrics import EngineStats, ModelMetrics
from .request_parser import Limits, parse_parameters, parse_request, take_inputs
from .responder import RequestState, Responder, guarded, send_error
from .triton_logging import dump_stacks_on_sigusr1, install_triton_log_handler

log = logging.getLogger("pagedllm")
dump_stacks_on_sigusr1()  # where a stuck initialize stands, when the launcher asks
INTAKE_THREADS = 2  # a long request being parsed does not hold up the next one


def _engine_config(args: dict) -> EngineConfig:
    params = json.loads(args["model_config"]).get("parameters", {})
    values = {k: v.get("string_value", "") for k, v in params.items()}
    cfg = EngineConfig.from_strings(values)
    if not cfg.model_dir:
        cfg.model_dir = os.environ.get("PAGEDLLM_MODEL_DIR", "")
    if not cfg.model_dir:
        raise ValueError("the llm model needs a checkpoint: set the `model_dir` parameter in config.pbtxt")
    cfg.model_dir = str(resolve_model(cfg.model_dir, relative_to=args["model_repository"]))
    cfg.device = instance_device(cfg.device, args.get("model_instance_kind", ""),
                                 args.get("model_instance_device_id", "0"))
    return cfg


class TritonPythonModel:
    def initialize(self, args):
        install_triton_log_handler()
        self.instance_name = args.get("model_instance_name", "llm")  # in log lines: instances are told apart
        self.engine = LLMEngine(_engine_config(args))
        self.limits = Limits(self.engine.spec.hidden_size, self.engine.max_model_len, self.engine.max_prompt_chars)
        labels = {"model": args["model_name"], "version": args["model_version"],
                  "instance": args.get("model_instance_name", "")}
        self.metrics = ModelMetrics(labels)
        self._ids = _Counter()
        self.responder = Responder(self.metrics, abort=lambda rid: self.engine_thread.abort(rid))
        self.engine_thread = EngineThread(
            self.engine, on_outputs=self.responder.outputs, on_error=self.responder.error,
            after_step=lambda: self.responder.engine_stats(EngineStats.of(self.engine)), on_fatal=self._on_fatal)
        self._intake = ThreadPoolExecutor(INTAKE_THREADS, thread_name_prefix="pagedllm-intake")
        self._launcher = ModelEnd()
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch_launcher, name="pagedllm-lifeline", daemon=True)
        self._watcher.start()
        self.responder.engine_stats(EngineStats.of(self.engine))

    # ---- execute: hand over, return -------------------------------------------------------------------
    def execute(self, requests):
        """Only what must happen while Triton holds the request: its inputs are copied out (once their sizes
        are known to be within the limits); the rest of the work is the intake pool's."""
        for request in requests:
            sender = request.get_response_sender()
            if self.responder.refusal:  # draining or failed: answer at once, and do no work for it
                guarded(send_error, sender, self.responder.refusal, pb_utils.TritonError.UNAVAILABLE)
                continue
            try:
                taken = _Taken(take_inputs(lambda name: _input(request, name), self.limits), request.parameters(),
                               request.request_id(), set(request.requested_output_names()))
            except InvalidRequest as e:
                guarded(send_error, sender, str(e), pb_utils.TritonError.INVALID_ARG)
                continue
            except Exception as e:
                log.exception("pagedllm: could not take a request")
                guarded(send_error, sender, server_error(INTERNAL, str(e)), pb_utils.TritonError.INTERNAL)
                continue
            self._intake.submit(self._take, taken, sender)
        return None

    def _take(self, taken: "_Taken", sender) -> None:
        """On an intake thread: parse and validate one request, then hand it to the engine thread. Every
        failure ends this request alone, with one final error."""
        if self._refused(sender):
            return
        try:
            parsed = parse_request(taken.inputs.get, parse_parameters(taken.parameters), self.engine.tokenize,
                                   self.limits)
            request_id = f"{self._ids.next()}-{taken.request_id}"
            engine_request = self.engine.make_request(
                request_id, parsed.params, parsed.prompt_token_ids, parsed.prompt_embeds,
                prompt_name=parsed.prompt_name, prompt_text=parsed.prompt_text)
        except InvalidRequest as e:
            guarded(send_error, sender, str(e), pb_utils.TritonError.INVALID_ARG)
            return
        except Exception as e:  # not the request's fault (or not caught as such): it still ends, alone
            log.exception("pagedllm: could not take a request")
            guarded(send_error, sender, server_error(INTERNAL, str(e)), pb_utils.TritonError.INTERNAL)
            return
        if self._refused(sender):  # the model began draining or failing while this one was parsed
            return
        state = RequestState(sender, parsed.stream, parsed.exclude_input_in_output, taken.requested,
                             taken.arrival)
        # Registered before it is submitted, so that the sender thread knows it before its first output (and
        # refuses it if a drain or failure began since the check above).
        self.responder.register(request_id, state, engine_request.seq.num_prompt_tokens)
        self.engine_thread.submit(engine_request)
        state.submitted = True

    def _refused(self, sender) -> bool:
        refusal = self.responder.refusal  # read once: another thread may set it
        if refusal:
            guarded(send_error, sender, refusal, pb_utils.TritonError.UNAVAILABLE)
        return bool(refusal)

    # ---- life events ----------------------------------------------------------------------------------
    def _watch_launcher(self) -> None:
        """Drains when `pagedllm serve` asks; when it died, drains and then stops tritonserver (nothing else
        will). Exits the stub if tritonserver itself is gone, rather than live on as an orphan holding memory
        and shared-memory regions that nothing can reach."""
        parent = os.getppid()
        stopped_server = False
        while not self._stopping.is_set():
            try:
                grace = self._launcher.poll(1.0)
            except Exception:
                log.exception("pagedllm: reading the lifeline failed")
                grace = None
                self._launcher.stop_watching()  # go on without it
            if grace is not None:
                log.info("pagedllm: %s draining: new requests are refused, those in flight have %.1f s",
                         self.instance_name, grace)
                self.responder.drain(grace)
                self.responder.wait_idle(grace + 2.0)
                self._launcher.report_idle()
            if self._launcher.launcher_gone and not stopped_server:  # drained above: the lifeline's end drains
                if not self._launcher.wait_for_every_instance(self._launcher.grace_s + 3.0):
                    log.warning("pagedllm: another instance is still draining; stopping anyway")
                log.warning("pagedllm: the launcher is gone; stopping tritonserver")
                os.kill(parent, signal.SIGINT)
                stopped_server = True
            if os.getppid() != parent:
                _exit_orphaned()

    def _on_fatal(self, reason: str) -> None:
        log.error("pagedllm: the model cannot serve any more: %s", reason)
        # The launcher stops the server once told: first every request in flight gets its error.
        self.responder.fatal(reason, then=lambda: self._launcher.report_fatal(reason))

    def finalize(self):
        """Triton unloads the model once every request had its final response (it waits for streams). An unload
        without a shutdown drains here too: new requests are refused, those in flight get the grace period, the
        rest end with an error."""
        self._stopping.set()
        self._launcher.report_finalizing()
        grace = self._launcher.grace_s
        log.info("pagedllm: %s unloading: new requests are refused, those in flight have %.1f s",
                 self.instance_name, grace)
        self.responder.drain(grace)
        if not self.responder.wait_idle(grace + 2.0):
            log.warning("pagedllm: requests still open after the grace period")
        self._intake.shutdown(wait=True, cancel_futures=False)
        self.engine_thread.stop()
        self.responder.stop(final_error=server_error(UNAVAILABLE, "the model is being unloaded"))


@dataclass
class _Taken:
    """A request's contents, copied out of Triton's request object in execute."""
    inputs: dict
    parameters: str
    request_id: str
    requested: set[str]
    arrival: float = field(default_factory=time.monotonic)


class _Counter:
    """Request-id numbers, from any intake thread."""

    def __init__(self):
        self._n = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._n += 1
            return self._n


def _input(request, name: str):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def _exit_orphaned() -> None:
    """tritonserver is gone (it crashed, or was killed): nothing can reach this stub any more. Remove our
    shared-memory regions (their names start with the prefix the launcher gave tritonserver) and exit."""
    prefix = os.environ.get("PAGEDLLM_SHM_PREFIX")
    if prefix:
        for name in os.listdir("/dev/shm"):
            if name.startswith(prefix):
                try:
                    os.unlink(os.path.join("/dev/shm", name))
                except OSError:
                    pass
    log.error("pagedllm: tritonserver is gone; the stub exits")
    os._exit(1)
