"""The line between `pagedllm serve` (the launcher) and the `llm` model inside tritonserver's Python stub.

Triton tells a Python model nothing about a shutdown: it stops taking requests and unloads the model, but the
Python backend only calls the model's `finalize` once every request in flight has had its final response, and
tritonserver gives up after its exit timeout (crashing, and orphaning the stub). So the launcher talks to the
model directly, over two pipes whose file descriptors the stub inherits (through tritonserver, which passes
inherited descriptors on to its stubs):

- the **drain** pipe (launcher -> model): the launcher closes its end when it is asked to stop. Every model
  instance holds a read end, and end-of-file reaches them all (a line written would reach only one). A model
  then refuses new requests and gives those in flight the grace period it was started with before it ends them
  with an error (the launcher meanwhile unloads the model, which makes Triton report not ready, and then stops
  tritonserver).
- the **lifeline** (launcher -> model): never written; it reaches end-of-file when the launcher dies (SIGKILL).
  The model then drains as above and stops tritonserver itself (SIGINT to its parent), once every instance has
  drained: each holds a shared lock on the **drain lock** file until its drain is over, and the instance that
  stops tritonserver first takes it exclusively. tritonserver is not
  stopped by a signal when the launcher dies: once shutting down it no longer delivers a Python model's
  responses, so requests in flight would get no answer.
- the **status** pipe (model -> launcher): the model writes `idle` when a drain is over (every request had
  its final response), `finalizing` when Triton begins unloading it (a client's open stream can hold that
  back; the launcher then does not wait for the unload), and `fatal <reason>` when it can no longer serve (its
  engine thread died, steps keep failing); the launcher then stops tritonserver and exits non-zero, so that an
  orchestrator restarts it.

Without a launcher (tritonserver started by hand) neither variable is set and the model does without.
"""
from __future__ import annotations

import fcntl
import os
import select
import time
from pathlib import Path

DRAIN_FD = "PAGEDLLM_DRAIN_FD"
LIFELINE_FD = "PAGEDLLM_LIFELINE_FD"
STATUS_FD = "PAGEDLLM_STATUS_FD"
DRAIN_LOCK_ENV = "PAGEDLLM_DRAIN_LOCK"
GRACE_ENV = "PAGEDLLM_SHUTDOWN_GRACE_SECS"
SHM_PREFIX_ENV = "PAGEDLLM_SHM_PREFIX"
DEFAULT_GRACE_S = 5.0


class LauncherEnd:
    """The launcher's side: the pipes to create before tritonserver starts, and what to send."""

    def __init__(self, runtime_dir: Path):
        self._lock_path = Path(runtime_dir) / "drain.lock"
        self._lock_path.touch()
        self._drain_read, self._drain_write = os.pipe()
        self._lifeline_read, self._lifeline_write = os.pipe()
        self._status_read, self._status_write = os.pipe()
        os.set_blocking(self._status_read, False)
        self._status_buffer = b""
        self._said: dict[str, int] = {}  # how many times each word (idle, finalizing) was said
        self._fatal: list[str] = []

    def child_env(self, grace_s: float) -> dict[str, str]:
        return {DRAIN_FD: str(self._drain_read), LIFELINE_FD: str(self._lifeline_read),
                STATUS_FD: str(self._status_write), GRACE_ENV: str(grace_s), DRAIN_LOCK_ENV: str(self._lock_path)}

    @property
    def child_fds(self) -> tuple[int, int, int]:
        """For subprocess.Popen(pass_fds=...): the ends the model uses. Ours stay out of the child."""
        return self._drain_read, self._lifeline_read, self._status_write

    def after_start(self) -> None:
        """The child has its copies: close ours, so that only the model reads the read ends."""
        for fd in self.child_fds:
            os.close(fd)

    def drain(self) -> None:
        """Every model instance starts draining (with the grace period in child_env)."""
        self._drain_write = _close(self._drain_write)

    def fatal_reasons(self) -> list[str]:
        """The `fatal` lines the model wrote since the last call."""
        self._read_status()
        reasons, self._fatal = self._fatal, []
        return reasons

    def wait_idle(self, instances: int, timeout: float) -> bool:
        """Until `instances` model instances said their drain is over, or timeout."""
        return self._wait_for("idle", instances, timeout)

    def wait_finalizing(self, instances: int, timeout: float) -> bool:
        """Until `instances` model instances said Triton began unloading them (their `finalize` runs), or
        timeout."""
        return self._wait_for("finalizing", instances, timeout)

    def _wait_for(self, word: str, instances: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._read_status()
            if self._said.get(word, 0) >= instances or time.monotonic() >= deadline:
                return self._said.get(word, 0) >= instances
            time.sleep(0.05)

    def _read_status(self) -> None:
        """Reads what the model wrote: fatal reasons are kept until asked for, other words counted."""
        try:
            self._status_buffer += os.read(self._status_read, 65536)
        except (BlockingIOError, OSError, TypeError):  # TypeError: closed already
            pass
        *lines, self._status_buffer = self._status_buffer.split(b"\n")
        for line in (ln.decode(errors="replace") for ln in lines):
            if line.startswith("fatal "):
                self._fatal.append(line[len("fatal "):])
            else:
                self._said[line] = self._said.get(line, 0) + 1

    def close(self) -> None:
        self._drain_write = _close(self._drain_write)
        self._lifeline_write = _close(self._lifeline_write)
        self._status_read = _close(self._status_read)


class ModelEnd:
    """The model's side. `poll()` returns the drain grace period (seconds) once, when a drain was asked for or
    the launcher is gone; `launcher_gone` says the latter; `report_fatal` tells the launcher the model cannot
    serve any more."""

    def __init__(self, environ=os.environ):
        self._drain = _fd(environ.get(DRAIN_FD))
        self._lifeline = _fd(environ.get(LIFELINE_FD))
        self._status = _fd(environ.get(STATUS_FD))
        self._lock = _hold_shared(environ.get(DRAIN_LOCK_ENV))
        for fd in (self._drain, self._lifeline):
            if fd is not None:  # instances share these files: none may block reading one another saw end
                os.set_blocking(fd, False)
        try:
            self.grace_s = float(environ.get(GRACE_ENV, DEFAULT_GRACE_S))
        except ValueError:
            self.grace_s = DEFAULT_GRACE_S
        self.draining = False
        self.launcher_gone = False  # the lifeline reached end-of-file

    def poll(self, timeout: float = 0.0) -> float | None:
        """Waits up to `timeout` for word from the launcher; the grace period to drain with, the first time."""
        watched = [fd for fd in (self._drain, self._lifeline) if fd is not None]
        if not watched:
            time.sleep(timeout)
            return None
        ready, _, _ = select.select(watched, [], [], timeout)
        for fd in ready:
            if not _at_end(fd):
                continue
            os.close(fd)
            if fd == self._lifeline:
                self._lifeline, self.launcher_gone = None, True
            else:
                self._drain = None
            if not self.draining:
                self.draining = True
                return self.grace_s
        return None

    def stop_watching(self) -> None:
        """After the pipes could not be read: watch them no more (the status pipe stays, to report on), and
        release the drain lock, so that no other instance waits for this one."""
        self._drain = _close(self._drain)
        self._lifeline = _close(self._lifeline)
        self._lock = _close(self._lock)

    def wait_for_every_instance(self, timeout: float) -> bool:
        """After this instance's drain: until every instance of the model has drained too (or timeout), so
        that stopping tritonserver cuts none of their last responses short."""
        if self._lock is None:
            return True
        fcntl.flock(self._lock, fcntl.LOCK_UN)  # this one is done
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no instance holds it shared any more
                fcntl.flock(self._lock, fcntl.LOCK_UN)  # the other instances ask the same
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)

    def report_fatal(self, reason: str) -> None:
        self._report("fatal " + " ".join(reason.split())[:400])

    def report_idle(self) -> None:
        self._report("idle")

    def report_finalizing(self) -> None:
        self._report("finalizing")

    def _report(self, line: str) -> None:
        if self._status is None:
            return
        try:
            os.write(self._status, (line + "\n").encode())  # one short line: written atomically
        except OSError:
            pass


def _at_end(fd: int) -> bool:
    """Whether a pipe nothing is written to has reached end-of-file (its writer closed it, or died)."""
    try:
        return os.read(fd, 1) == b""
    except BlockingIOError:  # not yet
        return False
    except OSError:
        return True


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    return None


def _hold_shared(path: str | None) -> int | None:
    """The drain lock, opened by this instance (its own open file: flock locks belong to one) and held shared."""
    if not path:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd
    except OSError:
        return None


def _fd(value: str | None) -> int | None:
    if not value:
        return None
    try:
        fd = int(value)
        os.fstat(fd)
        return fd
    except (ValueError, OSError):
        return None
