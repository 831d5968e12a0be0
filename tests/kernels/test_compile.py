"""Every kernel compiles for sm_80 and sm_90 (to cubin, ptxas included) with the engine's constexpr
combinations, on this machine, GPU or not, and fits the target's shared memory.

The compiles run in two subprocesses (one per core) with TRITON_INTERPRET=0: under the
interpreter @triton.jit yields interpreted functions, which triton.compile cannot take, and the flag is
read when the kernel modules are imported, which this process has already done (or will) with it set.
They use a fresh TRITON_CACHE_DIR so that each run really compiles.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_WORKER = Path(__file__).with_name("compile_worker.py")
_spec = importlib.util.spec_from_file_location("_pagedllm_compile_worker", _WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, subprocess_env):
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.fail("this triton build has no NVIDIA backend: the sm_80/sm_90 compile checks cannot run")
    tmp = tmp_path_factory.mktemp("compile")
    env = dict(subprocess_env, TRITON_INTERPRET="0")  # "0", not unset: unset means "on" for CPU-only torch builds
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")
    ids = list(worker.CASES)
    n_proc = max(1, min(2, os.cpu_count() or 1))
    procs = []
    for i in range(n_proc):
        out = tmp / f"results{i}.json"
        procs.append((out, subprocess.Popen([sys.executable, str(_WORKER), str(out), *ids[i::n_proc]], env=env,
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    results = {}
    for out, proc in procs:
        try:
            log, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 0, log[-4000:]
        results.update(json.loads(out.read_text()))
    return results


@pytest.mark.parametrize("case_id", list(worker.CASES))
def test_compiles(compiled, case_id):
    res = compiled[case_id]
    assert res["ok"], res["error"]
    cc = worker.CASES[case_id][0]
    for k in res["kernels"]:
        assert k["shared"] <= worker.SMEM_LIMIT[cc], f"{k['name']} needs {k['shared']} bytes of shared memory"


@pytest.mark.parametrize("case_id", [c for c in worker.CASES if "rope_kv" in c and "-fp16-" in c])
def test_rope_rounds_each_product(compiled, case_id):
    """The fused rope must round like its reference (test_rope_kv_write.py::test_matches_reference_rounding, which
    the GPU compiler broke on an H200 by contracting the products and the sum into fp16x2 FMAs): it is launched
    with fp fusion off, so the PTX has no fp16 FMA."""
    assert [k["f16_fma"] for k in compiled[case_id]["kernels"]] == [0]
