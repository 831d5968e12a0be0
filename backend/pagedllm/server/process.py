"""One tritonserver process for pagedllm: a runtime directory (backend directory, model repository copy with
the engine's settings, the server log), the command line, start, readiness, and an orderly stop.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from pagedllm.config import EngineConfig
from pagedllm.model.spec import check_checkpoint

from .locate import LauncherError, cache_root, prepare_backend_directory, project_model_repository, server_environment
from .repository import prepare_model_repository

_ERROR_LINE = re.compile(rb"E\d{4} |error: ")  # glog error lines and "error: creating server"


class ServerError(RuntimeError):
    """tritonserver exited or did not become ready; the message ends with the last lines of its log."""


def _prune_stale_runs(root: Path) -> None:
    """Remove run-<pid>-* directories left by processes that no longer exist (killed runs)."""
    for d in root.glob("run-*-*"):
        try:
            pid = int(d.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, PermissionError, IndexError):
            pass


def port_is_free(port: int, host: str = "0.0.0.0") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launching thread dies, so no server is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class TritonServer:
    """One tritonserver process. `with TritonServer(cfg) as s:` starts it and waits until it is ready.

    `model_repository` replaces the project's repository (tests use a throwaway one); `parameters` are extra
    config.pbtxt string parameters on top of the EngineConfig's. `echo` copies the server log to stdout.
    """

    def __init__(self, engine_config: EngineConfig, *, http_port: int = 8000, grpc_port: int = 8001,
                 metrics_port: int = 8002, model_repository=None, parameters: dict[str, str] | None = None,
                 runtime_dir=None, log_verbose: int = 0, exit_timeout_s: int = 5, echo: bool = False,
                 extra_args: list[str] | tuple[str, ...] = (), check_model: bool = True):
        self.engine_config = engine_config
        self.http_port, self.grpc_port, self.metrics_port = http_port, grpc_port, metrics_port
        self.source_repository = Path(model_repository) if model_repository else None
        self.parameters = dict(parameters or {})
        self.log_verbose, self.exit_timeout_s, self.echo = log_verbose, exit_timeout_s, echo
        self.extra_args = list(extra_args)
        self.check_model = check_model
        self._own_runtime_dir = runtime_dir is None
        self.runtime_dir = Path(runtime_dir) if runtime_dir else None
        self.process: subprocess.Popen | None = None
        self.command: list[str] = []
        self.env: dict[str, str] = {}
        self._log_handle = None
        self._tee: threading.Thread | None = None

    # paths and urls
    @property
    def model_repository(self) -> Path:
        return self.runtime_dir / "models"

    @property
    def log_path(self) -> Path:
        return self.runtime_dir / "tritonserver.log"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _absolute_model_dir(self) -> str:
        model_dir = self.engine_config.model_dir
        if self.check_model:
            return str(check_checkpoint(model_dir))
        return str(Path(model_dir).expanduser().absolute()) if model_dir else ""

    def prepare(self) -> list[str]:
        """Build the runtime directory and the command line (no process yet); return the command."""
        if self.command:
            return self.command
        # A copy with the checkpoint's absolute path: the caller's config stays as it was.
        cfg = dataclasses.replace(self.engine_config, model_dir=self._absolute_model_dir())
        if self.runtime_dir is None:
            root = cache_root()
            root.mkdir(parents=True, exist_ok=True)
            _prune_stale_runs(root)
            self.runtime_dir = Path(tempfile.mkdtemp(prefix=f"run-{os.getpid()}-", dir=root))
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        binary, backends, lib_dirs = prepare_backend_directory(self.runtime_dir)
        source = self.source_repository or project_model_repository()
        prepare_model_repository(source, self.model_repository, {**cfg.to_strings(), **self.parameters})
        self.env = server_environment(lib_dirs)
        # Each server its own shared-memory names, so servers side by side (tests) never collide.
        shm_prefix = f"pagedllm{os.getpid()}-{secrets.token_hex(4)}"
        self.command = [
            str(binary), "--model-repository", str(self.model_repository), "--backend-directory", str(backends),
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port), "--log-verbose", str(self.log_verbose),
            "--exit-timeout-secs", str(self.exit_timeout_s),
            "--backend-config", f"python,shm-region-prefix-name={shm_prefix}", *self.extra_args,
        ]
        return self.command

    def start(self) -> "TritonServer":
        command = self.prepare()
        taken = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if not port_is_free(p)]
        if taken:  # else a server already there could answer our readiness probe
            raise LauncherError(f"port(s) {', '.join(map(str, taken))} already in use")
        self._log_handle = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            command, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.echo else self._log_handle, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, and we stop the server in order
            preexec_fn=_die_with_parent,
        )
        if self.echo:
            self._tee = threading.Thread(target=self._copy_output, daemon=True)
            self._tee.start()
        return self

    def _copy_output(self) -> None:
        for line in iter(self.process.stdout.readline, b""):
            self._log_handle.write(line)
            self._log_handle.flush()
            sys.stdout.buffer.write(line)
            sys.stdout.flush()

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(deque(f, maxlen=lines)).decode("utf-8", "replace")
        except OSError:
            return ""

    def log_errors(self, lines: int = 10) -> str:
        """The log's last error lines (`E1127 ...`): a model's load failure is there, not at the very end."""
        try:
            with open(self.log_path, "rb") as f:
                errors = deque((ln for ln in f if _ERROR_LINE.match(ln)), maxlen=lines)
        except OSError:
            return ""
        return b"".join(errors).decode("utf-8", "replace")

    def _failure(self, what: str) -> ServerError:
        if self._tee:
            self._tee.join(timeout=2)
        return ServerError(f"{what}; errors in {self.log_path}:\n{self.log_errors()}\nlast lines:\n"
                           + self.log_tail(20))

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 300.0) -> "TritonServer":
        deadline = time.monotonic() + timeout
        while True:
            rc = self.poll()
            if rc is not None:
                raise self._failure(f"tritonserver exited with code {rc} before it was ready")
            if self.is_ready():
                return self
            if time.monotonic() > deadline:
                raise self._failure(f"tritonserver not ready after {timeout:.0f}s")
            time.sleep(0.25)

    def stop(self) -> int | None:
        """SIGINT (graceful unload), then SIGTERM, then SIGKILL to the whole group; returns the exit code."""
        proc, rc = self.process, None
        if proc is not None:
            steps = ((signal.SIGINT, self.exit_timeout_s + 30), (signal.SIGTERM, 10))
            for sig, wait_s in steps:
                if proc.poll() is not None:
                    break
                proc.send_signal(sig)
                try:
                    proc.wait(wait_s)
                except subprocess.TimeoutExpired:
                    continue
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the stubs too (same process group)
                except ProcessLookupError:
                    pass
                proc.wait()
            rc = proc.returncode
            if self._tee:
                self._tee.join(timeout=5)
            self.process = None
        if self._log_handle:
            self._log_handle.close()
            self._log_handle = None
        if self._own_runtime_dir and self.runtime_dir and rc == 0:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)  # kept after a failure, for its log
        return rc

    def __enter__(self) -> "TritonServer":
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
