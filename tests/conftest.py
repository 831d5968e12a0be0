"""Shared fixtures: tiny checkpoints and real tritonserver instances.

- `tiny_llama_dir` (session): a random-weight Llama-3 style checkpoint (GQA, llama3 rope scaling) with tokenizer.
- `make_tiny` (session): `make_tiny(arch="qwen2", **sizes) -> Path`, built once per distinct arguments.
- `start_server` (function): `with start_server(model_dir, **engine_overrides) as srv:`; see server_utils.
- `llm_server` (session): the project's `llm` model serving `tiny_llama_dir`; a RunningServer
  (grpc_url, http_url, http_address, metrics_url, ports, config, log_tail()).
- `openai_server` (session): the OpenAI-compatible front end in front of `llm_server` (`url`), as
  `pagedllm serve` runs it.
Helpers beside it: engine_utils (make_engine, run_to_completion), server_utils (start_server, free ports),
triton_helpers (tritonclient streams, HTTP generate, metrics), hf_reference (transformers' greedy output).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "backend", ROOT / "client", ROOT / "tests"):  # work from a bare checkout too
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from server_utils import start_openai  # noqa: E402
from server_utils import start_server as _start_server  # noqa: E402


@pytest.fixture(scope="session")
def make_tiny(tmp_path_factory):
    from pagedllm.tiny_model import make_tiny_model

    built = {}

    def make(arch: str = "llama", seed: int = 0, **kwargs) -> Path:
        key = (arch, seed, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = make_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch=arch, seed=seed, **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(make_tiny) -> Path:
    return make_tiny("llama", rope_scaling="llama3")


@pytest.fixture
def start_server(tmp_path):
    """Start servers inside a test; each gets its runtime directory (models, backends, log) under tmp_path."""
    count = [0]

    def start(model_dir, **kwargs):
        count[0] += 1
        kwargs.setdefault("runtime_dir", tmp_path / f"triton-{count[0]}")
        return _start_server(model_dir, **kwargs)

    return start


@pytest.fixture(scope="session")
def llm_server(tiny_llama_dir, tmp_path_factory):
    with _start_server(tiny_llama_dir, runtime_dir=tmp_path_factory.mktemp("llm-server")) as srv:
        yield srv


@pytest.fixture(scope="session")
def openai_server(llm_server, tmp_path_factory):
    with start_openai(llm_server, tmp_path_factory.mktemp("openai") / "openai.log") as frontend:
        yield frontend
