"""Compiles the kernels, with the constexpr combinations the engine launches, for CUDA targets on a machine
without a GPU: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` down to cubin (ptxas
included). The launches come from the same `_plan_*` functions the ops use, fed with `meta` tensors.

Run by test_compile.py in a subprocess with TRITON_INTERPRET=0 (the interpreter replaces @triton.jit
functions, and is decided when triton is imported; unset would turn it on for CPU-only torch builds):
    TRITON_INTERPRET=0 python tests/kernels/compile_worker.py OUT.json [CASE_ID ...]
Importing this module (for CASES) imports neither triton nor the kernels.
"""
from __future__ import annotations

import json
import re
import sys
import time
import traceback

# shared memory per block that a kernel may use (opt-in maximum)
SMEM_LIMIT = {80: 166912, 90: 232448}

# (op, params). Attention: the plan picks the tiles from (head_dim, block_size, GQA group, dtype,
# decode / prefill, split-KV). Covered: every head dim x dtype for decode and for prefill, block sizes 16 and
# 32 and GQA groups 1 / 4 / 8 spread over them, split-KV on two of them (the tile overrides that only tests
# use are left out).
_GROUPS = (4, 1, 8)
_OPS = []
for _mode in ("decode", "prefill"):
    for _i, (_d, _dt) in enumerate((d, dt) for d in (64, 80, 96, 128) for dt in ("float16", "bfloat16")):
        _OPS.append(("attn", dict(mode=_mode, head_dim=_d, group=_GROUPS[_i % 3], dtype=_dt,
                                  block_size=16 if (_i + (_mode == "prefill")) % 2 == 0 else 32)))
_OPS += [
    ("attn", dict(mode="split", head_dim=128, group=4, dtype="float16", block_size=16)),
    ("attn", dict(mode="split", head_dim=80, group=8, dtype="bfloat16", block_size=32)),
    ("rms_norm", dict(dtype="bfloat16", hidden=4096, residual=True)),
    ("rms_norm", dict(dtype="float16", hidden=8192, residual=False)),
    ("silu_and_mul", dict(dtype="bfloat16", inter=14336)),
    # positions and slot_mapping: int32 as the engine passes them, int64 as the op also takes them
    ("rope_kv", dict(dtype="float16", head_dim=128, heads=32, kv_heads=8, index="int32")),
    ("rope_kv", dict(dtype="bfloat16", head_dim=80, heads=24, kv_heads=8, index="int64")),
    ("sample", dict(vocab=128256)),
]
_SHORT = {"head_dim": "d", "group": "g", "block_size": "bs", "hidden": "h", "inter": "i", "heads": "h",
          "kv_heads": "kv", "vocab": "v"}


def _case_id(cc, op, p):
    parts = []
    for k, v in p.items():
        if isinstance(v, bool):
            parts.append(k if v else f"no{k}")
        else:
            parts.append(f"{_SHORT.get(k, '')}{v}".replace("bfloat16", "bf16").replace("float16", "fp16"))
    return f"sm{cc}-{op}-" + "-".join(parts)


CASES = {_case_id(cc, op, p): (cc, op, p) for cc in (90, 80) for op, p in _OPS}


def build(op, p, cc=90):
    """The planned launches for one case (imports the kernels: call with TRITON_INTERPRET=0)."""
    import torch

    M = "meta"
    dt = getattr(torch, p.get("dtype", "float32"))
    i32, i64 = torch.int32, torch.int64
    if op == "attn":
        from pagedllm.kernels.paged_attention import _plan_paged_attention

        D, G, BS = p["head_dim"], p["group"], p["block_size"]
        KVH = 8
        H = KVH * G
        B = 4
        T = B if p["mode"] != "prefill" else 2048
        q = torch.empty(T, H, D, dtype=dt, device=M)
        kc = torch.empty(1000, BS, KVH, D, dtype=dt, device=M)
        launches, _ = _plan_paged_attention(
            q, kc, torch.empty_like(kc), torch.empty(B, 256, dtype=i32, device=M),
            torch.empty(B + 1, dtype=i32, device=M), torch.empty(B, dtype=i32, device=M), D ** -0.5,
            max_query_len=1 if p["mode"] != "prefill" else 2048, max_seq_len=4096,
            split_kv=p["mode"] == "split", sm_count=132, smem=SMEM_LIMIT[cc])
        return launches
    if op == "rms_norm":
        from pagedllm.kernels.rms_norm import _plan_rms_norm

        x = torch.empty(16, p["hidden"], dtype=dt, device=M)
        return _plan_rms_norm(x, torch.empty(p["hidden"], dtype=dt, device=M), 1e-5,
                              torch.empty_like(x) if p["residual"] else None)[0]
    if op == "silu_and_mul":
        from pagedllm.kernels.activation import _plan_silu_and_mul

        return _plan_silu_and_mul(torch.empty(16, 2 * p["inter"], dtype=dt, device=M))[0]
    if op == "rope_kv":
        from pagedllm.kernels.rope_kv_write import _plan_rope_and_write_kv

        D, H, KVH = p["head_dim"], p["heads"], p["kv_heads"]
        qkv = torch.empty(16, (H + 2 * KVH) * D, dtype=dt, device=M)
        q, k, v = (t.view(16, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], dim=-1))
        cache = torch.empty(100, 16, KVH, D, dtype=dt, device=M)
        index = getattr(torch, p["index"])
        return _plan_rope_and_write_kv(q, k, v, torch.empty(16, dtype=index, device=M),
                                       torch.empty(8192, D, device=M), cache, torch.empty_like(cache),
                                       torch.empty(16, dtype=index, device=M))
    if op == "sample":
        from pagedllm.kernels.sampling import _plan_sample

        B, V = 64, p["vocab"]
        f = torch.empty(B, device=M)
        return _plan_sample(torch.empty(B, V, device=M), f, torch.empty(B, dtype=i32, device=M), f,
                            torch.empty(B, dtype=i64, device=M), torch.empty(B, dtype=i64, device=M))[0]
    raise ValueError(op)


def run_case(case_id):
    from pagedllm.kernels._triton_util import compile_launch

    cc, op, p = CASES[case_id]
    t0 = time.time()
    try:
        kernels = []
        for ln in build(op, p, cc):
            c = compile_launch(ln, cc)
            assert "cubin" in c.asm and len(c.asm["cubin"]) > 0
            kernels.append({"name": ln.kernel.fn.__name__, "shared": c.metadata.shared,
                            "num_warps": c.metadata.num_warps,
                            # fp16 FMAs: rounding that differs from a multiply-then-add reference
                            "f16_fma": len(re.findall(r"\bfma\.rn\S*\.f16(x2)?\b", c.asm.get("ptx", "")))})
        return {"ok": True, "kernels": kernels, "seconds": round(time.time() - t0, 2)}
    except Exception:
        return {"ok": False, "error": traceback.format_exc()[-4000:], "seconds": round(time.time() - t0, 2)}


def main(argv):
    import os

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("compile_worker.py must run with TRITON_INTERPRET=0")
    os.environ.setdefault("TRITON_INTERPRET", "0")
    out, ids = argv[0], argv[1:] or list(CASES)
    results = {i: run_case(i) for i in ids}
    with open(out, "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
