"""Offline throughput with tensor parallelism: the same batch generated with tensor_parallel_size 1 and 2 (and
more with --tp), one engine at a time, on the same random-weight checkpoint. Prints tok/s per size and the
ratio to TP=1 measured in the same run; writes JSON and a PNG to --out.

On CPU (gloo) this shows that the split works and what it costs, not what a GPU gains: two ranks share the
same cores (each gets half the threads), and every layer's two all-reduces go through gloo's TCP loopback. On
GPUs each rank has its own memory bandwidth and NCCL's all-reduce is a small fraction of a step.

    python bench/tensor_parallel.py                         # CPU: hidden 1024, 8 layers, batch 8
    python bench/tensor_parallel.py --device cuda --size 4096 32 32 8 14336 --vocab 128256 --tp 1 2
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))
from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.tiny_model import make_tiny_model  # noqa: E402


def throughput(model_dir: str, tp: int, args) -> dict:
    llm = LLM(model=model_dir, device=args.device, dtype=args.dtype, tensor_parallel_size=tp,
              num_kv_blocks=args.batch * (args.prompt_len + args.max_tokens) // 16 + 16, max_num_seqs=args.batch)
    try:
        prompts = [{"prompt_token_ids": [(7 * i + j) % 500 + 4 for j in range(args.prompt_len)]}
                   for i in range(args.batch)]
        llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
        start = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True))
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        first = outs[0].outputs[0].token_ids
    finally:
        llm.close()
    return {"tp": tp, "tok_s": tokens / elapsed, "elapsed_s": elapsed, "tokens": tokens, "first_output": first}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--size", type=int, nargs=5, metavar=("HIDDEN", "LAYERS", "HEADS", "KV_HEADS", "FFN"),
                    default=[1024, 8, 16, 8, 2816])
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()

    hidden, layers, heads, kv_heads, ffn = args.size
    model_dir = str(make_tiny_model(Path(tempfile.mkdtemp()) / "tp-llama", hidden_size=hidden, num_layers=layers,
                                    num_heads=heads, num_kv_heads=kv_heads, intermediate_size=ffn,
                                    vocab_size=args.vocab, max_position=4096))
    print(f"{args.device} {args.dtype}: hidden {hidden}, {layers} layers, {heads}/{kv_heads} heads, FFN {ffn}; "
          f"batch {args.batch}, prompt {args.prompt_len}, {args.max_tokens} new tokens", flush=True)
    results = []
    for tp in args.tp:
        results.append(throughput(model_dir, tp, args))
        print(f"  TP={tp}: {results[-1]['tok_s']:8.1f} tok/s", flush=True)
    base = results[0]["tok_s"]
    same = all(r["first_output"] == results[0]["first_output"] for r in results)
    print(f"\n{'TP':>3s} {'tok/s':>9s} {'vs TP=' + str(results[0]['tp']):>9s}")
    for r in results:
        print(f"{r['tp']:3d} {r['tok_s']:9.1f} {r['tok_s'] / base:8.2f}x")
    print(f"greedy output of the first prompt identical across sizes: {same}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"machine": platform.platform(), "device": args.device, "torch": torch.__version__, "args": vars(args),
              "results": [{k: v for k, v in r.items() if k != "first_output"} for r in results],
              "same_greedy_output": same}
    (out / "tensor_parallel.json").write_text(json.dumps(record, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar([f"TP={r['tp']}" for r in results], [r["tok_s"] for r in results])
        ax.set_ylabel("tok/s")
        fig.tight_layout()
        fig.savefig(out / "tensor_parallel.png", dpi=120)
    except ImportError:
        pass
    print(f"wrote {out / 'tensor_parallel.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
