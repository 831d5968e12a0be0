"""The line between `pagedllm serve` (the launcher) and the `llm` model inside tritonserver's Python stub.

Triton tells a Python model nothing about a shutdown: it stops taking requests and unloads the model, but the
Python backend only calls the model's `finalize` once every request in flight has had its final response, and
tritonserver gives up after its exit timeout (crashing, and orphaning the stub). So the launcher talks to the
model directly, over two pipes whose file descriptors the stub inherits (through tritonserver, which passes
inherited descriptors on to its stubs):

- the **lifeline** (launcher -> model): the launcher writes `drain <seconds>` when it is asked to stop; the
  model then refuses new requests and gives those in flight that long to finish before it ends them with an
  error (the launcher meanwhile unloads the model, which makes Triton report not ready, and then stops
  tritonserver). If the launcher dies (SIGKILL), the pipe reaches end-of-file: the model drains with the grace
  period it was started with, then stops tritonserver itself (SIGINT to its parent). tritonserver is not
  stopped by a signal when the launcher dies: once shutting down it no longer delivers a Python model's
  responses, so requests in flight would get no answer.
- the **status** pipe (model -> launcher): the model writes `idle` when a drain is over (every request had
  its final response), and `fatal <reason>` when it can no longer serve (its engine thread died, steps keep
  failing); the launcher then stops tritonserver and exits non-zero, so that an orchestrator restarts it.

Without a launcher (tritonserver started by hand) neither variable is set and the model does without.
"""
from __future__ import annotations

import os
import select
import time

LIFELINE_FD = "PAGEDLLM_LIFELINE_FD"
STATUS_FD = "PAGEDLLM_STATUS_FD"
GRACE_ENV = "PAGEDLLM_SHUTDOWN_GRACE_SECS"
SHM_PREFIX_ENV = "PAGEDLLM_SHM_PREFIX"
DEFAULT_GRACE_S = 5.0


class LauncherEnd:
    """The launcher's side: the pipes to create before tritonserver starts, and what to send."""

    def __init__(self):
        self._lifeline_read, self._lifeline_write = os.pipe()
        self._status_read, self._status_write = os.pipe()
        os.set_blocking(self._status_read, False)
        self._status_buffer = b""

    def child_env(self, grace_s: float) -> dict[str, str]:
        return {LIFELINE_FD: str(self._lifeline_read), STATUS_FD: str(self._status_write),
                GRACE_ENV: str(grace_s)}

    @property
    def child_fds(self) -> tuple[int, int]:
        """For subprocess.Popen(pass_fds=...): the ends the model uses. Ours stay out of the child."""
        return self._lifeline_read, self._status_write

    def after_start(self) -> None:
        """The child has its copies: close ours, so that the lifeline's read end is only the model's."""
        for fd in self.child_fds:
            os.close(fd)

    def drain(self, grace_s: float) -> None:
        try:
            os.write(self._lifeline_write, f"drain {grace_s}\n".encode())
        except OSError:  # the model is gone already
            pass

    def fatal_reasons(self) -> list[str]:
        """The `fatal` lines the model wrote since the last call."""
        return [ln[len("fatal "):] for ln in self._read_status() if ln.startswith("fatal ")]

    def wait_idle(self, instances: int, timeout: float) -> bool:
        """Until `instances` model instances said their drain is over, or timeout."""
        deadline, idle = time.monotonic() + timeout, 0
        while idle < instances and time.monotonic() < deadline:
            idle += sum(ln == "idle" for ln in self._read_status())
            time.sleep(0.05)
        return idle >= instances

    def _read_status(self) -> list[str]:
        try:
            self._status_buffer += os.read(self._status_read, 65536)
        except (BlockingIOError, OSError):
            pass
        *lines, self._status_buffer = self._status_buffer.split(b"\n")
        return [ln.decode(errors="replace") for ln in lines]

    def close(self) -> None:
        for fd in (self._lifeline_write, self._status_read):
            try:
                os.close(fd)
            except OSError:
                pass


class ModelEnd:
    """The model's side. `poll()` returns the drain grace period (seconds) once a drain was asked for, or the
    launcher is gone; `report_fatal` tells the launcher the model cannot serve any more."""

    def __init__(self, environ=os.environ):
        self._lifeline = _fd(environ.get(LIFELINE_FD))
        self._status = _fd(environ.get(STATUS_FD))
        try:
            self.grace_s = float(environ.get(GRACE_ENV, DEFAULT_GRACE_S))
        except ValueError:
            self.grace_s = DEFAULT_GRACE_S
        self._buffer = b""
        self.launcher_gone = False  # the lifeline reached end-of-file

    @property
    def attached(self) -> bool:
        return self._lifeline is not None

    def poll(self, timeout: float = 0.0) -> float | None:
        """Waits up to `timeout` for word from the launcher; the grace period to drain with, or None."""
        if self._lifeline is None:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select([self._lifeline], [], [], timeout)
        if not ready:
            return None
        data = os.read(self._lifeline, 4096)
        if not data:  # end of file: the launcher is gone
            self._lifeline = None
            self.launcher_gone = True
            return self.grace_s
        self._buffer += data
        for line in self._buffer.split(b"\n"):
            if line.startswith(b"drain "):
                try:
                    return max(0.0, float(line.split()[1]))
                except (IndexError, ValueError):
                    return self.grace_s
        return None

    def report_fatal(self, reason: str) -> None:
        self._report("fatal " + " ".join(reason.split())[:400])

    def report_idle(self) -> None:
        self._report("idle")

    def _report(self, line: str) -> None:
        if self._status is None:
            return
        try:
            os.write(self._status, (line + "\n").encode())  # one short line: written atomically
        except OSError:
            pass


def _fd(value: str | None) -> int | None:
    if not value:
        return None
    try:
        fd = int(value)
        os.fstat(fd)
        return fd
    except (ValueError, OSError):
        return None
