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
import contextlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

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


def main(argv=None) -> int:
    args = _parse(argv if argv is not None else sys.argv[1:])
    if args.print_summary:
        data = json.loads(Path(args.print_summary).read_text())
        print(f"device: {data['device']}  copy bandwidth: {data['copy_gbps']:.0f} GB/s")
        print(summary_table(data["results"]))
        if data.get("failed"):
            print("FAILED sections: " + ", ".join(data["failed"]))
        if data.get("tune"):
            print(tune_table(data["tune"]))
        return 0

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

    dev = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    smoke = args.smoke
    torch.manual_seed(0)

    def graph_time(fn):
        """Median ms of replaying fn captured in a CUDA graph (10 calls per replay), or None when fn cannot be
        captured (host syncs: several torch reference ops have them)."""
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

    def timeit(fn):
        if cuda:
            import triton.testing

            return triton.testing.do_bench(fn, warmup=10 if smoke else 25, rep=20 if smoke else 100,
                                           return_mode="median")
        fn()  # warm-up (the interpreter rewrites each kernel once)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    results: list[dict] = []
    failed: list[str] = []

    only = {x.strip() for x in args.only.split(",") if x.strip()}

    def skip_unless(name):
        if only and not any(o in name for o in only):
            raise _Skip

    class _Skip(Exception):
        pass

    @contextlib.contextmanager
    def section(name):
        """One kernel's timings: a failure is printed and recorded, and the other sections still run. The body
        starts with `skip_unless(name)`, which leaves it at once when --only does not name it."""
        try:
            yield
        except _Skip:
            pass
        except Exception:
            traceback.print_exc()
            print(f"!! section {name} FAILED")
            failed.append(name)

    def record(op, case, tri_fn, ref_fn, *, bytes_moved=None, flops=None, err=None, ref_graph=True):
        t_tri, t_ref = timeit(tri_fn), timeit(ref_fn)
        r = {"op": op, "case": case, "triton_ms": t_tri, "torch_ms": t_ref, "speedup": t_ref / t_tri}
        if args.graph and cuda:
            # ref_graph=False: the torch op syncs with the host (boolean indexing...), so it cannot be captured
            r["triton_graph_ms"] = graph_time(tri_fn)
            r["torch_graph_ms"] = graph_time(ref_fn) if ref_graph else None
        if bytes_moved is not None:
            r["gbps"] = bytes_moved / (t_tri * 1e-3) / 1e9
            r["pct_copy_bw"] = 100.0 * r["gbps"] / copy_gbps
        if flops is not None:
            r["tflops"] = flops / (t_tri * 1e-3) / 1e12
        if err is not None:
            r["max_err"] = float(err)
        results.append(r)
        print(f"  {op:<16} {case:<34} triton {t_tri:9.4f} ms   torch {t_ref:9.4f} ms   {t_ref / t_tri:6.2f}x",
              flush=True)

    # ---- device copy bandwidth ---------------------------------------------------------------------------
    n_copy = (1 << 20) if smoke else (1 << 29)  # elements of fp16: 2 MiB / 1 GiB
    src = torch.empty(n_copy, dtype=torch.float16, device=dev).normal_()
    dst = torch.empty_like(src)
    t_copy = timeit(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() * src.element_size() / (t_copy * 1e-3) / 1e9
    src = dst = None  # free GPU memory (the lambdas above hold these names)
    print(f"device copy bandwidth: {copy_gbps:.0f} GB/s")

    # ---- paged attention -----------------------------------------------------------------------------------
    def paged_setup(B, ctx, q_len, H, KVH, D, BS):
        nb = -(-ctx // BS)
        NB = B * nb
        perm = torch.randperm(NB, device=dev).int()
        bt = perm.view(B, nb)
        kc = torch.randn(NB, BS, KVH, D, dtype=dtype, device=dev)
        vc = torch.randn_like(kc)
        q = torch.randn(B * q_len, H, D, dtype=dtype, device=dev)
        qsl = torch.arange(0, B * q_len + 1, q_len, dtype=torch.int32, device=dev)
        sl = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        # the same keys and values, contiguous [B, KVH, ctx, D]
        pos = torch.arange(ctx, device=dev)
        blocks = bt[:, pos // BS].long()
        kk = kc[blocks, pos % BS].permute(0, 2, 1, 3).contiguous()
        vv = vc[blocks, pos % BS].permute(0, 2, 1, 3).contiguous()
        return q, kc, vc, bt, qsl, sl, kk, vv

    F = torch.nn.functional
    decode_cases = [("B32 ctx4096 h32/8 d128", 32, 4096, 32, 8, 128, 16),
                    ("B2 ctx16384 h32/8 d128", 2, 16384, 32, 8, 128, 16)]
    if smoke:
        decode_cases = [("B3 ctx40 h4/2 d64", 3, 40, 4, 2, 64, 16)]
    with section("decode attention"):
        skip_unless("decode attention")
        for case, B, ctx, H, KVH, D, BS in decode_cases:
            q, kc, vc, bt, qsl, sl, kk, vv = paged_setup(B, ctx, 1, H, KVH, D, BS)
            G = H // KVH
            scale = D ** -0.5
            qg = q.view(B, KVH, G, D)
            ref = lambda: F.scaled_dot_product_attention(qg, kk, vv, scale=scale)  # noqa: E731
            kv_bytes = 2 * B * ctx * KVH * D * kc.element_size() + 2 * q.numel() * q.element_size()
            for split in (None, False) if (cuda and B * KVH < 64) else (None,):
                tri = lambda: TRITON_OPS.paged_attention(q, kc, vc, bt, qsl, sl, scale, max_query_len=1,  # noqa: E731
                                                         max_seq_len=ctx, split_kv=split)
                err = (tri().float() - ref().reshape(B, H, D).float()).abs().max().item()
                label = case + ("" if split is None else " nosplit")
                record("decode_attn", label, tri, ref, bytes_moved=kv_bytes, err=err)
            kc = vc = kk = vv = None  # free GPU memory (the lambdas above hold these names)

    with section("prefill attention"):
        skip_unless("prefill attention")
        prefill = ("T2048 h32/8 d128", 2048, 32, 8, 128, 16) if not smoke else ("T24 h4/2 d64", 24, 4, 2, 64, 16)
        case, T, H, KVH, D, BS = prefill
        q, kc, vc, bt, qsl, sl, kk, vv = paged_setup(1, T, T, H, KVH, D, BS)
        scale = D ** -0.5
        kx = kk.repeat_interleave(H // KVH, dim=1)
        vx = vv.repeat_interleave(H // KVH, dim=1)
        qt = q.view(T, H, D).transpose(0, 1).unsqueeze(0)
        ref = lambda: F.scaled_dot_product_attention(qt, kx, vx, is_causal=True, scale=scale)  # noqa: E731
        tri = lambda: TRITON_OPS.paged_attention(q, kc, vc, bt, qsl, sl, scale, max_query_len=T, max_seq_len=T)  # noqa: E731
        err = (tri().float() - ref()[0].transpose(0, 1).float()).abs().max().item()
        record("prefill_attn", case, tri, ref, flops=4.0 * H * D * T * (T + 1) / 2, err=err)
        kc = vc = kk = vv = kx = vx = None  # free GPU memory (the lambdas above hold these names)

    # ---- launch-config sweep (--tune): what the defaults in paged_attention.py are chosen from --------------
    tune: dict = {}
    with section("tune"):
        skip_unless("tune")
        if args.tune:
            import itertools

            def sweep(case, setup, variants, host, *, bytes_moved=None, flops=None):
                q, kc, vc, bt, qsl, sl = setup
                scale = q.shape[-1] ** -0.5
                ref = TRITON_OPS.paged_attention(q, kc, vc, bt, qsl, sl, scale, **host).float()
                default_ms = timeit(lambda: TRITON_OPS.paged_attention(q, kc, vc, bt, qsl, sl, scale, **host))
                t_stop = time.monotonic() + args.tune_budget / 2  # half for decode, half for prefill
                rows = []
                for cfg in variants:
                    if time.monotonic() > t_stop:
                        print(f"  tune budget spent: {len(rows)} of {len(variants)} variants of {case}")
                        break
                    fn = lambda: TRITON_OPS.paged_attention(q, kc, vc, bt, qsl, sl, scale, **host, **cfg)  # noqa: E731
                    try:
                        bad = (fn().float() - ref).abs().max().item()
                        if not bad < 0.05:  # a variant must compute the same thing (and not NaN)
                            raise RuntimeError(f"differs from the default launch by {bad}")
                        ms = timeit(fn)
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
                tune[case] = {"default_ms": default_ms, "variants": rows}

            # Most promising first, so that a spent budget cuts the long tail. The interpreter ignores warps and
            # stages: on CPU (--smoke) two variants of each only check that the sweep itself works.
            B, ctx, H, KVH, D, BS = (3, 40, 4, 2, 64, 16) if smoke else (32, 4096, 32, 8, 128, 16)
            q, kc, vc, bt, qsl, sl, _, _ = paged_setup(B, ctx, 1, H, KVH, D, BS)
            # the neighbours of the defaults first (a spent budget cuts the rest of the grid)
            first = [dict(tile_n=128, num_warps=4, num_stages=3), dict(tile_n=128, num_warps=2, num_stages=2),
                     dict(tile_n=64, num_warps=4, num_stages=2), dict(tile_n=128, split_kv=True, num_splits=2),
                     dict(tile_n=64, split_kv=True, num_splits=2)]
            grid = [dict(tile_n=tn, num_warps=w, num_stages=st)
                    for tn, w, st in itertools.product((128, 64, 32), (4, 8, 2), (2, 3, 4))]
            variants = first + [v for v in grid if v not in first]
            variants = variants[:2] if smoke else variants
            sweep(f"decode B{B} ctx{ctx} h{H}/{KVH} d{D}", (q, kc, vc, bt, qsl, sl), variants,
                  dict(max_query_len=1, max_seq_len=ctx),
                  bytes_moved=2 * B * ctx * KVH * D * kc.element_size() + 2 * q.numel() * q.element_size())
            kc = vc = None

            T = 24 if smoke else 2048
            q, kc, vc, bt, qsl, sl, _, _ = paged_setup(1, T, T, H, KVH, D, BS)
            first = [dict(block_m=64, tile_n=64, num_warps=4, num_stages=3),
                     dict(block_m=128, tile_n=64, num_warps=8, num_stages=2),
                     dict(block_m=64, tile_n=32, num_warps=4, num_stages=2),
                     dict(block_m=64, tile_n=128, num_warps=4, num_stages=2),
                     dict(block_m=128, tile_n=128, num_warps=8, num_stages=3)]
            grid = [dict(block_m=bm, tile_n=tn, num_warps=w, num_stages=st)
                    for bm, tn, w, st in itertools.product((64, 128), (64, 128, 32), (4, 8), (2, 3, 4))]
            variants = first + [v for v in grid if v not in first]
            sweep(f"prefill T{T} h{H}/{KVH} d{D}", (q, kc, vc, bt, qsl, sl), variants[:2] if smoke else variants,
                  dict(max_query_len=T, max_seq_len=T), flops=4.0 * H * D * T * (T + 1) / 2)
            kc = vc = None
            print(tune_table(tune))

    # ---- rms_norm + residual -----------------------------------------------------------------------------
    with section("rms_norm"):
        skip_unless("rms_norm")
        hidden = 128 if smoke else 4096
        for T in ((4,) if smoke else (32, 2048)):
            x = torch.randn(T, hidden, dtype=dtype, device=dev)
            w = torch.rand(hidden, dtype=dtype, device=dev) + 0.5
            r1 = torch.randn_like(x)
            r2 = r1.clone()
            err = (TRITON_OPS.rms_norm(x, w, 1e-5, r1.clone()).float()
                   - TORCH_OPS.rms_norm(x, w, 1e-5, r2.clone()).float()).abs().max().item()
            record("rms_norm+res", f"T{T} h{hidden}", lambda: TRITON_OPS.rms_norm(x, w, 1e-5, r1),
                   lambda: TORCH_OPS.rms_norm(x, w, 1e-5, r2), bytes_moved=4 * x.numel() * x.element_size(), err=err)

    # ---- rope + kv write -----------------------------------------------------------------------------------
    with section("rope+kv_write"):
        skip_unless("rope+kv_write")
        H, KVH, D, BS = (4, 2, 64, 16) if smoke else (32, 8, 128, 16)
        for T in ((5,) if smoke else (32, 2048)):
            qkv = torch.randn(T, (H + 2 * KVH) * D, dtype=dtype, device=dev)
            q, k, v = (t.view(T, -1, D) for t in qkv.split([H * D, KVH * D, KVH * D], dim=-1))
            pos = torch.randint(0, 4096, (T,), device=dev)
            inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev).float() / D))
            f = torch.outer(torch.arange(8192, device=dev).float(), inv)
            cs = torch.cat([f.cos(), f.sin()], -1)
            NB = -(-T // BS) + 4
            slots = torch.randperm(NB * BS, device=dev)[:T]
            caches = [torch.zeros(NB, BS, KVH, D, dtype=dtype, device=dev) for _ in range(4)]
            q1, k1 = q.clone(), k.clone()
            TRITON_OPS.rope_and_write_kv(q1, k1, v, pos, cs, caches[0], caches[1], slots)
            q2, k2 = q.clone(), k.clone()
            TORCH_OPS.rope_and_write_kv(q2, k2, v, pos, cs, caches[2], caches[3], slots)
            err = max((q1.float() - q2.float()).abs().max().item(),
                      (caches[0].float() - caches[2].float()).abs().max().item())
            moved = (2 * q.numel() + 4 * k.numel() + 2 * v.numel()) * q.element_size()
            record("rope+kv_write", f"T{T} h{H}/{KVH} d{D}",
                   lambda: TRITON_OPS.rope_and_write_kv(q, k, v, pos, cs, caches[0], caches[1], slots),
                   lambda: TORCH_OPS.rope_and_write_kv(q, k, v, pos, cs, caches[2], caches[3], slots),
                   bytes_moved=moved, err=err, ref_graph=False)
            if cuda and args.graph:
                # What rounding like the reference costs: the same launch with FMA contraction allowed.
                from pagedllm.kernels._triton_util import run as run_launches
                from pagedllm.kernels.rope_kv_write import _plan_rope_and_write_kv

                fused = _plan_rope_and_write_kv(q, k, v, pos, cs, caches[0], caches[1], slots)
                for ln in fused:
                    ln.fp_fusion = True
                record("rope+kv_write", f"T{T} h{H}/{KVH} d{D} fp-fusion on", lambda: run_launches(fused, dev),
                       lambda: TORCH_OPS.rope_and_write_kv(q, k, v, pos, cs, caches[2], caches[3], slots),
                       bytes_moved=moved, ref_graph=False)

    # ---- silu_and_mul --------------------------------------------------------------------------------------
    with section("silu_and_mul"):
        skip_unless("silu_and_mul")
        inter = 128 if smoke else 14336
        for T in ((4,) if smoke else (32, 2048)):
            gu = torch.randn(T, 2 * inter, dtype=dtype, device=dev)
            err = (TRITON_OPS.silu_and_mul(gu).float() - TORCH_OPS.silu_and_mul(gu).float()).abs().max().item()
            record("silu_and_mul", f"T{T} i{inter}", lambda: TRITON_OPS.silu_and_mul(gu),
                   lambda: TORCH_OPS.silu_and_mul(gu), bytes_moved=3 * T * inter * gu.element_size(), err=err)

    # ---- sampling ------------------------------------------------------------------------------------------
    with section("sample"):
        skip_unless("sample")
        B, V = (4, 256) if smoke else (64, 128256)
        logits = torch.randn(B, V, device=dev) * 4
        idx = torch.arange(B, device=dev)
        temp = torch.where(idx % 4 == 0, 0.0, 0.8)
        top_k = torch.where(idx % 4 == 1, 50, 0).int()
        top_p = torch.where(idx % 4 >= 2, 0.9, 1.0)
        seeds = idx.long() * 1000003 + 7
        offs = torch.zeros(B, dtype=torch.int64, device=dev)
        a = TRITON_OPS.sample(logits, temp, top_k, top_p, seeds, offs)
        b = TORCH_OPS.sample(logits, temp, top_k, top_p, seeds, offs)
        mismatch = float((a != b).sum().item())
        record("sample", f"B{B} V{V} mixed", lambda: TRITON_OPS.sample(logits, temp, top_k, top_p, seeds, offs),
               lambda: TORCH_OPS.sample(logits, temp, top_k, top_p, seeds, offs), err=mismatch, ref_graph=False)

    # ---- outputs -------------------------------------------------------------------------------------------
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    data = {"device": dev_name, "dtype": args.dtype, "smoke": smoke, "copy_gbps": copy_gbps,
            "torch": torch.__version__, "triton": __import__("triton").__version__, "results": results,
            "tune": tune, "failed": failed,
            "notes": "speedup = torch_ms / triton_ms; max_err: max |triton - torch| (sample: mismatching "
                     "tokens); gbps / pct_copy_bw: bytes the kernel must move over its time"}
    (out / "kernels.json").write_text(json.dumps(data, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

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
        ax.set_title(f"pagedllm Triton kernels, {dev_name}, {args.dtype}" + (" (smoke)" if smoke else ""))
        for i, r in enumerate(results):
            ax.text(r["speedup"], i, f" {r['speedup']:.2f}x", va="center", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "kernels.png", dpi=110)
        plt.close(fig)
    except ImportError:
        print("matplotlib is not installed: no plot")
    print()
    print(f"device: {dev_name}  copy bandwidth: {copy_gbps:.0f} GB/s")
    print(summary_table(results))
    if tune:
        print(tune_table(tune))
    print(f"wrote {out / 'kernels.json'}")
    if failed:
        print("FAILED sections: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
