#!/usr/bin/env python
"""Times each Triton kernel of pagedllm against its PyTorch baseline and writes a table, JSON and a plot.

    python bench/kernels.py [--out bench/out] [--dtype bfloat16|float16]   # CUDA
    python bench/kernels.py --smoke --out /tmp/x                            # tiny shapes; CPU: interpreter
    python bench/kernels.py --print-summary bench/out/kernels.json          # the short table again
    python bench/kernels.py --tune                                          # + sweep attention launch configs

Baselines: paged attention against torch SDPA on the same keys and values laid out contiguously (decode:
the GQA group folded into the query length, so SDPA's flash kernel reads each KV head once; prefill: k / v
expanded to all heads beforehand, outside the timing), and the torch reference ops for the rest (the
unfused rms_norm + residual sequence, rope + index_put, silu * up, sort-based sampling). Decode attention
reports achieved GB/s of KV read and its share of the device copy bandwidth measured in the same run.
CUDA timings use triton.testing.do_bench (median, L2 flushed between runs).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"), help="directory for kernels.json / .png")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (on CPU: Triton interpreter)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--print-summary", metavar="JSON", help="print the short table of a previous run and exit")
    ap.add_argument("--tune", action="store_true",
                    help="CUDA: also time paged attention over tile / warp / stage / split variants")
    ap.add_argument("--tune-budget", type=float, default=150.0, help="seconds the --tune sweep may take")
    ap.add_argument("--graph", action="store_true",
                    help="CUDA: also time each op as a CUDA-graph replay (GPU time without the launch overhead)")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all), e.g. prefill,rope")
    return ap.parse_args(argv)


def _fmt(v, spec):
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return format(v, spec) if isinstance(v, (int, float)) else "-".rjust(width)


def summary_table(results: list[dict]) -> str:
    graph = any("triton_graph_ms" in r for r in results)
    head = (f"{'op':<16} {'case':<34} {'triton ms':>10} {'torch ms':>10} {'speedup':>8} {'GB/s':>8} "
            f"{'%copy':>6} {'TFLOP/s':>8} {'max err':>9}" + (f" {'graph: triton':>13} {'torch':>8}" if graph else ""))
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r['op']:<16} {r['case']:<34} {_fmt(r.get('triton_ms'), '10.4f')} "
                     f"{_fmt(r.get('torch_ms'), '10.4f')} {_fmt(r.get('speedup'), '7.2f')}x "
                     f"{_fmt(r.get('gbps'), '8.0f')} {_fmt(r.get('pct_copy_bw'), '6.1f')} "
                     f"{_fmt(r.get('tflops'), '8.1f')} {_fmt(r.get('max_err'), '9.2e')}"
                     + (f" {_fmt(r.get('triton_graph_ms'), '13.4f')} {_fmt(r.get('torch_graph_ms'), '8.4f')}"
                        if graph else ""))
    if graph:
        lines.append("graph: ms per call replayed from a CUDA graph (GPU time without launch overhead; '-' where "
                     "the op cannot be captured)")
    return "\n".join(lines)


def tune_table(tune: dict, top: int = 4) -> str:
    """The best `top` variants of each tuned case, beside the default launch's time."""
    lines = []
    for case, t in tune.items():
        rows = sorted(t["variants"], key=lambda r: r["ms"])
        lines.append(f"tune {case}: default {t['default_ms']:.4f} ms ({len(rows)} variants tried)")
        for r in rows[:top]:
            extra = f"  {r['gbps']:.0f} GB/s" if "gbps" in r else f"  {r['tflops']:.1f} TFLOP/s"
            lines.append(f"    {r['ms']:.4f} ms  {r['config']}{extra}")
    return "\n".join(lines)


@dataclass
class Bench:
    """What every section needs: the run's options, device, dtype and op sets, and the results gathered so far."""

    args: argparse.Namespace
    cuda: bool
    dev: Any  # torch.device
    dtype: Any  # torch.dtype
    triton_ops: Any
    torch_ops: Any
    copy_gbps: float = 0.0
    results: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    tune: dict = field(default_factory=dict)

    @property
    def smoke(self) -> bool:
        return self.args.smoke

    def timeit(self, fn) -> float:
        """ms per call: do_bench's median on CUDA; in the interpreter one call after a warm-up call (the
        interpreter rewrites each kernel once)."""
        if self.cuda:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=10 if self.smoke else 25, rep=20 if self.smoke else 100,
                                           return_mode="median")
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def graph_time(self, fn) -> float | None:
        """Median ms of replaying fn captured in a CUDA graph (10 calls per replay), or None when fn cannot be
        captured (host syncs: several torch reference ops have them)."""
        import torch
        import triton.testing

        try:
            fn()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):  # captures on a side stream of its own
                for _ in range(10):
                    fn()
            torch.cuda.synchronize()
        except Exception as e:
            print(f"  (no CUDA graph: {type(e).__name__}: {str(e)[:100]})")
            return None
        return triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median") / 10

    def record(self, op, case, tri_fn, ref_fn, *, bytes_moved=None, flops=None, err=None, ref_graph=True):
        """Times the Triton op and its torch baseline, adds the row to the results and prints it."""
        t_tri, t_ref = self.timeit(tri_fn), self.timeit(ref_fn)
        r = {"op": op, "case": case, "triton_ms": t_tri, "torch_ms": t_ref, "speedup": t_ref / t_tri}
        if self.args.graph and self.cuda:
            # ref_graph=False: the torch op syncs with the host (boolean indexing...), so it cannot be captured
            r["triton_graph_ms"] = self.graph_time(tri_fn)
            r["torch_graph_ms"] = self.graph_time(ref_fn) if ref_graph else None
        if bytes_moved is not None:
            r["gbps"] = bytes_moved / (t_tri * 1e-3) / 1e9
            r["pct_copy_bw"] = 100.0 * r["gbps"] / self.copy_gbps
        if flops is not None:
            r["tflops"] = flops / (t_tri * 1e-3) / 1e12
        if err is not None:
            r["max_err"] = float(err)
        self.results.append(r)
        print(f"  {op:<16} {case:<34} triton {t_tri:9.4f} ms   torch {t_ref:9.4f} ms   {t_ref / t_tri:6.2f}x",
              flush=True)


def setup(args) -> Bench:
    """Picks the device (CUDA, else the Triton interpreter with --smoke shapes) and loads the op sets."""
    import torch  # does not import triton

    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    if not cuda:
        args.smoke = True  # the interpreter cannot take real shapes
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    try:
        import pagedllm  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT / "backend"))
    from pagedllm.kernels import TORCH_OPS
    from pagedllm.kernels.triton_ops import TRITON_OPS

    b = Bench(args=args, cuda=cuda, dev=torch.device("cuda" if cuda else "cpu"), dtype=getattr(torch, args.dtype),
              triton_ops=TRITON_OPS, torch_ops=TORCH_OPS)
    torch.manual_seed(0)
    return b


# ---- device copy bandwidth -------------------------------------------------------------------------------
def bench_copy_bandwidth(b: Bench) -> None:
    """The device's copy bandwidth, the yardstick of the memory-bound kernels' GB/s."""
    import torch

    n_copy = (1 << 20) if b.smoke else (1 << 29)  # elements of fp16: 2 MiB / 1 GiB
    src = torch.empty(n_copy, dtype=torch.float16, device=b.dev).normal_()
    dst = torch.empty_like(src)
    t_copy = b.timeit(lambda: dst.copy_(src))
    b.copy_gbps = 2 * src.numel() * src.element_size() / (t_copy * 1e-3) / 1e9
    print(f"device copy bandwidth: {b.copy_gbps:.0f} GB/s")


# ---- paged attention -------------------------------------------------------------------------------------
# Each case runs in a function of its own, so that its GPU tensors are freed before the next case allocates.
DECODE_CASES = [("B32 ctx4096 h32/8 d128", 32, 4096, 32, 8, 128, 16),
                ("B2 ctx16384 h32/8 d128", 2, 16384, 32, 8, 128, 16)]
SMOKE_DECODE_CASES = [("B3 ctx40 h4/2 d64", 3, 40, 4, 2, 64, 16)]
PREFILL_CASE = ("T2048 h32/8 d128", 2048, 32, 8, 128, 16)
SMOKE_PREFILL_CASE = ("T24 h4/2 d64", 24, 4, 2, 64, 16)


def paged_setup(b: Bench, B, ctx, q_len, H, KVH, D, BS):
    """B sequences of ctx cached tokens with q_len new queries each, in a cache of permuted blocks, and the same
    keys and values contiguous ([B, KVH, ctx, D]) for the SDPA baseline."""
    import torch

    nb = -(-ctx // BS)
    NB = B * nb
    perm = torch.randperm(NB, device=b.dev).int()
    bt = perm.view(B, nb)
    kc = torch.randn(NB, BS, KVH, D, dtype=b.dtype, device=b.dev)
    vc = torch.randn_like(kc)
    q = torch.randn(B * q_len, H, D, dtype=b.dtype, device=b.dev)
    qsl = torch.arange(0, B * q_len + 1, q_len, dtype=torch.int32, device=b.dev)
    sl = torch.full((B,), ctx, dtype=torch.int32, device=b.dev)
    pos = torch.arange(ctx, device=b.dev)
    blocks = bt[:, pos // BS].long()
    kk = kc[blocks, pos % BS].permute(0, 2, 1, 3).contiguous()
    vv = vc[blocks, pos % BS].permute(0, 2, 1, 3).contiguous()
    return q, kc, vc, bt, qsl, sl, kk, vv


def bench_decode_attention(b: Bench) -> None:
    for case in SMOKE_DECODE_CASES if b.smoke else DECODE_CASES:
        _bench_decode_case(b, *case)


def _bench_decode_case(b: Bench, case, B, ctx, H, KVH, D, BS) -> None:
    """Decode against SDPA with the GQA group folded into the query length (each KV head read once); on CUDA,
    batches too small to fill the GPU also without split-KV."""
    import torch.nn.functional as F

    q, kc, vc, bt, qsl, sl, kk, vv = paged_setup(b, B, ctx, 1, H, KVH, D, BS)
    scale = D ** -0.5
    qg = q.view(B, KVH, H // KVH, D)
    ref = lambda: F.scaled_dot_product_attention(qg, kk, vv, scale=scale)  # noqa: E731
    kv_bytes = 2 * B * ctx * KVH * D * kc.element_size() + 2 * q.numel() * q.element_size()
    for split in (None, False) if (b.cuda and B * KVH < 64) else (None,):
        tri = lambda: b.triton_ops.paged_attention(q, kc, vc, bt, qsl, sl, scale, max_query_len=1,  # noqa: E731
                                                   max_seq_len=ctx, split_kv=split)
        err = (tri().float() - ref().reshape(B, H, D).float()).abs().max().item()
        label = case + ("" if split is None else " nosplit")
        b.record("decode_attn", label, tri, ref, bytes_moved=kv_bytes, err=err)


def bench_prefill_attention(b: Bench) -> None:
    """One causal prefill against SDPA's causal kernel, k / v expanded to all heads beforehand (untimed)."""
    import torch.nn.functional as F

    case, T, H, KVH, D, BS = SMOKE_PREFILL_CASE if b.smoke else PREFILL_CASE
    q, kc, vc, bt, qsl, sl, kk, vv = paged_setup(b, 1, T, T, H, KVH, D, BS)
    scale = D ** -0.5
    kx = kk.repeat_interleave(H // KVH, dim=1)
    vx = vv.repeat_interleave(H // KVH, dim=1)
    qt = q.view(T, H, D).transpose(0, 1).unsqueeze(0)
    ref = lambda: F.scaled_dot_product_attention(qt, kx, vx, is_causal=True, scale=scale)  # noqa: E731
    tri = lambda: b.triton_ops.paged_attention(q, kc, vc, bt, qsl, sl, scale, max_query_len=T,  # noqa: E731
                                               max_seq_len=T)
    err = (tri().float() - ref()[0].transpose(0, 1).float()).abs().max().item()
    b.record("prefill_attn", case, tri, ref, flops=4.0 * H * D * T * (T + 1) / 2, err=err)


# ---- launch-config sweep (--tune): what the defaults in paged_attention.py are chosen from ----------------
def bench_tune(b: Bench) -> None:
    """--tune: times attention launch variants (decode, then prefill), most promising first, so that a spent
    budget cuts the long tail. The interpreter ignores warps and stages: on CPU (--smoke) two variants of each
    only check that the sweep itself works."""
    if not b.args.tune:
        return
    B, ctx, H, KVH, D, BS = (3, 40, 4, 2, 64, 16) if b.smoke else (32, 4096, 32, 8, 128, 16)
    _tune_decode(b, B, ctx, H, KVH, D, BS)
    _tune_prefill(b, 24 if b.smoke else 2048, H, KVH, D, BS)
    print(tune_table(b.tune))


def _tune_decode(b: Bench, B, ctx, H, KVH, D, BS) -> None:
    import itertools

    q, kc, vc, bt, qsl, sl, _, _ = paged_setup(b, B, ctx, 1, H, KVH, D, BS)
    # the neighbours of the defaults first (a spent budget cuts the rest of the grid)
    first = [dict(tile_n=128, num_warps=4, num_stages=3), dict(tile_n=128, num_warps=2, num_stages=2),
             dict(tile_n=64, num_warps=4, num_stages=2), dict(tile_n=128, split_kv=True, num_splits=2),
             dict(tile_n=64, split_kv=True, num_splits=2)]
    grid = [dict(tile_n=tn, num_warps=w, num_stages=st)
            for tn, w, st in itertools.product((128, 64, 32), (4, 8, 2), (2, 3, 4))]
    variants = first + [v for v in grid if v not in first]
    _sweep(b, f"decode B{B} ctx{ctx} h{H}/{KVH} d{D}", (q, kc, vc, bt, qsl, sl),
           variants[:2] if b.smoke else variants, dict(max_query_len=1, max_seq_len=ctx),
           bytes_moved=2 * B * ctx * KVH * D * kc.element_size() + 2 * q.numel() * q.element_size())


def _tune_prefill(b: Bench, T, H, KVH, D, BS) -> None:
    import itertools

    q, kc, vc, bt, qsl, sl, _, _ = paged_setup(b, 1, T, T, H, KVH, D, BS)
    first = [dict(block_m=64, tile_n=64, num_warps=4, num_stages=3),
             dict(block_m=128, tile_n=64, num_warps=8, num_stages=2),
             dict(block_m=64, tile_n=32, num_warps=4, num_stages=2),
             dict(block_m=64, tile_n=128, num_warps=4, num_stages=2),
             dict(block_m=128, tile_n=128, num_warps=8, num_stages=3)]
    grid = [dict(block_m=bm, tile_n=tn, num_warps=w, num_stages=st)
            for bm, tn, w, st in itertools.product((64, 128), (64, 128, 32), (4, 8), (2, 3, 4))]
    variants = first + [v for v in grid if v not in first]
    _sweep(b, f"prefill T{T} h{H}/{KVH} d{D}", (q, kc, vc, bt, qsl, sl), variants[:2] if b.smoke else variants,
           dict(max_query_len=T, max_seq_len=T), flops=4.0 * H * D * T * (T + 1) / 2)


def _sweep(b: Bench, case, inputs, variants, host, *, bytes_moved=None, flops=None) -> None:
    """Times each launch variant that computes what the default launch does, within half the tune budget (the
    other half is for the other sweep), into b.tune[case]."""
    q, kc, vc, bt, qsl, sl = inputs
    scale = q.shape[-1] ** -0.5
    attn = b.triton_ops.paged_attention
    ref = attn(q, kc, vc, bt, qsl, sl, scale, **host).float()
    default_ms = b.timeit(lambda: attn(q, kc, vc, bt, qsl, sl, scale, **host))
    t_stop = time.monotonic() + b.args.tune_budget / 2
    rows = []
    for cfg in variants:
        if time.monotonic() > t_stop:
            print(f"  tune budget spent: {len(rows)} of {len(variants)} variants of {case}")
            break
        fn = lambda: attn(q, kc, vc, bt, qsl, sl, scale, **host, **cfg)  # noqa: E731
        try:
            bad = (fn().float() - ref).abs().max().item()
            if not bad < 0.05:  # a variant must compute the same thing (and not NaN)
                raise RuntimeError(f"differs from the default launch by {bad}")
            ms = b.timeit(fn)
        except Exception as e:  # e.g. out of shared memory / registers for this tile
            print(f"  {case} {cfg}: {type(e).__name__}: {str(e)[:120]}")
            continue
        r = {"config": cfg, "ms": ms}
        if bytes_moved:
            r["gbps"] = bytes_moved / (ms * 1e-3) / 1e9
        if flops:
            r["tflops"] = flops / (ms * 1e-3) / 1e12
        rows.append(r)
        print(f"  tune {case} {cfg}: {ms:.4f} ms", flush=True)
    b.tune[case] = {"default_ms": default_ms, "variants": rows}


# ---- the other ops against their torch references ----------------------------------------------------------
def bench_rms_norm(b: Bench) -> None:
    """Fused residual add + RMSNorm against the unfused torch sequence."""
    import torch

    hidden = 128 if b.smoke else 4096
    for T in ((4,) if b.smoke else (32, 2048)):
        x = torch.randn(T, hidden, dtype=b.dtype, device=b.dev)
        w = torch.rand(hidden, dtype=b.dtype, device=b.dev) + 0.5
        r1 = torch.randn_like(x)
        r2 = r1.clone()
        tri, ref = b.triton_ops.rms_norm, b.torch_ops.rms_norm
        err = (tri(x, w, 1e-5, r1.clone()).float() - ref(x, w, 1e-5, r2.clone()).float()).abs().max().item()
        b.record("rms_norm+res", f"T{T} h{hidden}", lambda: tri(x, w, 1e-5, r1), lambda: ref(x, w, 1e-5, r2),
                 bytes_moved=4 * x.numel() * x.element_size(), err=err)


def bench_rope_kv_write(b: Bench) -> None:
    """Rope on q and k fused with the KV-cache scatter, against rope + index_put."""
    H, KVH, D, BS = (4, 2, 64, 16) if b.smoke else (32, 8, 128, 16)
    for T in ((5,) if b.smoke else (32, 2048)):
        _bench_rope_case(b, T, H, KVH, D, BS)


def _bench_rope_case(b: Bench, T, H, KVH, D, BS) -> None:
    import torch

    qkv = torch.randn(T, (H + 2 * KVH) * D, dtype=b.dtype, device=b.dev)
    q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], dim=-1))
    pos = torch.randint(0, 4096, (T,), device=b.dev)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=b.dev).float() / D))
    f = torch.outer(torch.arange(8192, device=b.dev).float(), inv)
    cs = torch.cat([f.cos(), f.sin()], -1)
    NB = -(-T // BS) + 4
    slots = torch.randperm(NB * BS, device=b.dev)[:T]
    caches = [torch.zeros(NB, BS, KVH, D, dtype=b.dtype, device=b.dev) for _ in range(4)]
    tri, ref = b.triton_ops.rope_and_write_kv, b.torch_ops.rope_and_write_kv
    q1, k1 = q.clone(), k.clone()
    tri(q1, k1, v, pos, cs, caches[0], caches[1], slots)
    q2, k2 = q.clone(), k.clone()
    ref(q2, k2, v, pos, cs, caches[2], caches[3], slots)
    err = max((q1.float() - q2.float()).abs().max().item(),
              (caches[0].float() - caches[2].float()).abs().max().item())
    moved = (2 * q.numel() + 4 * k.numel() + 2 * v.numel()) * q.element_size()
    ref_fn = lambda: ref(q, k, v, pos, cs, caches[2], caches[3], slots)  # noqa: E731
    b.record("rope+kv_write", f"T{T} h{H}/{KVH} d{D}", lambda: tri(q, k, v, pos, cs, caches[0], caches[1], slots),
             ref_fn, bytes_moved=moved, err=err, ref_graph=False)
    if b.cuda and b.args.graph:
        # What rounding like the reference costs: the same launch with FMA contraction allowed.
        from pagedllm.kernels._triton_util import run as run_launches
        from pagedllm.kernels.rope_kv_write import _plan_rope_and_write_kv

        fused = _plan_rope_and_write_kv(q, k, v, pos, cs, caches[0], caches[1], slots)
        for ln in fused:
            ln.fp_fusion = True
        b.record("rope+kv_write", f"T{T} h{H}/{KVH} d{D} fp-fusion on", lambda: run_launches(fused, b.dev),
                 ref_fn, bytes_moved=moved, ref_graph=False)


def bench_silu_and_mul(b: Bench) -> None:
    import torch

    inter = 128 if b.smoke else 14336
    tri, ref = b.triton_ops.silu_and_mul, b.torch_ops.silu_and_mul
    for T in ((4,) if b.smoke else (32, 2048)):
        gu = torch.randn(T, 2 * inter, dtype=b.dtype, device=b.dev)
        err = (tri(gu).float() - ref(gu).float()).abs().max().item()
        b.record("silu_and_mul", f"T{T} i{inter}", lambda: tri(gu), lambda: ref(gu),
                 bytes_moved=3 * T * inter * gu.element_size(), err=err)


def bench_sample(b: Bench) -> None:
    """Rows mixing greedy, top-k and top-p against the sort-based reference; max_err counts differing tokens."""
    import torch

    B, V = (4, 256) if b.smoke else (64, 128256)
    logits = torch.randn(B, V, device=b.dev) * 4
    idx = torch.arange(B, device=b.dev)
    temp = torch.where(idx % 4 == 0, 0.0, 0.8)
    top_k = torch.where(idx % 4 == 1, 50, 0).int()
    top_p = torch.where(idx % 4 >= 2, 0.9, 1.0)
    seeds = idx.long() * 1000003 + 7
    offs = torch.zeros(B, dtype=torch.int64, device=b.dev)
    tri, ref = b.triton_ops.sample, b.torch_ops.sample
    mismatch = float((tri(logits, temp, top_k, top_p, seeds, offs)
                      != ref(logits, temp, top_k, top_p, seeds, offs)).sum().item())
    b.record("sample", f"B{B} V{V} mixed", lambda: tri(logits, temp, top_k, top_p, seeds, offs),
             lambda: ref(logits, temp, top_k, top_p, seeds, offs), err=mismatch, ref_graph=False)


# In run order (the random inputs follow from one seed, so the order fixes them); --only matches these names.
SECTIONS = [
    ("decode attention", bench_decode_attention),
    ("prefill attention", bench_prefill_attention),
    ("tune", bench_tune),
    ("rms_norm", bench_rms_norm),
    ("rope+kv_write", bench_rope_kv_write),
    ("silu_and_mul", bench_silu_and_mul),
    ("sample", bench_sample),
]


def run_sections(b: Bench) -> None:
    """Runs the sections --only names (default: all); a failure is printed and recorded, and the other
    sections still run."""
    only = {x.strip() for x in b.args.only.split(",") if x.strip()}
    for name, section in SECTIONS:
        if only and not any(o in name for o in only):
            continue
        try:
            section(b)
        except Exception:
            traceback.print_exc()
            print(f"!! section {name} FAILED")
            b.failed.append(name)


# ---- outputs ---------------------------------------------------------------------------------------------
def device_name(b: Bench) -> str:
    import torch

    return torch.cuda.get_device_name() if b.cuda else "cpu (Triton interpreter)"


def write_json(b: Bench, path: Path) -> None:
    import torch

    data = {"device": device_name(b), "dtype": b.args.dtype, "smoke": b.smoke, "copy_gbps": b.copy_gbps,
            "torch": torch.__version__, "triton": __import__("triton").__version__, "results": b.results,
            "tune": b.tune, "failed": b.failed,
            "notes": "speedup = torch_ms / triton_ms; max_err: max |triton - torch| (sample: mismatching "
                     "tokens); gbps / pct_copy_bw: bytes the kernel must move over its time"}
    path.write_text(json.dumps(data, indent=1))


def write_plot(results: list[dict], path: Path, title: str) -> None:
    """A bar per result: its speedup over torch (log scale when they span more than 20x)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    labels = [f"{r['op']}\n{r['case']}" for r in results]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(results) + 1.5))
    ax.barh(range(len(results)), [r["speedup"] for r in results], color="tab:blue")
    ax.axvline(1.0, color="black", lw=1)
    sp = [r["speedup"] for r in results if r["speedup"] > 0]
    if sp and max(sp) / min(sp) > 20:
        ax.set_xscale("log")
    ax.set_yticks(range(len(results)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over torch (torch ms / triton ms)")
    ax.set_title(title)
    for i, r in enumerate(results):
        ax.text(r["speedup"], i, f" {r['speedup']:.2f}x", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(device: str, copy_gbps: float, results: list[dict]) -> None:
    """The device line and the short table, after a run and for --print-summary."""
    print(f"device: {device}  copy bandwidth: {copy_gbps:.0f} GB/s")
    print(summary_table(results))


def print_saved_summary(path: str) -> int:
    """--print-summary: the tables of a previous run's kernels.json."""
    data = json.loads(Path(path).read_text())
    print_summary(data["device"], data["copy_gbps"], data["results"])
    if data.get("failed"):
        print("FAILED sections: " + ", ".join(data["failed"]))
    if data.get("tune"):
        print(tune_table(data["tune"]))
    return 0


def main(argv=None) -> int:
    args = _parse(argv if argv is not None else sys.argv[1:])
    if args.print_summary:
        return print_saved_summary(args.print_summary)
    b = setup(args)
    bench_copy_bandwidth(b)
    run_sections(b)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(b, out / "kernels.json")
    write_plot(b.results, out / "kernels.png",
               f"pagedllm Triton kernels, {device_name(b)}, {args.dtype}" + (" (smoke)" if b.smoke else ""))
    print()
    print_summary(device_name(b), b.copy_gbps, b.results)
    if b.tune:
        print(tune_table(b.tune))
    print(f"wrote {out / 'kernels.json'}")
    if b.failed:
        print("FAILED sections: " + ", ".join(b.failed))
    return 1 if b.failed else 0


if __name__ == "__main__":
    sys.exit(main())
