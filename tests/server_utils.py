"""Start a real tritonserver for a test: free ports, test-sized engine settings, and the log when it fails.

A test that needs a server fails (never skips) when the server cannot start: `start_server` raises
ServerError with the errors from the server's log.
"""
from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from pagedllm.config import EngineConfig
from pagedllm.server import LauncherError, TritonServer
from pagedllm.server.frontend import OpenAIFrontend

# Small KV cache by default: 0 would size it from 90% of a GPU's memory, slow and unfriendly to other tests.
TEST_ENGINE_DEFAULTS = {"num_kv_blocks": 256, "max_num_seqs": 16}
READY_TIMEOUT_S = float(os.environ.get("PAGEDLLM_TEST_READY_TIMEOUT", "300"))


def cli_env(cache_dir) -> dict[str, str]:
    """Environment for running `python -m pagedllm.cli` in a subprocess: the package importable without an
    install, and its cache (default checkpoint, runtime directories) under `cache_dir`."""
    backend = str(Path(__file__).resolve().parents[1] / "backend")
    path = os.pathsep.join(p for p in (backend, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PAGEDLLM_CACHE": str(cache_dir)}


def free_ports(n: int = 3) -> list[int]:
    """n distinct ports that are free now (all held open together, so the kernel gives different ones)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("0.0.0.0", 0))  # tritonserver binds 0.0.0.0
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class RunningServer:
    """What a test needs to talk to the server. URLs are in the form each client library takes."""

    server: TritonServer
    config: EngineConfig
    http_port: int
    grpc_port: int
    metrics_port: int
    http_url: str = field(init=False)  # "http://127.0.0.1:P" for requests / urllib
    http_address: str = field(init=False)  # "127.0.0.1:P" for tritonclient.http
    grpc_url: str = field(init=False)  # "127.0.0.1:P" for tritonclient.grpc
    metrics_url: str = field(init=False)  # "http://127.0.0.1:P/metrics"

    def __post_init__(self):
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.http_address = f"127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def model_dir(self) -> Path:
        return Path(self.config.model_dir)

    @property
    def log_path(self) -> Path:
        return self.server.log_path

    def log_tail(self, lines: int = 60) -> str:
        return self.server.log_tail(lines)

    def is_alive(self) -> bool:
        return self.server.poll() is None


@contextlib.contextmanager
def start_server(model_dir, *, model_repository=None, runtime_dir=None, parameters=None,
                 ready_timeout: float = READY_TIMEOUT_S, **engine_overrides):
    """Run a server on free ports until the block ends; yields a RunningServer.

    `engine_overrides` are EngineConfig fields (over TEST_ENGINE_DEFAULTS; $PAGEDLLM_TEST_DEVICE sets `device`).
    `model_repository` replaces the project's repository; `parameters` adds config.pbtxt string parameters.
    """
    settings = dict(TEST_ENGINE_DEFAULTS)
    if os.environ.get("PAGEDLLM_TEST_DEVICE"):
        settings["device"] = os.environ["PAGEDLLM_TEST_DEVICE"]
    settings.update(engine_overrides)
    config = EngineConfig(model_dir=str(model_dir), **settings)
    for attempt in range(3):  # another process may take a port between our pick and the server's bind
        http, grpc, metrics = free_ports(3)
        server = TritonServer(config, http_port=http, grpc_port=grpc, metrics_port=metrics,
                              model_repository=model_repository, runtime_dir=runtime_dir, parameters=parameters)
        try:
            server.start()
            break
        except LauncherError as e:
            server.stop()
            if "already in use" not in str(e) or attempt == 2:
                raise
    try:
        server.wait_ready(ready_timeout)
        yield RunningServer(server, config, http, grpc, metrics)
    finally:
        alive = server.poll() is None
        rc = server.stop()
        if not alive:  # it died during the test: show why in the test's output
            print(f"tritonserver had exited (code {rc}); last lines of {server.log_path}:\n{server.log_tail(60)}")


@contextlib.contextmanager
def start_openai(server: RunningServer, log_path: Path, **kwargs):
    """The OpenAI front end (as `pagedllm serve` starts it) in front of a running server; yields it (`url`,
    `api_key`). kwargs: served_model_name, api_key, triton_grpc_url and model_dir (default: the server's)."""
    kwargs.setdefault("triton_grpc_url", server.grpc_url)
    kwargs.setdefault("model_dir", str(server.model_dir))
    frontend = OpenAIFrontend(port=free_ports(1)[0], metrics_url=server.metrics_url, log_path=log_path, **kwargs)
    frontend.start()
    try:
        if kwargs["triton_grpc_url"] == server.grpc_url:
            frontend.wait_ready(READY_TIMEOUT_S)
        yield frontend
    finally:
        frontend.stop()
