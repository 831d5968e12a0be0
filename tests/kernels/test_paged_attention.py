"""Paged attention (Triton) against the SDPA reference computed in float64.

Tolerances (max abs error, applied as atol = rtol): fp32 2e-4, fp16 1e-2, bf16 3e-2 (outputs are convex
combinations of values ~N(0, 1); the kernel rounds probabilities to the value dtype before P @ V, as
flash attention does, and the interpreter rounds bf16 toward zero).

Every case: a random permutation of cache blocks, a cache poisoned with NaN outside the written
positions (so reading a masked slot would show), contexts ending mid-block, q as a strided view of a fused
qkv tensor, NaN-poisoned outputs and split-KV partial buffers.
"""
from __future__ import annotations

import pytest
import torch

from pagedllm.kernels.paged_attention import (_plan_paged_attention, make_split_kv_workspace, paged_attention_torch,
                                              paged_attention_triton)

TOL = {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# id, dtype, heads, kv_heads, head_dim, block_size, q_lens, seq_lens, kwargs, pass host hints
CASES = [
    ("decode-g3-d80-fp16", F16, 6, 2, 80, 16, [1, 1, 1, 1], [1, 17, 33, 50], {}, True),
    ("decode-g4-d64-bf16-nohints", BF16, 8, 2, 64, 32, [1, 1, 1], [31, 64, 77], {}, False),
    ("decode-g1-d64-fp32", F32, 5, 5, 64, 16, [1, 1], [16, 23], {}, True),
    ("decode-g8-d64-fp16-tile64", F16, 8, 1, 64, 16, [1, 1], [40, 100], {"tile_n": 64}, True),
    ("mixed-g3-d64-fp16", F16, 6, 2, 64, 16, [5, 1, 20, 3], [5, 17, 40, 3], {"block_m": 16}, True),
    ("mixed-g4-d80-bf16-nohints", BF16, 8, 2, 80, 32, [13, 1, 7], [13, 45, 39], {}, False),
    ("prefill-g1-d64-fp32-gputiles", F32, 5, 5, 64, 16, [19, 2], [19, 35], {"block_m": 64, "tile_n": 64}, True),
    ("prefill-g4-d96-fp16", F16, 8, 2, 96, 16, [9, 1], [30, 12], {}, True),
    ("prefill-g4-d128-bf16", BF16, 8, 2, 128, 32, [6, 1], [6, 40], {}, True),
    ("split-g3-d64-fp16", F16, 6, 2, 64, 16, [1, 1, 1], [70, 5, 33], {"split_kv": True, "num_splits": 3}, True),
    ("split-g4-d128-bf16", BF16, 8, 2, 128, 32, [1, 1], [90, 1], {"split_kv": True, "num_splits": 4}, True),
    ("split-g1-d80-fp32-prefill", F32, 5, 5, 80, 16, [4, 1], [20, 33], {"split_kv": True, "num_splits": 2}, True),
    ("split-auto-g4-d64-fp16", F16, 8, 2, 64, 16, [1], [300], {"split_kv": True}, True),
    # an empty query range, and a wrong hint (decode tile for a prefill batch): only speed may suffer
    ("emptyq-wronghint-g3-d64-fp32", F32, 6, 2, 64, 16, [3, 0, 4], [3, 10, 20], {"max_query_len": 1}, False),
]


def _make_case(device, dtype, H, KVH, D, BS, q_lens, seq_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    n_blocks = [-(-s // BS) for s in seq_lens]
    NB = sum(n_blocks) + 3  # spare blocks stay NaN
    perm = torch.randperm(NB, generator=g)
    max_blocks = max(n_blocks) + 2  # padded with 0
    block_tables = torch.zeros(B, max_blocks, dtype=torch.int32)
    k_cache = torch.full((NB, BS, KVH, D), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    i = 0
    for b in range(B):
        blocks = perm[i:i + n_blocks[b]]
        i += n_blocks[b]
        block_tables[b, :n_blocks[b]] = blocks.int()
        pos = torch.arange(seq_lens[b])
        k_cache[blocks[pos // BS], pos % BS] = torch.randn(seq_lens[b], KVH, D, generator=g).to(dtype)
        v_cache[blocks[pos // BS], pos % BS] = torch.randn(seq_lens[b], KVH, D, generator=g).to(dtype)
    T = sum(q_lens)
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g).to(dtype)
    q = qkv[:, :H * D].view(T, H, D)  # strided view, like the model's
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    to = dict(device=device)
    return (q.to(**to) if device.type == "cpu" else qkv.to(device)[:, :H * D].view(T, H, D),
            k_cache.to(**to), v_cache.to(**to), block_tables.to(**to), qsl.to(**to), sl.to(**to))


def _reference(q, k_cache, v_cache, bt, qsl, sl, scale):
    f = torch.float64
    return paged_attention_torch(q.to(f), k_cache.nan_to_num(0).to(f), v_cache.nan_to_num(0).to(f),
                                 bt, qsl, sl, scale)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_paged_attention_matches_reference(case, device, poisoned):
    _, dtype, H, KVH, D, BS, q_lens, seq_lens, kwargs, hints = case
    q, kc, vc, bt, qsl, sl = _make_case(device, dtype, H, KVH, D, BS, q_lens, seq_lens)
    scale = D ** -0.5
    if hints:
        kwargs = dict(kwargs, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    out = torch.full((q.shape[0], H, D), float("nan"), dtype=dtype, device=device)
    with poisoned():
        got = paged_attention_triton(q, kc, vc, bt, qsl, sl, scale, out=out, **kwargs)
    assert got is out
    assert not torch.isnan(got).any(), "an output element was not written (or a masked NaN slot was read)"
    ref = _reference(q, kc, vc, bt, qsl, sl, scale)
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


def test_split_kv_equals_unsplit(device):
    """The split-KV path (partials + log-sum-exp merge) agrees with the single-pass kernel."""
    q, kc, vc, bt, qsl, sl = _make_case(device, torch.float32, 8, 2, 64, 16, [1, 1], [75, 130], seed=3)
    a = paged_attention_triton(q, kc, vc, bt, qsl, sl, 0.125, split_kv=False)
    b = paged_attention_triton(q, kc, vc, bt, qsl, sl, 0.125, split_kv=True, num_splits=5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


WORKSPACE_CASES = [  # id, dtype, heads, kv_heads, head_dim, block_size, q_lens, seq_lens
    ("decode-g3-d80-fp16", F16, 6, 2, 80, 16, [1, 1, 1], [70, 5, 33]),
    ("mixed-g1-d96-fp32", F32, 5, 5, 96, 32, [4, 1, 7], [20, 33, 7]),
]


@pytest.mark.parametrize("num_splits, spare_tokens, spare_splits", [(2, 3, 1), (4, 0, 0)],
                         ids=["2-splits-roomy", "4-splits-exact"])
@pytest.mark.parametrize("case", WORKSPACE_CASES, ids=[c[0] for c in WORKSPACE_CASES])
def test_split_kv_workspace_matches_fresh_scratch(case, num_splits, spare_tokens, spare_splits, device):
    """Split-KV partials in a preallocated workspace (bigger than the launch, or just its size; NaN left over from
    before) give exactly the results of freshly allocated scratch, and again when the workspace is reused."""
    _, dtype, H, KVH, D, BS, q_lens, seq_lens = case
    q, kc, vc, bt, qsl, sl = _make_case(device, dtype, H, KVH, D, BS, q_lens, seq_lens, seed=7)
    ws = make_split_kv_workspace(q.shape[0] + spare_tokens, H, D, num_splits + spare_splits, device)
    for t in ws:
        t.fill_(float("nan"))
    kw = dict(split_kv=True, num_splits=num_splits, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    fresh = paged_attention_triton(q, kc, vc, bt, qsl, sl, D ** -0.5, **kw)
    got = paged_attention_triton(q, kc, vc, bt, qsl, sl, D ** -0.5, workspace=ws, **kw)
    again = paged_attention_triton(q, kc, vc, bt, qsl, sl, D ** -0.5, workspace=ws, **kw)
    assert not torch.isnan(fresh).any()
    assert torch.equal(got, fresh) and torch.equal(again, fresh)


def _meta_decode(T=3, H=8, KVH=2, D=80, dtype=F16):
    """Planner inputs for a T-sequence decode step on `meta` tensors (nothing runs)."""
    m, i32 = "meta", torch.int32
    kc = torch.empty(100, 16, KVH, D, dtype=dtype, device=m)
    return (torch.empty(T, H, D, dtype=dtype, device=m), kc, torch.empty_like(kc),
            torch.empty(T, 64, dtype=i32, device=m), torch.empty(T + 1, dtype=i32, device=m),
            torch.empty(T, dtype=i32, device=m), D ** -0.5)


def test_split_kv_workspace_too_small_is_refused():
    args = _meta_decode(T=3, H=8, D=80)
    hints = dict(max_query_len=1, max_seq_len=1024, split_kv=True)
    with pytest.raises(ValueError, match="workspace is too small.*3 tokens x 8 heads x 4 splits"):
        _plan_paged_attention(*args, num_splits=4, workspace=make_split_kv_workspace(3, 8, 80, 2, "meta"), **hints)
    with pytest.raises(ValueError, match="workspace is too small"):
        _plan_paged_attention(*args, num_splits=2, workspace=make_split_kv_workspace(2, 8, 80, 2, "meta"), **hints)
    with pytest.raises(ValueError, match="workspace is too small"):  # sized for head dim 64: rows of 64, not 128
        _plan_paged_attention(*args, num_splits=2, workspace=make_split_kv_workspace(3, 8, 64, 2, "meta"), **hints)
    half = make_split_kv_workspace(3, 8, 80, 2, "meta")._replace(part_l=torch.empty(24, device="meta"))
    with pytest.raises(ValueError, match="workspace is too small"):
        _plan_paged_attention(*args, num_splits=2, workspace=half, **hints)
    fp16 = tuple(t.half() for t in make_split_kv_workspace(3, 8, 80, 2, "meta"))
    with pytest.raises(ValueError, match="contiguous float32"):
        _plan_paged_attention(*args, num_splits=2, workspace=fp16, **hints)
    with pytest.raises(ValueError, match="workspace is too small"):  # through the op too, before any launch
        q, kc, vc, bt, qsl, sl = _make_case(torch.device("cpu"), F32, 4, 2, 64, 16, [1, 1], [20, 30])
        paged_attention_triton(q, kc, vc, bt, qsl, sl, 0.125, split_kv=True, num_splits=2,
                               workspace=make_split_kv_workspace(1, 4, 64, 2, "cpu"))


def test_split_count_chosen_by_the_planner_fits_the_workspace():
    """Forced split_kv without num_splits sizes the split from the SMs (16 here), but within the workspace."""
    args = _meta_decode(T=4, H=8, KVH=2, D=128)
    kw = dict(max_query_len=1, max_seq_len=4096, split_kv=True, sm_count=132, smem=232448)
    assert _plan_paged_attention(*args, **kw)[0][0].args["num_splits"] == 16
    ws = make_split_kv_workspace(4, 8, 128, 3, "meta")
    assert _plan_paged_attention(*args, workspace=ws, **kw)[0][0].args["num_splits"] == 2


@pytest.mark.parametrize("split_kv", [True, False])
def test_decode_with_out_and_workspace_allocates_nothing(split_kv, monkeypatch):
    """What CUDA-graph capture needs: with out= and workspace= the planner makes no tensor."""
    args = _meta_decode(T=3, H=8, D=80)
    out = torch.empty(3, 8, 80, dtype=F16, device="meta")
    ws = make_split_kv_workspace(3, 8, 80, 4, "meta")

    def refuse(*a, **k):
        raise AssertionError("allocated a tensor")

    for name in ("empty", "empty_like", "empty_strided", "zeros", "zeros_like", "full", "full_like"):
        monkeypatch.setattr(torch, name, refuse)
    launches, got = _plan_paged_attention(*args, max_query_len=1, max_seq_len=1024, split_kv=split_kv,
                                          num_splits=4, out=out, workspace=ws, sm_count=132, smem=232448)
    monkeypatch.undo()
    assert got is out and len(launches) == (2 if split_kv else 1)
    if split_kv:  # the partials are the workspace's first rows
        for name, held in zip(("part_m_ptr", "part_l_ptr", "part_acc_ptr"), ws):
            assert launches[0].args[name]._base is held and launches[1].args[name]._base is held
        assert launches[0].args["part_m_ptr"].numel() == 3 * 8 * 4


def test_returns_fresh_tensor_and_leaves_inputs(device):
    q, kc, vc, bt, qsl, sl = _make_case(device, torch.float16, 4, 2, 64, 16, [3, 1], [3, 20], seed=5)
    before = [t.clone() for t in (q, kc, vc, bt, qsl, sl)]
    out = paged_attention_triton(q, kc, vc, bt, qsl, sl, 0.125)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    for t, t0 in zip((q, kc, vc, bt, qsl, sl), before):
        assert torch.equal(t.nan_to_num(0), t0.nan_to_num(0))


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_random_batches(seed, device, poisoned):
    """Random mixes of decode rows, fresh prefills and chunks after cached context, at the GPU's tiles."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]  # noqa: E731
    dtype = pick([F16, BF16, F32])
    H, KVH = pick([(6, 2), (5, 5), (8, 2), (12, 4)])
    D, BS = pick([64, 80]), pick([16, 32])
    B = int(torch.randint(1, 6, (1,), generator=g))
    seq_lens = torch.randint(1, 90, (B,), generator=g).tolist()
    q_lens = [1 if torch.rand(1, generator=g) < 0.5 else int(torch.randint(1, s + 1, (1,), generator=g))
              for s in seq_lens]
    kwargs = pick([{}, {"block_m": 64, "tile_n": 64}, {"split_kv": True, "num_splits": 3}])
    q, kc, vc, bt, qsl, sl = _make_case(device, dtype, H, KVH, D, BS, q_lens, seq_lens, seed=seed)
    with poisoned():
        got = paged_attention_triton(q, kc, vc, bt, qsl, sl, D ** -0.5, **kwargs)
    assert not torch.isnan(got).any()
    ref = _reference(q, kc, vc, bt, qsl, sl, D ** -0.5)
    torch.testing.assert_close(got.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_one_compile_serves_every_batch_shape(device):
    """The kernel is not specialised on the batch's shape (number of sequences, q tiles, splits): batches of 1,
    3, 16 and 32 sequences, and prefills of several lengths, reuse the kernel compiled for the first one, so no
    compile stalls a running server when its batch size changes (seen on an H200 before do_not_specialize)."""
    if device.type != "cuda":
        pytest.skip("counts compiled GPU kernels: the interpreter compiles nothing")
    from pagedllm.kernels.paged_attention import _paged_attn_kernel

    compiled = _paged_attn_kernel.device_caches[torch.cuda.current_device()][0]
    for mode, shapes in (("decode", [[1] * b for b in (1, 3, 16, 32)]), ("prefill", [[17], [64], [5, 33]])):
        counts = []
        for q_lens in shapes:
            seq_lens = [40 + 7 * i + q for i, q in enumerate(q_lens)]
            q, kc, vc, bt, qsl, sl = _make_case(device, F16, 8, 2, 64, 16, q_lens, seq_lens)
            paged_attention_triton(q, kc, vc, bt, qsl, sl, 0.125, split_kv=False,
                                   max_query_len=max(q_lens), max_seq_len=max(seq_lens))
            counts.append(len(compiled))
        assert counts == [counts[0]] * len(counts), (mode, counts)
