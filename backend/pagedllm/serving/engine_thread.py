"""Drives an LLMEngine on a background thread so that Triton's `execute` only validates and enqueues.

Other threads talk to it through one queue: `submit` a validated Request, `abort` a request id. The loop
drains the queue, runs one engine step, and hands the step's outputs to `on_outputs`; when there is no work
it sleeps on the queue. A failing step fails the requests in flight, not the thread. If the thread ends
anyway, or steps keep failing (the engine is broken, not one batch), `on_fatal` says so once.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from ..engine.engine import LLMEngine
from ..errors import INTERNAL, server_error
from ..engine.request import Request, StepOutput

log = logging.getLogger("pagedllm")
MAX_CONSECUTIVE_STEP_FAILURES = 3


class EngineThread:
    def __init__(self, engine: LLMEngine, on_outputs: Callable[[list[StepOutput]], None],
                 on_error: Callable[[str, str], None], after_step: Callable[[], None] = lambda: None,
                 on_fatal: Callable[[str], None] = lambda reason: None):
        self.engine = engine
        self._on_outputs = on_outputs
        self._on_error = on_error  # (request_id, message): the request failed inside the engine
        self._after_step = after_step
        self._report_fatal = on_fatal  # (reason): the engine can no longer serve; called once
        self._fatal_lock = threading.Lock()
        self._fatal_reason: str | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._stopping = False
        self._failed_steps = 0
        self._thread = threading.Thread(target=self._run, name="pagedllm-engine", daemon=True)
        self._thread.start()
        if engine.workers is not None:  # a dead rank can leave the engine thread blocked in a collective
            self._watchdog = threading.Thread(target=self._watch_workers, name="pagedllm-ranks", daemon=True)
            self._watchdog.start()

    def _watch_workers(self) -> None:
        while not self._stopping:
            failure = self.engine.worker_failure()
            if failure:
                log.error("pagedllm: %s", failure)
                self._on_fatal(failure)
                return
            time.sleep(0.5)

    def _on_fatal(self, reason: str) -> None:
        with self._fatal_lock:  # the watchdog and the engine thread may both see the end
            if self._fatal_reason is not None:
                return
            self._fatal_reason = reason
        self._report_fatal(reason)

    def _rank_failure(self, wait_s: float = 1.0) -> str | None:
        """Which rank died, when a step failed because one did (its collective errors before it is reaped)."""
        deadline = time.monotonic() + wait_s
        while (failure := self.engine.worker_failure()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return failure

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: Request) -> None:
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        self._thread.join(timeout)
        if self._thread.is_alive():  # stuck in a step (a collective that never completes): no stop message
            log.warning("pagedllm: the engine thread did not stop within %.0f s", timeout)
        self.engine.close(graceful=not self._thread.is_alive())

    def _handle(self, kind: str, arg) -> list[StepOutput]:
        if kind == "add":
            try:
                self.engine.add(arg)
            except Exception as e:  # whatever it is, it fails this request, not the thread
                if not isinstance(e, ValueError):
                    log.exception("pagedllm: adding %s failed", arg.request_id)
                self._on_error(arg.request_id, str(e) if isinstance(e, ValueError) else server_error(INTERNAL, str(e)))
            return []
        if kind == "abort":
            try:
                out = self.engine.abort(arg)
            except Exception:
                log.exception("pagedllm: aborting %s failed", arg)
                return []
            return [out] if out is not None else []
        return []

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: B036 -- whatever ends the thread, the model must hear of it
            log.exception("pagedllm: the engine thread died")
            self._on_fatal(f"the engine thread died: {type(e).__name__}: {e}")
            raise
        if not self._stopping:
            self._on_fatal("the engine thread stopped")

    def _loop(self) -> None:
        while not self._stopping:
            outputs: list[StepOutput] = []
            try:
                # Block only when idle; otherwise take whatever arrived and step.
                block = not self.engine.has_unfinished()
                while True:
                    kind, arg = self._inbox.get(block=block)
                    block = False
                    if kind == "stop":
                        return
                    outputs += self._handle(kind, arg)
            except queue.Empty:
                pass
            # Taken before the step: a request that finishes inside a step that then fails has left the engine,
            # and its output is lost with the step's, so it must get the error too.
            in_flight = self.engine.unfinished_request_ids()
            try:
                outputs += self.engine.step()
                self._failed_steps = 0
            except Exception as e:  # a bug or an OOM: fail what is in flight, keep serving
                log.exception("pagedllm: engine step failed")
                for request_id in in_flight:
                    self._handle("abort", request_id)  # guarded: one that fails to free still gets its error
                    self._on_error(request_id, server_error(INTERNAL, f"the engine step failed: {e}"))
                self._failed_steps += 1
                if self.engine.workers is not None and self._failed_steps == 1:
                    # The other ranks may be left inside this step's collectives: the next step's would not
                    # line up with theirs.
                    self._on_fatal(self._rank_failure() or f"a tensor-parallel engine step failed: {e}")
                elif self._failed_steps == MAX_CONSECUTIVE_STEP_FAILURES:
                    self._on_fatal(f"{self._failed_steps} engine steps failed in a row; the last: {e}")
            try:  # callbacks (queue puts, metric IPC) must not end the thread that serves every request
                if outputs:
                    self._on_outputs(outputs)
                self._after_step()
            except Exception:
                log.exception("pagedllm: engine thread callback failed")
