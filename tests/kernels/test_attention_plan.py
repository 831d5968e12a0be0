"""What `_plan_paged_attention` launches for a few representative inputs, pinned to the launches the planner made
before it was split into its decisions (input checks, tiles, split-KV, launch list): same grid, warps, stages,
constexprs and scalar arguments, same scratch sizes.

The planner chooses GPU tiles only when the kernels are compiled ones, and the interpreter's small tiles under
TRITON_INTERPRET=1 (decided when triton is imported), so each mode plans in a subprocess of its own, on `meta`
tensors with the device limits given (sm_count=132 and 227 KB of shared memory, an H100 / H200).
Run as a script (`TRITON_INTERPRET=0 python test_attention_plan.py`) it prints the summaries as JSON.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

SM90 = dict(sm_count=132, smem=232448)

# id: (dtype, group, T, B, max_query_len, extra planner arguments); 8 KV heads, head dim 128, block size 16,
# block tables of 256 blocks, max_seq_len 4096 unless the case says otherwise
CASES = {
    "decode-fp16-sm90": ("float16", 4, 4, 4, 1, dict(SM90)),
    "decode-fp16-sm90-split-auto-count": ("float16", 4, 4, 4, 1, dict(SM90, split_kv=True)),
    "decode-fp16-sm90-split3": ("float16", 4, 4, 4, 1, dict(SM90, split_kv=True, num_splits=3)),
    "decode-fp16-64KB-smem": ("float16", 4, 4, 4, 1, dict(sm_count=132, smem=65536)),
    "decode-fp32-sm90": ("float32", 1, 4, 4, 1, dict(SM90)),
    "prefill-bf16-sm90": ("bfloat16", 4, 2048, 4, 2048, dict(SM90)),
    "prefill-fp32-sm90": ("float32", 8, 300, 2, 200, dict(SM90)),
    "mixed-bf16-nohints": ("bfloat16", 1, 100, 4, None, dict(SM90, max_seq_len=None)),
}


def plan_summaries() -> dict:
    """{case id: [one dict per launch]} from the planner (imports the kernels)."""
    import torch

    from pagedllm.kernels.paged_attention import _plan_paged_attention

    m, i32 = "meta", torch.int32
    res = {}
    for case_id, (dtype, group, T, B, max_query_len, extra) in CASES.items():
        kvh, d = 8, 128
        dt = getattr(torch, dtype)
        q = torch.empty(T, kvh * group, d, dtype=dt, device=m)
        kc = torch.empty(1000, 16, kvh, d, dtype=dt, device=m)
        kw = dict(dict(max_query_len=max_query_len, max_seq_len=4096), **extra)
        launches, out = _plan_paged_attention(
            q, kc, torch.empty_like(kc), torch.empty(B, 256, dtype=i32, device=m),
            torch.empty(B + 1, dtype=i32, device=m), torch.empty(B, dtype=i32, device=m), d ** -0.5, **kw)
        res[case_id] = [_summary(ln, out) for ln in launches]
    return res


def _summary(ln, out) -> str:
    """One launch as text: kernel, grid, warps, stages, constexprs | scalar arguments | scratch sizes ("out" where
    the argument is the output tensor itself: the unused partials of an unsplit launch)."""
    import torch

    tensors = {k: v for k, v in ln.args.items() if isinstance(v, torch.Tensor)}
    grid = "x".join(str(int(g)) for g in ln.grid)
    head = f"{ln.kernel.fn.__name__} grid={grid} warps={ln.num_warps} stages={ln.num_stages}"
    consts = " ".join(f"{k}={ln.args[k]}" for k in ln.constexprs)
    scalars = " ".join(f"{k}={v!r}" for k, v in ln.args.items() if k not in ln.constexprs and k not in tensors)
    partials = " ".join(f"{k}={'out' if v is out else v.numel()}" for k, v in tensors.items()
                        if k.startswith("part_"))
    return f"{head} {consts} | {scalars} | {partials}"


EXPECTED = {
    "gpu": {
        "decode-fp16-sm90": [
            '_paged_attn_kernel grid=32x1 warps=4 stages=2 HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=4 '
            'BLOCK_M=16 BLOCK_Q=1 TILE_N=128 SPLIT=False FP32_DOT=False | scale_log2=0.12751743082459868 '
            'num_seqs=4 num_splits=1 num_q_tiles=4 num_kv_heads=8 stride_qt=4096 stride_qh=128 stride_ot=4096 '
            'stride_oh=128 stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=out '
            'part_l_ptr=out part_acc_ptr=out',
        ],
        "decode-fp16-sm90-split-auto-count": [
            '_paged_attn_kernel grid=32x8 warps=4 stages=2 HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=4 '
            'BLOCK_M=16 BLOCK_Q=1 TILE_N=128 SPLIT=True FP32_DOT=False | scale_log2=0.12751743082459868 '
            'num_seqs=4 num_splits=8 num_q_tiles=4 num_kv_heads=8 stride_qt=4096 stride_qh=128 stride_ot=4096 '
            'stride_oh=128 stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=1024 '
            'part_l_ptr=1024 part_acc_ptr=131072',
            '_paged_attn_reduce_kernel grid=4x32 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 SPLITS_P=8 | '
            'num_heads=32 num_splits=8 stride_ot=4096 stride_oh=128 | part_m_ptr=1024 part_l_ptr=1024 '
            'part_acc_ptr=131072',
        ],
        "decode-fp16-sm90-split3": [
            '_paged_attn_kernel grid=32x3 warps=4 stages=2 HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=4 '
            'BLOCK_M=16 BLOCK_Q=1 TILE_N=128 SPLIT=True FP32_DOT=False | scale_log2=0.12751743082459868 '
            'num_seqs=4 num_splits=3 num_q_tiles=4 num_kv_heads=8 stride_qt=4096 stride_qh=128 stride_ot=4096 '
            'stride_oh=128 stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=384 '
            'part_l_ptr=384 part_acc_ptr=49152',
            '_paged_attn_reduce_kernel grid=4x32 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 SPLITS_P=4 | '
            'num_heads=32 num_splits=3 stride_ot=4096 stride_oh=128 | part_m_ptr=384 part_l_ptr=384 '
            'part_acc_ptr=49152',
        ],
        "decode-fp16-64KB-smem": [
            '_paged_attn_kernel grid=32x1 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=4 '
            'BLOCK_M=16 BLOCK_Q=1 TILE_N=64 SPLIT=False FP32_DOT=False | scale_log2=0.12751743082459868 '
            'num_seqs=4 num_splits=1 num_q_tiles=4 num_kv_heads=8 stride_qt=4096 stride_qh=128 stride_ot=4096 '
            'stride_oh=128 stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=out '
            'part_l_ptr=out part_acc_ptr=out',
        ],
        "decode-fp32-sm90": [
            '_paged_attn_kernel grid=32x1 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=1 '
            'BLOCK_M=16 BLOCK_Q=1 TILE_N=64 SPLIT=False FP32_DOT=True | scale_log2=0.12751743082459868 num_seqs=4'
            ' num_splits=1 num_q_tiles=4 num_kv_heads=8 stride_qt=1024 stride_qh=128 stride_ot=1024 stride_oh=128'
            ' stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=out part_l_ptr=out '
            'part_acc_ptr=out',
        ],
        "prefill-bf16-sm90": [
            '_paged_attn_kernel grid=1056x1 warps=4 stages=2 HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=4 '
            'BLOCK_M=64 BLOCK_Q=16 TILE_N=64 SPLIT=False FP32_DOT=False | scale_log2=0.12751743082459868 '
            'num_seqs=4 num_splits=1 num_q_tiles=132 num_kv_heads=8 stride_qt=4096 stride_qh=128 stride_ot=4096 '
            'stride_oh=128 stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=out '
            'part_l_ptr=out part_acc_ptr=out',
        ],
        "prefill-fp32-sm90": [
            '_paged_attn_kernel grid=312x1 warps=8 stages=2 HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=8 '
            'BLOCK_M=64 BLOCK_Q=8 TILE_N=32 SPLIT=False FP32_DOT=True | scale_log2=0.12751743082459868 num_seqs=2'
            ' num_splits=1 num_q_tiles=39 num_kv_heads=8 stride_qt=8192 stride_qh=128 stride_ot=8192 '
            'stride_oh=128 stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=out '
            'part_l_ptr=out part_acc_ptr=out',
        ],
        "mixed-bf16-nohints": [
            '_paged_attn_kernel grid=40x1 warps=4 stages=2 HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=1 '
            'BLOCK_M=64 BLOCK_Q=64 TILE_N=64 SPLIT=False FP32_DOT=False | scale_log2=0.12751743082459868 '
            'num_seqs=4 num_splits=1 num_q_tiles=5 num_kv_heads=8 stride_qt=1024 stride_qh=128 stride_ot=1024 '
            'stride_oh=128 stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=out '
            'part_l_ptr=out part_acc_ptr=out',
        ],
    },
    "interpreter": {
        "decode-fp16-sm90": [
            '_paged_attn_kernel grid=32x1 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=4 '
            'BLOCK_M=16 BLOCK_Q=1 TILE_N=16 SPLIT=False FP32_DOT=False | scale_log2=0.12751743082459868 '
            'num_seqs=4 num_splits=1 num_q_tiles=4 num_kv_heads=8 stride_qt=4096 stride_qh=128 stride_ot=4096 '
            'stride_oh=128 stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=out '
            'part_l_ptr=out part_acc_ptr=out',
        ],
        "decode-fp16-sm90-split-auto-count": [
            '_paged_attn_kernel grid=32x8 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=4 '
            'BLOCK_M=16 BLOCK_Q=1 TILE_N=16 SPLIT=True FP32_DOT=False | scale_log2=0.12751743082459868 num_seqs=4'
            ' num_splits=8 num_q_tiles=4 num_kv_heads=8 stride_qt=4096 stride_qh=128 stride_ot=4096 stride_oh=128'
            ' stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=1024 part_l_ptr=1024 '
            'part_acc_ptr=131072',
            '_paged_attn_reduce_kernel grid=4x32 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 SPLITS_P=8 | '
            'num_heads=32 num_splits=8 stride_ot=4096 stride_oh=128 | part_m_ptr=1024 part_l_ptr=1024 '
            'part_acc_ptr=131072',
        ],
        "decode-fp16-sm90-split3": [
            '_paged_attn_kernel grid=32x3 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=4 '
            'BLOCK_M=16 BLOCK_Q=1 TILE_N=16 SPLIT=True FP32_DOT=False | scale_log2=0.12751743082459868 num_seqs=4'
            ' num_splits=3 num_q_tiles=4 num_kv_heads=8 stride_qt=4096 stride_qh=128 stride_ot=4096 stride_oh=128'
            ' stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=384 part_l_ptr=384 '
            'part_acc_ptr=49152',
            '_paged_attn_reduce_kernel grid=4x32 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 SPLITS_P=4 | '
            'num_heads=32 num_splits=3 stride_ot=4096 stride_oh=128 | part_m_ptr=384 part_l_ptr=384 '
            'part_acc_ptr=49152',
        ],
        "decode-fp16-64KB-smem": [
            '_paged_attn_kernel grid=32x1 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=4 '
            'BLOCK_M=16 BLOCK_Q=1 TILE_N=16 SPLIT=False FP32_DOT=False | scale_log2=0.12751743082459868 '
            'num_seqs=4 num_splits=1 num_q_tiles=4 num_kv_heads=8 stride_qt=4096 stride_qh=128 stride_ot=4096 '
            'stride_oh=128 stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=out '
            'part_l_ptr=out part_acc_ptr=out',
        ],
        "decode-fp32-sm90": [
            '_paged_attn_kernel grid=32x1 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=1 '
            'BLOCK_M=16 BLOCK_Q=1 TILE_N=16 SPLIT=False FP32_DOT=True | scale_log2=0.12751743082459868 num_seqs=4'
            ' num_splits=1 num_q_tiles=4 num_kv_heads=8 stride_qt=1024 stride_qh=128 stride_ot=1024 stride_oh=128'
            ' stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=out part_l_ptr=out '
            'part_acc_ptr=out',
        ],
        "prefill-bf16-sm90": [
            '_paged_attn_kernel grid=4128x1 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=4'
            ' BLOCK_M=16 BLOCK_Q=4 TILE_N=16 SPLIT=False FP32_DOT=True | scale_log2=0.12751743082459868 '
            'num_seqs=4 num_splits=1 num_q_tiles=516 num_kv_heads=8 stride_qt=4096 stride_qh=128 stride_ot=4096 '
            'stride_oh=128 stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=out '
            'part_l_ptr=out part_acc_ptr=out',
        ],
        "prefill-fp32-sm90": [
            '_paged_attn_kernel grid=1216x1 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=8'
            ' BLOCK_M=16 BLOCK_Q=2 TILE_N=16 SPLIT=False FP32_DOT=True | scale_log2=0.12751743082459868 '
            'num_seqs=2 num_splits=1 num_q_tiles=152 num_kv_heads=8 stride_qt=8192 stride_qh=128 stride_ot=8192 '
            'stride_oh=128 stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=out '
            'part_l_ptr=out part_acc_ptr=out',
        ],
        "mixed-bf16-nohints": [
            '_paged_attn_kernel grid=80x1 warps=4 stages=None HEAD_DIM=128 HEAD_DIM_P=128 BLOCK_SIZE=16 GROUP=1 '
            'BLOCK_M=16 BLOCK_Q=16 TILE_N=16 SPLIT=False FP32_DOT=True | scale_log2=0.12751743082459868 '
            'num_seqs=4 num_splits=1 num_q_tiles=10 num_kv_heads=8 stride_qt=1024 stride_qh=128 stride_ot=1024 '
            'stride_oh=128 stride_cb=16384 stride_cs=1024 stride_ch=128 stride_bt=256 | part_m_ptr=out '
            'part_l_ptr=out part_acc_ptr=out',
        ],
    },
}


# The split-KV choice of a decode step: (batch x kv_heads, SMs, max_seq_len, tile_n, split_kv) -> (split,
# num_splits), as the planner chose them before the split (auto on CUDA; forced with the count left to it).
SPLIT_CHOICES = [
    ((8, 132, 4096, 128, None), (True, 16)),
    ((8, 132, 4096, 16, None), (True, 16)),
    ((32, 132, 4096, 128, None), (True, 8)),
    ((32, 132, 16384, 128, None), (True, 8)),
    ((128, 132, 16384, 128, None), (True, 2)),
    ((320, 132, 16384, 128, None), (False, 1)),  # the batch fills the SMs
    ((8, 132, 511, 128, None), (False, 1)),  # fewer than 4 key tiles
    ((8, 132, 256, 64, None), (False, 1)),  # < 2 splits of 256 keys
    ((16, 108, 1 << 20, 64, None), (True, 8)),
    ((8, 8, 4096, 64, None), (False, 1)),
    ((8, 132, 4096, 128, True), (True, 16)),
    ((320, 132, 16384, 128, True), (True, 2)),
    ((8, 132, 100, 16, True), (True, 2)),
    ((16, 108, 1 << 20, 64, True), (True, 8)),
    ((8, 8, 4096, 64, True), (True, 2)),
    ((32, 132, 1024, 128, True), (True, 4)),
]


@pytest.mark.parametrize("inputs, expected", SPLIT_CHOICES, ids=[str(c[0]) for c in SPLIT_CHOICES])
def test_split_choice_unchanged(inputs, expected):
    import torch

    from pagedllm.kernels.paged_attention import _choose_split

    programs, sms, max_seq_len, tile_n, split_kv = inputs
    got = _choose_split(split_kv, None, decode=True, device=torch.device("cuda"), sm_count=sms, programs=programs,
                        max_seq_len=max_seq_len, tile_n=tile_n)
    assert got == expected


def test_split_choice_follows_the_caller():
    """Auto never splits off CUDA, prefill steps or when the caller names a count without split_kv; forced
    counts are taken as given; split_kv=False always wins."""
    import torch

    from pagedllm.kernels.paged_attention import _choose_split

    common = dict(sm_count=132, programs=8, max_seq_len=4096, tile_n=64)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _choose_split(None, None, decode=True, device=cpu, **common) == (False, 1)
    assert _choose_split(None, None, decode=False, device=cuda, **common) == (False, 1)
    assert _choose_split(None, 4, decode=True, device=cuda, **common) == (False, 1)
    assert _choose_split(True, 3, decode=False, device=cpu, **common) == (True, 3)
    assert _choose_split(True, 1, decode=True, device=cuda, **common) == (True, 1)
    assert _choose_split(True, None, decode=True, device=cpu, **dict(common, sm_count=None)) == (True, 2)
    assert _choose_split(False, 8, decode=True, device=cuda, **common) == (False, 1)


@pytest.fixture(scope="module", params=["gpu", "interpreter"])
def planned(request, subprocess_env):
    env = dict(subprocess_env, TRITON_INTERPRET="0" if request.param == "gpu" else "1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return request.param, json.loads(proc.stdout)


@pytest.mark.parametrize("case_id", list(CASES))
def test_planned_launches_unchanged(planned, case_id):
    mode, got = planned
    assert got[case_id] == EXPECTED[mode][case_id]


if __name__ == "__main__":
    print(json.dumps(plan_summaries()))
