"""Kernel tests run on CUDA when there is a GPU and TRITON_INTERPRET is unset, else on CPU tensors in
Triton's interpreter. TRITON_INTERPRET is read when triton is first imported (and when each @triton.jit
kernel is defined), so it is set here, before that (importing torch does not import triton). Should
triton have been imported earlier without it, the tests that run kernels fail and say so; importing
pagedllm.kernels itself turns the interpreter on for CPU-only torch builds.

The compile tests (test_compile.py) need real JITFunctions, so they compile in subprocesses run with
TRITON_INTERPRET=0. Subprocesses get `subprocess_env`, which puts this checkout's package first.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")


_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # The interpreter converts 1-element arrays with int(); numpy >= 1.25 warns about it on every launch.
    quiet = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(quiet)


@pytest.fixture(scope="session")
def subprocess_env() -> dict:
    """os.environ for a Python subprocess, with this checkout's backend/ first on PYTHONPATH: the tests' own
    process finds it through tests/conftest.py, a subprocess would otherwise import whichever pagedllm is
    installed (an editable install of another checkout or worktree, say) and test that one."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_HERE.parents[1] / "backend"), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def device() -> torch.device:
    if DEVICE.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        from pagedllm.kernels.rms_norm import _rms_norm_kernel

        if not isinstance(_rms_norm_kernel, InterpretedFunction):
            pytest.fail("triton was imported with its interpreter off before tests/kernels/conftest.py could "
                        "set TRITON_INTERPRET=1: run with TRITON_INTERPRET=1 (or tests/kernels first)")
    return DEVICE


@pytest.fixture
def poisoned():
    """`with poisoned(): ...` makes the block's torch.empty / empty_like allocations NaN-filled."""
    return poisoned_allocations


@contextlib.contextmanager
def poisoned_allocations():
    """Inside the block, torch.empty / empty_like return NaN-filled float tensors (and -7 for integers), so
    an output element a kernel forgets to write shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def _poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-7)
        return t

    torch.empty = lambda *a, **k: _poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: _poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like
