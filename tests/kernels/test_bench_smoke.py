"""bench/kernels.py --smoke --tune runs end to end (tiny shapes; on CPU in the interpreter) and writes its JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


def test_bench_smoke(tmp_path, subprocess_env):
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--tune", "--out", str(tmp_path)],
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "kernels.json").read_text())
    ops = {r["op"] for r in data["results"]}
    assert ops == {"decode_attn", "prefill_attn", "rms_norm+res", "rope+kv_write", "silu_and_mul", "sample"}
    for r in data["results"]:
        assert r["triton_ms"] > 0 and r["torch_ms"] > 0
    assert data["copy_gbps"] > 0
    sample = [r for r in data["results"] if r["op"] == "sample"][0]
    assert sample["max_err"] == 0  # identical tokens
    # the launch-config sweep: each tried variant agreed with the default launch and was timed
    assert sorted(k.split()[0] for k in data["tune"]) == ["decode", "prefill"]
    for case in data["tune"].values():
        assert case["default_ms"] > 0 and len(case["variants"]) == 2
        assert all(v["ms"] > 0 for v in case["variants"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "kernels.png").stat().st_size > 0
