"""The OpenAI-compatible front end as a child process beside tritonserver (`pagedllm serve` starts one by
default): started once Triton is ready, checked through its /health, stopped with the server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..openai_api.server import PARENT_PID_ENV
from .locate import LauncherError, python_environment
from .process import port_is_free


class OpenAIFrontend:
    def __init__(self, *, triton_grpc_url: str, model_dir: str, port: int, host: str = "0.0.0.0",
                 served_model_name: str | None = None, api_key: str | None = None, metrics_url: str | None = None,
                 max_model_len: int = 0, max_request_bytes: int | None = None, log_path: Path | None = None,
                 env: dict[str, str] | None = None):
        self.port = port
        self.api_key = api_key
        self.command = [sys.executable, "-m", "pagedllm.openai_api.server", "--triton-url", triton_grpc_url,
                        "--model-dir", model_dir, "--host", host, "--port", str(port)]
        if served_model_name:
            self.command += ["--served-model-name", served_model_name]
        if metrics_url:
            self.command += ["--metrics-url", metrics_url]
        if max_model_len:
            self.command += ["--max-model-len", str(max_model_len)]
        if max_request_bytes:
            self.command += ["--max-request-bytes", str(max_request_bytes)]
        self.env = dict(env if env is not None else python_environment())
        if api_key:  # through the environment, not the command line (which `ps` shows)
            self.env["PAGEDLLM_API_KEY"] = api_key
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OpenAIFrontend":
        if not port_is_free(self.port):
            raise LauncherError(f"port {self.port} (OpenAI API) already in use")
        self._log = open(self.log_path, "ab") if self.log_path else None
        # The child asks for a parent-death signal itself (openai_api.server.die_with_parent). That signal comes
        # when the thread that started the child ends: start front ends from the main thread.
        self.process = subprocess.Popen(self.command, env={**self.env, PARENT_PID_ENV: str(os.getpid())},
                                        stdin=subprocess.DEVNULL, stdout=self._log or None,
                                        stderr=subprocess.STDOUT if self._log else None)
        return self

    def wait_ready(self, timeout: float = 120.0, healthy: bool = True) -> "OpenAIFrontend":
        """Until /health says 200 (Triton's model is ready too); healthy=False: until it answers at all."""
        deadline = time.monotonic() + timeout
        while (status := self._health()) is None or (healthy and status != 200):
            if self.process.poll() is not None:
                raise LauncherError(f"the OpenAI front end exited with code {self.process.returncode}"
                                    + (f" (log: {self.log_path})" if self.log_path else ""))
            if time.monotonic() > deadline:
                raise LauncherError(f"the OpenAI front end is not healthy after {timeout:.0f}s")
            time.sleep(0.2)
        return self

    def _health(self) -> int | None:
        """/health's status, or None when nothing answers."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return None

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 10.0) -> int | None:
        proc, self.process = self.process, None
        rc = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # uvicorn: stop accepting, close open streams, exit
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            rc = proc.returncode
        if self._log:
            self._log.close()
            self._log = None
        return rc
