"""Offline generation throughput: pagedllm's engine against Hugging Face transformers `generate`, measured in
the same run on the same checkpoint, prompts and device. Writes JSON and a PNG to --out.

    python bench/engine.py                       # CPU: a small random Llama built on the spot
    python bench/engine.py --model DIR --device cuda --batch 1 8 32 --max-tokens 128
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "backend"))
from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.tiny_model import make_tiny_model  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_pagedllm(llm: LLM, prompts: list[list[int]], max_tokens: int, device: str) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    # Warm-up at the timed batch's shapes (both sides): first-call costs such as cuBLAS heuristics stay out.
    llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=2, temperature=0))
    sync(device)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    sync(device)
    elapsed = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return elapsed


def bench_hf(model, prompts: list[list[int]], max_tokens: int, device: str) -> float:
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding needed
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    model.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    sync(device)
    t = time.perf_counter()
    out = model.generate(ids, **kwargs)
    sync(device)
    elapsed = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + max_tokens
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a random Llama of --size)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--kernels", default="auto")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--size", type=int, nargs=5, metavar=("HIDDEN", "LAYERS", "HEADS", "KV_HEADS", "FFN"),
                    default=[256, 4, 8, 2, 768], help="the random Llama built when --model is not given")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    if args.model:
        model_dir = args.model
    else:
        hidden, layers, heads, kv_heads, ffn = args.size
        model_dir = str(make_tiny_model(Path(tempfile.mkdtemp()) / "bench-llama", hidden_size=hidden,
                                        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                                        intermediate_size=ffn, max_position=4096))
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    # Half the free GPU memory for the KV cache: transformers is loaded beside it. No prefix caching: the warmup
    # runs the first prompt, whose cached blocks would spare the timed run some of the work transformers does.
    llm = LLM(model_dir, device=args.device, dtype=dtype, kernels=args.kernels, max_num_seqs=max(args.batch),
              kv_cache_memory_fraction=0.5, enable_prefix_caching=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(args.device).eval()
    vocab = llm.engine.spec.vocab_size
    rows = []
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(4, vocab, (batch, args.prompt_len), generator=g).tolist()
        t_ours = bench_pagedllm(llm, prompts, args.max_tokens, args.device)
        t_hf = bench_hf(hf, prompts, args.max_tokens, args.device)
        tokens = batch * args.max_tokens
        rows.append({"batch": batch, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
                     "pagedllm_s": t_ours, "hf_s": t_hf, "pagedllm_tok_s": tokens / t_ours,
                     "hf_tok_s": tokens / t_hf, "speedup": t_hf / t_ours})

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"\npagedllm vs transformers generate — {device_name}, {dtype}, kernels={llm.engine.ops.name}, "
          f"prompt {args.prompt_len}, {args.max_tokens} new tokens")
    print(f"{'batch':>6} {'pagedllm tok/s':>15} {'HF tok/s':>10} {'speedup':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['pagedllm_tok_s']:>15.1f} {r['hf_tok_s']:>10.1f} {r['speedup']:>7.2f}x")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": device_name, "dtype": dtype, "kernels": llm.engine.ops.name, "model": model_dir,
              "torch": torch.__version__, "rows": rows}
    (out / "engine.json").write_text(json.dumps(result, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [str(r["batch"]) for r in rows]
        width = 0.38
        ax.bar([i - width / 2 for i in range(len(xs))], [r["pagedllm_tok_s"] for r in rows], width, label="pagedllm")
        ax.bar([i + width / 2 for i in range(len(xs))], [r["hf_tok_s"] for r in rows], width, label="transformers")
        ax.set_xticks(range(len(xs)), xs)
        ax.set_xlabel("batch")
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"Greedy generation on {device_name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "engine.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
    print(f"wrote {out / 'engine.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
