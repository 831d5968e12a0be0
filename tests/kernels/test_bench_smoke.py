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


def test_decode_and_profile_benches_run_on_cpu(tmp_path, subprocess_env):
    """bench/decode.py (random weights made on the device, graphs on and off) and bench/profile_step.py, at a
    tiny size on CPU: what the GPU run calls works end to end."""
    bench = BENCH.parent
    proc = subprocess.run([sys.executable, str(bench / "decode.py"), "--device", "cpu", "--models", "tiny",
                           "--batch", "1", "3", "--prompt-len", "16", "--max-tokens", "6", "--out", str(tmp_path)],
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "decode.json").read_text())["results"]
    assert {(r["cuda_graphs"], r["batch"]) for r in rows} == {(True, 1), (True, 3), (False, 1), (False, 3)}
    assert all(r["step_ms"] > 0 and r["tok_s"] > 0 for r in rows)
    proc = subprocess.run([sys.executable, str(bench / "profile_step.py"), "--device", "cpu", "--model", "tiny",
                           "--batch", "2", "--prompt-len", "16", "--steps", "2", "--out", str(tmp_path)],
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "batch 2" in (tmp_path / "profile.txt").read_text()
