"""Decode speed against what the memory allows: ms per decode step and tok/s at several batch sizes (prompt 512,
128 new tokens), for a Llama-3-8B-shaped model and a ~0.5B one, with CUDA graphs on and off, and the weight
bytes read per step divided by the step time as a fraction of the copy bandwidth measured in the same run.

The weights are random and made directly on the device (no checkpoint on disk: the 8B shape would be 16 GB):
the checkpoint directory holds only its config.json, and the loader is replaced by one that draws each tensor
the config implies. Writes JSON and a PNG to --out.

    python bench/decode.py --device cuda                       # both models, batch 1 8 32 64, graphs on and off
    python bench/decode.py --device cpu --models tiny --batch 1 4 --max-tokens 8 --prompt-len 16   # smoke
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))
from pagedllm.config import EngineConfig  # noqa: E402
from pagedllm.engine import rank as rank_module  # noqa: E402
from pagedllm.engine.engine import LLMEngine  # noqa: E402
from pagedllm.model.weights import _slices, expected_shapes  # noqa: E402
from pagedllm.sampling_params import SamplingParams  # noqa: E402

# name: (hidden, layers, heads, kv heads, FFN, vocab)
MODELS = {
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256),
    "qwen2-0.5b": (896, 24, 14, 2, 4864, 151936),
    "tiny": (64, 2, 4, 2, 128, 512),
}


def write_config(path: Path, shape: tuple) -> Path:
    hidden, layers, heads, kv, ffn, vocab = shape
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "intermediate_size": ffn, "vocab_size": vocab, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "eos_token_id": 0}))
    from safetensors.torch import save_file

    save_file({}, path / "model.safetensors")  # the loader below never reads it
    return path


def random_weights(model_dir, spec, dtype, device, shard, on_file=lambda p, n: None):
    """What load_weights returns, drawn on the device: N(0, 0.02), norms 1 (finite, varied logits)."""
    gen = torch.Generator(device=device).manual_seed(0)
    weights = {}
    for key, shape in expected_shapes(spec).items():
        if key.endswith(("_proj.bias", "q_norm.weight", "k_norm.weight")):
            continue
        slices = _slices(key, spec, shard)
        t = torch.empty(shape, dtype=dtype, device=device)
        if len(shape) == 1:
            t.fill_(1.0)
        else:
            t.normal_(0.0, 0.02, generator=gen)
        weights[key] = t[slices] if slices is not None else t
    return weights


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written), as bench/kernels.py measures it."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (time.perf_counter() - start) / 1e9


def decode_steps(engine: LLMEngine, batch: int, prompt_len: int, max_tokens: int) -> list[float]:
    """Seconds of each decode-only step of a batch (prefill first, untimed)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i in range(batch):
        ids = [(i * 131 + j * 7) % 1000 + 1 for j in range(prompt_len)]
        engine.add(engine.make_request(f"b{batch}-{i}", params, prompt_token_ids=ids))
    while engine.num_waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()
    times = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()  # ends with the step's one host sync (the sampled tokens)
        times.append(time.perf_counter() - start)
    return times


def weight_bytes(engine: LLMEngine) -> int:
    """Bytes a decode step reads from the weights: every layer's, the final norm and the LM head (the
    embedding is a gather of a few rows)."""
    m = engine.model
    tensors = [m.final_norm, m.lm_head]
    for layer in m.layers:
        tensors += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def run_model(name: str, args, bandwidth: float) -> list[dict]:
    model_dir = write_config(Path(tempfile.mkdtemp()) / name, MODELS[name])
    results = []
    for graphs in args.graphs:
        engine = LLMEngine(EngineConfig(
            model_dir=str(model_dir), device=args.device, dtype=args.dtype, cuda_graphs=graphs,
            max_num_seqs=max(args.batch), max_num_batched_tokens=max(2048, args.prompt_len * 4),
            num_kv_blocks=max(args.batch) * (args.prompt_len + args.max_tokens) // 16 + 64,
            enable_prefix_caching=False))
        wbytes = weight_bytes(engine)
        for batch in args.batch:
            times = decode_steps(engine, batch, args.prompt_len, args.max_tokens)
            step = float(np.median(times))
            frac = wbytes / step / 1e9 / bandwidth if bandwidth == bandwidth else float("nan")
            results.append({"model": name, "cuda_graphs": graphs, "batch": batch, "step_ms": step * 1e3,
                            "tok_s": batch / step, "weight_gb": wbytes / 1e9, "weight_bw_fraction": frac})
            print(f"{name:11s} graphs={str(graphs):5s} batch {batch:3d}: {step * 1e3:7.3f} ms/step "
                  f"{batch / step:9.1f} tok/s  weights {wbytes / 1e9:5.2f} GB at {frac * 100:5.1f} % of copy "
                  f"bandwidth", flush=True)
        del engine
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--models", nargs="+", default=["llama3-8b", "qwen2-0.5b"], choices=list(MODELS))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--graphs", type=lambda s: s == "on", nargs="+", default=[True, False], metavar="on|off")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    rank_module.load_weights = random_weights  # no checkpoint on disk: weights made on the device
    device = torch.device(args.device)
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"{name}, {args.dtype}; copy bandwidth {bandwidth:.0f} GB/s; prompt {args.prompt_len}, "
          f"{args.max_tokens} new tokens", flush=True)
    results = [r for model in args.models for r in run_model(model, args, bandwidth)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"device": name, "torch": torch.__version__, "dtype": args.dtype,
                                                 "copy_gbps": bandwidth, "args": vars(args), "results": results},
                                                indent=2))
    _plot(results, out / "decode.png")
    print(f"wrote {out / 'decode.json'}")
    return 0


def _plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = sorted({r["model"] for r in results})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for graphs in (True, False):
            rows = [r for r in results if r["model"] == model and r["cuda_graphs"] == graphs]
            if rows:
                ax.plot([r["batch"] for r in rows], [r["step_ms"] for r in rows], marker="o",
                        label=f"CUDA graphs {'on' if graphs else 'off'}")
        ax.set_title(model)
        ax.set_xlabel("batch")
        ax.set_ylabel("ms per decode step")
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
