"""TRITON_OPS mirrors TORCH_OPS; how the ops find (or miss) Triton's interpreter on CPU tensors."""
from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch

from pagedllm.kernels import TORCH_OPS, get_ops


def test_same_names_and_signatures():
    tri = get_ops("triton")
    assert tri.name == "triton"
    names = {k for k in vars(TORCH_OPS) if k != "name"}
    assert names == {k for k in vars(tri) if k != "name"}
    for name in names:
        ref = list(inspect.signature(getattr(TORCH_OPS, name)).parameters.values())
        got = list(inspect.signature(getattr(tri, name)).parameters.values())
        assert [p.name for p in got[:len(ref)]] == [p.name for p in ref], name
        for p_ref, p in zip(ref, got):
            assert p.default == p_ref.default, (name, p.name)
        for p in got[len(ref):]:  # extras are keyword-only with defaults
            assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty


def _run_py(base_env, code, **env_changes):
    env = {k: v for k, v in base_env.items() if k != "TRITON_INTERPRET"}
    env.update(env_changes)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None,
                    reason="only CPU-only torch builds turn the interpreter on by themselves")
def test_cpu_only_build_enables_interpreter_on_import(subprocess_env):
    """With TRITON_INTERPRET unset, importing the kernels on a CPU-only torch build turns the interpreter on
    (before triton loads), so the Triton ops run on CPU tensors whatever imported pagedllm.kernels first."""
    proc = _run_py(subprocess_env, """
        import os, torch
        from pagedllm.kernels import rms_norm as m
        assert os.environ["TRITON_INTERPRET"] == "1"
        x, w = torch.randn(3, 40), torch.rand(40)
        torch.testing.assert_close(m.rms_norm_triton(x, w, 1e-6), m.rms_norm_torch(x, w, 1e-6))
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_cpu_tensors_without_interpreter_raise_a_clear_error(subprocess_env):
    proc = _run_py(subprocess_env, """
        import torch
        from pagedllm.kernels import rms_norm as m
        try:
            m.rms_norm_triton(torch.randn(3, 40), torch.rand(40), 1e-6)
        except RuntimeError as e:
            assert "TRITON_INTERPRET=1" in str(e), e
            print("ok")
    """, TRITON_INTERPRET="0")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
