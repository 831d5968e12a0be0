"""Fairness: what long prompts arriving do to streams already running. A few streams decode; their gaps between
tokens are measured alone (the baseline, same run), then while six long prompts (2,000 tokens each) are
prefilled beside them. Prints the p50 / p99 / max inter-token gap of the running streams in both phases and the
ratio (target: p99 with the prefills <= 3x p99 without); writes JSON and a PNG to --out.

    python bench/fairness.py                      # pagedllm serve's default tiny model and CPU defaults
    python bench/fairness.py --engine max_prefill_tokens_while_decoding=0     # without the prefill bound
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "backend"), str(ROOT / "client"), str(ROOT / "tests")]
from pagedllm.cli import default_model_dir  # noqa: E402
from pagedllm.config import EngineConfig  # noqa: E402
from pagedllm_client import Client  # noqa: E402


def stream_gaps(client: Client, ids: list[int], max_tokens: int, out: list[tuple[float, float]],
                stop: threading.Event) -> None:
    """Streams one request, appending (time, gap since its previous token) for every token after the first."""
    last = None
    with client.generate(input_ids=ids, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                         stream=True) as chunks:
        for chunk in chunks:
            now = time.perf_counter()
            if last is not None and chunk.token_ids:
                out.append((now, (now - last) / len(chunk.token_ids)))
            if chunk.token_ids:
                last = now
            if stop.is_set():
                break


def percentiles_ms(gaps: list[float]) -> dict[str, float]:
    arr = np.asarray(gaps) * 1e3
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "max": float(arr.max()),
            "n": len(gaps)}


def measure(url: str, args) -> dict:
    rng = random.Random(0)
    client = Client(url)
    gaps: list[tuple[float, float]] = []
    stop = threading.Event()
    streams = [threading.Thread(target=stream_gaps, args=(
        client, [rng.randrange(4, 500) for _ in range(32)], -1, gaps, stop)) for _ in range(args.streams)]
    for t in streams:
        t.start()
    time.sleep(args.warmup_s)
    baseline_start = time.perf_counter()
    time.sleep(args.window_s)
    prefill_start = time.perf_counter()
    long_prompts = [[rng.randrange(4, 500) for _ in range(args.prompt_len)] for _ in range(args.long_prompts)]
    done = []

    def prefill(ids):
        result = client.generate(input_ids=ids, max_tokens=1, temperature=0)
        done.append((time.perf_counter(), result.num_input_tokens))

    prefills = [threading.Thread(target=prefill, args=(p,)) for p in long_prompts]
    for t in prefills:
        t.start()
    for t in prefills:
        t.join()
    prefill_end = time.perf_counter()
    stop.set()
    for t in streams:
        t.join()
    client.close()
    before = [g for t, g in gaps if baseline_start <= t < prefill_start]
    during = [g for t, g in gaps if prefill_start <= t <= prefill_end]
    return {"baseline_ms": percentiles_ms(before), "with_prefills_ms": percentiles_ms(during),
            "prefill_s": prefill_end - prefill_start,
            "prefill_tokens": sum(n for _, n in done)}


def main() -> int:
    from server_utils import start_server

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: pagedllm serve's default tiny Llama)")
    ap.add_argument("--streams", type=int, default=4, help="streams decoding throughout")
    ap.add_argument("--long-prompts", type=int, default=6)
    ap.add_argument("--prompt-len", type=int, default=2000)
    ap.add_argument("--warmup-s", type=float, default=2.0)
    ap.add_argument("--window-s", type=float, default=4.0, help="length of the baseline window")
    ap.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                    help="an engine setting (as pagedllm serve's flags), e.g. max_num_batched_tokens=2048")
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args()

    model_dir = Path(args.model) if args.model else default_model_dir()
    overrides = EngineConfig.from_strings(dict(kv.split("=", 1) for kv in args.engine))
    engine = {k: v for k, v in vars(overrides).items() if k != "model_dir" and v != getattr(EngineConfig(), k)}
    print(f"server: {model_dir}, engine overrides {engine or 'none'}, {args.streams} streams, "
          f"{args.long_prompts} prompts of {args.prompt_len} tokens", flush=True)
    with start_server(model_dir, runtime_dir=Path(tempfile.mkdtemp(prefix="bench-fair-")), num_kv_blocks=4096,
                      **engine) as srv:
        result = measure(srv.grpc_url, args)
    before, during = result["baseline_ms"], result["with_prefills_ms"]
    ratio = during["p99"] / before["p99"]
    print(f"\n{'inter-token gap (ms)':22s} {'p50':>7s} {'p99':>7s} {'max':>7s} {'n':>6s}")
    for name, s in (("streams alone", before), ("with 6 long prefills", during)):
        print(f"{name:22s} {s['p50']:7.1f} {s['p99']:7.1f} {s['max']:7.1f} {s['n']:6d}")
    print(f"p99 with / without the prefills: {ratio:.2f}x (target <= 3x); the prefills took "
          f"{result['prefill_s']:.1f} s for {result['prefill_tokens']} prompt tokens")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"machine": platform.platform(), "model": str(model_dir), "engine": {k: str(v) for k, v in engine.items()},
              "args": vars(args), **result, "p99_ratio": ratio}
    (out / "fairness.json").write_text(json.dumps(record, indent=2))
    _plot(before, during, out / "fairness.png")
    print(f"wrote {out / 'fairness.json'}")
    return 0


def _plot(before: dict, during: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.2))
    keys = ["p50", "p99", "max"]
    x = np.arange(len(keys))
    ax.bar(x - 0.2, [before[k] for k in keys], 0.4, label="streams alone")
    ax.bar(x + 0.2, [during[k] for k in keys], 0.4, label="with 6 long prefills")
    ax.set_xticks(x, keys)
    ax.set_ylabel("inter-token gap (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
